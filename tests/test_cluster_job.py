"""Acceptance: the README's `ray job submit` command on the local stack completes a 2-trial sweep
with its runs in the MLflow server (PostgreSQL), its artifacts and checkpoints in S3.

The job test is slow (a few minutes): it starts the stack (tests/test_stack.py's fixture: PostgreSQL, SeaweedFS,
MLflow, a Ray head + worker), uploads a small generated corpus with infra/local/upload_corpus.sh,
runs the command exactly as the README shows it (the dashboard port substituted, `--set` flags
for a micro model appended), then reads everything back.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.test_stack import REPO, stack  # noqa: F401 - the module-scoped stack fixture

README_PORT = "http://127.0.0.1:8265"
# A micro model and budgets (tests/conftest.py's micro_run_dict) so two trials take about a minute each.
MICRO = [
    "sweep.max_concurrent=1",
    "model.model_dim=32", "model.encoder.ffn_dim=64", "model.encoder.conv_kernel=7",
    "model.frontend.conv_channels=[8, 8]", "model.best_rq.codebook_size=64",
    "model.ctc.hidden_dim=32", "model.ctc.num_hidden_layers=1",
    "data.generate=false", "data.dev_subsets=[dev-clean]", "data.test_subsets=[test-clean]",
    "data.stats_utterances=10",
    "pretrain.steps=4", "pretrain.warmup_steps=2", "pretrain.max_batch_seconds=12.0", "pretrain.log_every=1",
    "pretrain.checkpoint_every=2",
    "finetune.steps=4", "finetune.warmup_steps=2", "finetune.max_batch_seconds=12.0", "finetune.log_every=1",
    "finetune.checkpoint_every=2", "finetune.eval_every=2",
    "eval.decoder=greedy", "eval.lexicon_from_train=false", "eval.lm_from_train=false", "eval.bootstrap_samples=20", "eval.max_batch_seconds=30.0",
    "profile.lengths_s=[2.0]", "profile.batch_size=1", "profile.repeats=1",
]
MAX_PACKAGE_MIB = 5.0


def readme_job_command() -> str:
    """The `ray job submit` command of the README's local-stack section, continuation lines joined."""
    lines = (REPO / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("RAY_AUTH_MODE=token ray job submit"))
    parts = []
    for line in lines[start:]:
        text = line.strip()
        parts.append(text.rstrip("\\").strip())
        if not text.endswith("\\"):
            break
    return " ".join(parts)


def _s3(env: dict):
    import boto3

    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                        aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])


def _keys(s3, bucket: str, prefix: str) -> list[str]:
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


def test_readme_command_is_the_documented_one():
    command = readme_job_command()
    assert command.startswith(f"RAY_AUTH_MODE=token ray job submit --address {README_PORT} --working-dir . -- ")
    assert "python -m orchestrator.sweep search_spaces/hybrid.yaml" in command
    for flag in ("--set sweep.num_trials=2", "--set data.root=s3://", "--set tracking.uri=$MLFLOW_TRACKING_URI",
                 "--set storage.path=s3://"):
        assert flag in command, flag
    ignored = (REPO / ".rayignore").read_text().split()
    assert {".git/", ".venv/", "data/", "runs/", "checkpoints/"} <= set(ignored)


@pytest.mark.slow
def test_ray_job_submit_runs_a_sweep_on_the_stack(stack, small_corpus):  # noqa: F811
    import psycopg2

    env = dict(os.environ, **stack["env"])
    env["PATH"] = f"{REPO / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env.pop("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", None)
    command = readme_job_command()
    corpus_uri = re.search(r"data\.root=(s3://\S+)", command).group(1)
    storage_uri = re.search(r"storage\.path=(s3://\S+)", command).group(1)
    bucket, prefix = storage_uri[len("s3://"):].split("/", 1)

    # The corpus, as the README puts it there (a small one instead of data/synth).
    up = subprocess.run([str(REPO / "infra" / "local" / "upload_corpus.sh"), str(small_corpus), corpus_uri, "dev-clean"],
                        env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-2000:]

    job_command = command.replace(README_PORT, env["RAY_ADDRESS"]) + "".join(f" --set {shlex.quote(s)}" for s in MICRO)
    job = subprocess.run(["bash", "-c", job_command], env=env, capture_output=True, text=True, timeout=1500, cwd=REPO)
    out = job.stdout + job.stderr
    assert job.returncode == 0 and re.search(r"Job '\S+' succeeded", out), out[-6000:]

    # The package `ray job submit --working-dir .` uploads, built again by the same Ray function
    # with the same settings (.gitignore and .rayignore honoured): .git, .venv, data left out.
    from ray._private.runtime_env.packaging import create_package

    with tempfile.TemporaryDirectory() as tmp:
        package = Path(tmp) / "package.zip"
        create_package(str(REPO), package, include_gitignore=True)
        size_mib = package.stat().st_size / 2**20
        import zipfile

        names = zipfile.ZipFile(package).namelist()
    assert size_mib < MAX_PACKAGE_MIB, f"{size_mib:.1f} MiB"
    assert not [n for n in names if n.startswith((".git/", ".venv/", "data/", ".stack/", "runs/"))], names[:20]

    # MLflow, read from its PostgreSQL: one sweep run, two finished trial runs under it.
    e = stack["env"]
    with psycopg2.connect(host=e["PGHOST"], port=int(e["PGPORT"]), user=e["PGUSER"], password=e["PGPASSWORD"],
                          dbname=e["PGDATABASE"], connect_timeout=5) as conn, conn.cursor() as cur:
        cur.execute("""SELECT r.run_uuid, r.status, t.value FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid
                       WHERE t.key = 'run_kind'""")
        rows = cur.fetchall()
        parents = [r for r in rows if r[2] == "sweep"]
        trials = [r for r in rows if r[2] == "trial"]
        assert len(parents) == 1 and parents[0][1] == "FINISHED", rows
        assert len(trials) == 2 and all(r[1] == "FINISHED" for r in trials), rows
        cur.execute("SELECT run_uuid, value FROM tags WHERE key = 'mlflow.parentRunId'")
        assert {r[0] for r in cur.fetchall() if r[1] == parents[0][0]} == {r[0] for r in trials}
        cur.execute("SELECT run_uuid, key, value FROM metrics WHERE key = 'dev_wer'")
        assert {r[0] for r in cur.fetchall()} >= {r[0] for r in trials}
        cur.execute("SELECT value FROM params UNION ALL SELECT value FROM tags")
        logged = "\n".join(v or "" for (v,) in cur.fetchall())
        assert e["AWS_SECRET_ACCESS_KEY"] not in logged and e["PGPASSWORD"] not in logged
        cur.execute("SELECT value FROM tags WHERE key = 'sweep_id'")
        sweep_id = cur.fetchone()[0]

    # MLflow artifacts (proxied by the server) in S3: the sweep's report.
    s3 = _s3(e)
    artifacts = _keys(s3, e["STACK_S3_BUCKETS"].split(",")[1], "mlflow/")
    assert any(parents[0][0] in k and k.endswith("report/report.md") for k in artifacts), artifacts[:20]

    # The sweep's storage in S3: state, metrics, report, Tune's experiment, checkpoints.
    keys = _keys(s3, bucket, f"{prefix}/")
    sweep = f"{prefix}/sweeps/{sweep_id}"
    assert f"{sweep}/sweep.json" in keys and f"{sweep}/report.md" in keys, keys[:50]
    assert any(k.startswith(f"{sweep}/tune/") for k in keys), "Ray Tune's experiment state is in S3 (--resume)"
    trial_states = [k for k in keys if k.startswith(f"{sweep}/trials/") and k.endswith("/trial.json")]
    assert len(trial_states) == 2, keys
    run_ids = set()
    for key in trial_states:
        state = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        assert state["status"] == "done", state
        run_ids.add(state["mlflow_run_id"])
        trial = key.rsplit("/", 1)[0]
        assert f"{trial}/run/final_metrics.json" in keys
        assert any(k.startswith(f"{trial}/run/finetune/checkpoints/step-") and k.endswith("/_COMPLETE.json") for k in keys)
        assert any(k.startswith(f"{trial}/run/finetune/checkpoints/step-") and k.endswith("/state.pt") for k in keys)
    assert run_ids == {r[0] for r in trials}
    assert any(k.startswith(f"{prefix}/pretrain/") and k.endswith("/pretrain.done.json") for k in keys)
    assert any(k.startswith(f"{prefix}/pretrain/") and "/checkpoints/step-" in k and k.endswith("/_COMPLETE.json")
               for k in keys)

    # The nodes' working copies (POM_WORK_DIR default) are keyed by the store's identity, written
    # once in S3: a purged and recreated stack is a new store, so nothing here is reused for it
    # (tests/test_storage.py runs that scenario). Cleaned up only after the checks.
    from orchestrator.storage import STORAGE_ID, work_folder

    assert f"{prefix}/{STORAGE_ID}" in keys
    identity = json.loads(s3.get_object(Bucket=bucket, Key=f"{prefix}/{STORAGE_ID}")["Body"].read())["id"]
    work = work_folder(Path(tempfile.gettempdir()) / "pom-ablations-work", endpoint=e["AWS_ENDPOINT_URL"],
                       bucket=bucket, prefix=prefix, identity=identity)
    assert (work / "sweeps" / sweep_id).is_dir(), f"the sweep's working copy is not under the store's key {work}"
    local_marks = list(work.glob("pretrain/*/pretrain/checkpoints/step-*/state.pt"))
    assert local_marks and all(
        f"{prefix}/{m.parent.relative_to(work).as_posix()}/_COMPLETE.json" in keys for m in local_marks
    ), "every node-local pre-training checkpoint left is one S3 proves complete"
    shutil.rmtree(work.parents[len(Path(prefix).parts) - 1], ignore_errors=True)

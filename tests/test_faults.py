"""Faults on the local stack (infra/local): secrets, corrupt audio in the S3 corpus, S3 down or refusing.

Slow (about five minutes): one stack (PostgreSQL, SeaweedFS, MLflow, a two-node Ray cluster) for
the module, a one-trial sweep submitted with the Ray job API, then the sweep CLI against wrong S3
keys and against the stopped S3 server. The stack is always stopped, even when an assertion fails.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

from tests.test_stack import STACK, stack  # noqa: F401 (the module-scoped stack fixture)
from tests.test_sweep import sweep_spec

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
JOB_TIMEOUT_S = 600

SUBMIT = """
import json, sys, time
from ray.job_submission import JobStatus, JobSubmissionClient
client = JobSubmissionClient()  # RAY_ADDRESS, RAY_AUTH_MODE and RAY_AUTH_TOKEN_PATH from the env
job = client.submit_job(entrypoint=sys.argv[1])
deadline = time.monotonic() + float(sys.argv[2])
while client.get_job_status(job) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
    if time.monotonic() > deadline:
        client.stop_job(job)
        break
    time.sleep(2)
info = client.get_job_info(job)
print(json.dumps({"job": job, "status": str(client.get_job_status(job)), "logs": client.get_job_logs(job),
                  "info": {k: str(v) for k, v in vars(info).items()}}))
"""


def _stack_module():
    spec = importlib.util.spec_from_file_location("local_stack", REPO / "infra" / "local" / "stack.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _corrupt(root: Path) -> list[str]:
    """A FLAC that is not audio at all and one truncated to a third (its header still valid)."""
    files = sorted((root / "train-clean-100").rglob("*.flac"))
    garbage, truncated = files[0], files[len(files) // 2]
    garbage.write_bytes(b"\x00not audio\x00" * 64)
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    return [p.relative_to(root).as_posix() for p in (garbage, truncated)]


@pytest.fixture(scope="module")
def s3_corpus(stack, small_corpus, tmp_path_factory):  # noqa: F811
    """The small corpus with two corrupt FLACs, on the stack's S3: (s3 root, [bad object URIs])."""
    local = tmp_path_factory.mktemp("faults") / "synth"
    shutil.copytree(small_corpus, local)
    bad = _corrupt(local)
    uri = f"s3://{stack['env']['STACK_S3_BUCKETS'].split(',')[0]}/faults-{uuid.uuid4().hex[:6]}"
    env = dict(os.environ, **stack["env"], PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-m", "orchestrator.data.librispeech", "upload", str(local), uri],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return uri, [f"{uri}/{rel}" for rel in bad]


def _spec(tmp: Path, corpus: str, tracking: str, experiment: str) -> Path:
    spec = sweep_spec(Path("unused"), tmp, name="faults", num_trials=1, search={"finetune.head_lr": {"values": [0.003]}})
    spec["data"]["root"] = corpus
    spec["tracking"] = {"uri": tracking, "experiment": experiment}
    path = tmp / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _files_under(folder: Path):
    for path in folder.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink():
                yield path
        except OSError:
            continue


def _leaks(blob: bytes, secrets: dict[str, str]) -> list[str]:
    return [name for name, value in secrets.items() if value.encode() in blob]


def test_sweep_on_the_stack_keeps_secrets_and_logs_corrupt_audio(stack, s3_corpus, tmp_path):  # noqa: F811
    from mlflow.tracking import MlflowClient

    env = stack["env"]
    corpus, bad = s3_corpus
    experiment = f"faults-{uuid.uuid4().hex[:8]}"
    spec = _spec(tmp_path, corpus, env["MLFLOW_TRACKING_URI"], experiment)
    job_env = dict(os.environ, **env)
    entrypoint = f"python -m orchestrator.sweep {spec} --address auto"
    out = subprocess.run([sys.executable, "-c", SUBMIT, entrypoint, str(JOB_TIMEOUT_S)], env=job_env,
                         capture_output=True, text=True, timeout=JOB_TIMEOUT_S + 120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    job = json.loads(out.stdout.strip().splitlines()[-1])
    assert job["status"] == "SUCCEEDED", job["logs"][-4000:]

    # Corrupt audio: skipped by every reader, counted and listed on the sweep's run.
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parent = [r for r in runs if r.data.tags.get("run_kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("run_kind") == "trial"]
    assert len(parent) == 1 and len(children) == 1, [r.data.tags for r in runs]
    parent = parent[0]
    assert children[0].info.status == "FINISHED", children[0].data.tags.get("failure_reason")
    assert parent.data.metrics["data/skipped_files"] == 2
    assert parent.data.metrics["data/skipped/bad_audio"] == 2
    assert all(u in parent.data.tags["data_skipped_paths"] for u in bad)
    downloads = tmp_path / "artifacts"
    listing = Path(client.download_artifacts(parent.info.run_id, "data/skipped_files.tsv", str(downloads / "tsv")))
    assert all(u in listing.read_text() for u in bad)
    assert "skipped" in job["logs"] and all(u in job["logs"] for u in bad)

    # Secrets: neither the S3 secret key nor the database password is in MLflow or in Ray's logs.
    secrets = {"AWS_SECRET_ACCESS_KEY": env["AWS_SECRET_ACCESS_KEY"], "PGPASSWORD": env["PGPASSWORD"]}
    found: list[str] = []
    for run in runs:
        text = json.dumps({"params": run.data.params, "tags": run.data.tags, "metrics": sorted(run.data.metrics),
                           "name": run.info.run_name}).encode()
        found += [f"run {run.info.run_id} params/tags/metrics: {n}" for n in _leaks(text, secrets)]
        folder = Path(client.download_artifacts(run.info.run_id, "", str(downloads / run.info.run_id)))
        files = list(_files_under(folder))
        if run is parent:
            assert {"spec.yaml", "resolved_config.yaml", "report.md", "skipped_files.tsv"} <= {p.name for p in files}
        for path in files:
            found += [f"artifact {path}: {n}" for n in _leaks(path.read_bytes(), secrets)]
    found += [f"job logs / info: {n}" for n in _leaks(json.dumps(job).encode(), secrets)]
    # Every node's Ray temp folder: the head's, and the worker nodes' (their own, "-w<i>", or the head's).
    state = json.loads((stack["dir"] / "state.json").read_text())
    ray_dirs = {Path(state["ray_dir"])} | {Path(f"{state['ray_dir']}-w{i}") for i in range(int(state.get("ray_workers", 1)))}
    logs = [p for d in sorted(ray_dirs) if d.is_dir() for p in _files_under(d) if "/logs/" in str(p)]
    assert any(p.name.startswith("job-driver-") for p in logs), "the job driver's log is under the Ray session"
    for path in logs:
        try:
            blob = path.read_bytes()
        except OSError:
            continue
        found += [f"Ray log {path}: {n}" for n in _leaks(blob, secrets)]
    assert not found, "\n".join(found[:20])


def _sweep_cli(spec: Path, env: dict, ray_tmp: Path) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "orchestrator.sweep", str(spec)], cwd=spec.parent,
                          env=dict(env, RAY_TMPDIR=str(ray_tmp), PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=300)
    return proc, time.monotonic() - start


def _assert_one_line_before_ray(proc, spec: Path, ray_tmp: Path, *needles: str) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: {spec}: data.root=s3://"), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not list(ray_tmp.glob("ray/session_*")) and not list(ray_tmp.glob("session_*")), "Ray started"
    return lines[0]


def test_wrong_keys_then_stopped_s3_fail_before_any_trial(stack, s3_corpus, tmp_path):  # noqa: F811
    env = dict(os.environ, **stack["env"])
    env.pop("RAY_ADDRESS", None)
    corpus, _ = s3_corpus
    spec = _spec(tmp_path, corpus, f"sqlite:///{tmp_path / 'mlflow.db'}", "faults")
    ray_tmp = Path(tempfile.mkdtemp(prefix="rf", dir="/tmp"))
    try:
        wrong = dict(env, AWS_SECRET_ACCESS_KEY="not-the-secret-key-0000")
        proc, _ = _sweep_cli(spec, wrong, ray_tmp)
        line = _assert_one_line_before_ray(proc, spec, ray_tmp, "AWS_SECRET_ACCESS_KEY")
        assert "refused" in line, line

        # Stop the S3 server (by the pids the stack recorded); the same sweep now fails in seconds.
        stack_mod = _stack_module()
        state = json.loads((stack["dir"] / "state.json").read_text())
        stack_mod._stop_service("s3", state["services"]["s3"])
        proc, seconds = _sweep_cli(spec, env, ray_tmp)
        line = _assert_one_line_before_ray(proc, spec, ray_tmp, "cannot reach endpoint", "S3 server is running")
        assert seconds < 60, f"{seconds:.0f} s to fail"
        assert not (tmp_path / "runs" / "sweeps").exists() or not any((tmp_path / "runs" / "sweeps").iterdir())
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)

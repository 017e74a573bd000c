"""Start-up checks (orchestrator/preflight.py): S3 on a moto server, MLflow on closed ports, the
corpus report logged to a real MLflow store, and the CLI's one-line exit 2.

Fast: moto runs in-process on 127.0.0.1 at a free port; nothing else is started.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml

from orchestrator.preflight import PreflightError, check_data, check_s3, check_services, check_tracking_uri
from orchestrator.spec import load_spec
from tests.conftest import free_port
from tests.test_corpus import _aws_env, make_corpus

REPO = Path(__file__).resolve().parent.parent
SPEC = "sweep.yaml"
_buckets = itertools.count()


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


def write_spec(tmp: Path, root: str, *, tracking: str | None = None, storage: str | None = None) -> Path:
    spec = {
        "sweep": {"name": "pf", "num_trials": 1, "sampler": "grid", "scheduler": {"type": "fifo"}},
        "search": {"finetune.head_lr": {"values": [0.001]}},
        "preset": "cpu",
        "data": {"root": root, "generate": False, "cache_dir": str(tmp / "cache"), "train_subsets": ["train-clean-100"],
                 "dev_subsets": ["dev-clean"], "test_subsets": ["test-clean"]},
        "tracking": {"uri": tracking or f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "pf"},
        "storage": {"path": storage or str(tmp / "runs")},
    }
    path = tmp / SPEC
    path.write_text(yaml.safe_dump(spec))
    return path


def upload(local: Path, uri: str) -> None:
    from orchestrator.data.librispeech import upload_corpus

    upload_corpus(local, uri, create_bucket=True)


@pytest.fixture
def s3_env(moto_endpoint, monkeypatch, tmp_path):
    _aws_env(monkeypatch, tmp_path, moto_endpoint)
    monkeypatch.setenv("POM_ABLATIONS_CACHE", str(tmp_path / "default-cache"))
    return moto_endpoint


@pytest.fixture
def s3_corpus(s3_env, tmp_path):
    local = tmp_path / "LibriSpeech"
    for subset in ("train-clean-100", "dev-clean", "test-clean"):
        make_corpus(local, subset)
    bucket = f"pf-{next(_buckets)}"
    upload(local, f"s3://{bucket}/LibriSpeech")
    return local, bucket


# -- S3 ----------------------------------------------------------------------------------------


def test_good_s3_root_and_storage_pass_and_leave_nothing(s3_corpus, tmp_path):
    from orchestrator.data import s3

    _, bucket = s3_corpus
    spec = load_spec(write_spec(tmp_path, f"s3://{bucket}/LibriSpeech", storage=f"s3://{bucket}/runs"))
    check_services(spec)
    keys = [o.key for o in s3.list_objects(bucket, "")]
    assert not [k for k in keys if ".preflight" in k], keys  # the write probe deletes its marker


def test_wrong_credentials(s3_corpus, tmp_path, monkeypatch):
    from moto.core.authorization import enable_iam_authentication

    _, bucket = s3_corpus
    spec = load_spec(write_spec(tmp_path, f"s3://{bucket}/LibriSpeech"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    with enable_iam_authentication(), pytest.raises(PreflightError) as err:
        check_services(spec)
    text = one_line(err)
    assert text.startswith(f"{spec.source}: data.root=s3://{bucket}/LibriSpeech: ")
    assert "InvalidAccessKeyId" in text and "AWS_ACCESS_KEY_ID" in text and "wrong-secret" not in text


def test_missing_bucket_and_empty_prefix(s3_corpus, tmp_path):
    _, bucket = s3_corpus
    with pytest.raises(PreflightError) as err:
        check_s3("s3://no-such-bucket-pf/LibriSpeech", source=SPEC, field_name="data.root", need_objects=True,
                 writable=False)
    text = one_line(err)
    assert text.startswith(f"{SPEC}: data.root=s3://no-such-bucket-pf/LibriSpeech: ")
    assert "bucket 'no-such-bucket-pf' does not exist" in text and "create the bucket" in text

    with pytest.raises(PreflightError) as err:
        check_s3(f"s3://{bucket}/NoCorpusHere", source=SPEC, field_name="data.root", need_objects=True, writable=False)
    text = one_line(err)
    assert f"no objects under s3://{bucket}/NoCorpusHere/" in text and "upload" in text

    # Storage may start empty, but its bucket must exist.
    check_s3(f"s3://{bucket}/fresh-storage", source=SPEC, field_name="storage.path", need_objects=False, writable=True)
    with pytest.raises(PreflightError) as err:
        check_s3("s3://no-such-bucket-pf/runs", source=SPEC, field_name="storage.path", need_objects=False,
                 writable=True)
    assert one_line(err).startswith(f"{SPEC}: storage.path=s3://no-such-bucket-pf/runs: ")


def test_unreachable_s3_fails_in_seconds(s3_env, monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    start = time.monotonic()
    with pytest.raises(PreflightError) as err:
        check_s3("s3://corpus/LibriSpeech", source=SPEC, field_name="data.root", need_objects=True, writable=False)
    assert time.monotonic() - start < 15
    text = one_line(err)
    assert "cannot reach endpoint" in text and "S3 server is running" in text


# -- MLflow ------------------------------------------------------------------------------------


def test_tracking_server_on_a_closed_port(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(PreflightError) as err:
        check_tracking_uri(uri, source=SPEC)
    assert time.monotonic() - start < 10
    text = one_line(err)
    assert text.startswith(f"{SPEC}: tracking.uri={uri}: the MLflow tracking server does not answer")
    assert "MLFLOW_TRACKING_URI" in text


def test_tracking_server_uri_with_a_password_is_masked():
    uri = f"http://user:pa55-w0rd@127.0.0.1:{free_port()}/prefix"
    with pytest.raises(PreflightError) as err:
        check_tracking_uri(uri, source=SPEC)
    text = one_line(err)
    assert "pa55-w0rd" not in text and "user:***@127.0.0.1" in text and "does not answer" in text


def test_tracking_server_that_answers(tmp_path):
    """A real HTTP server: /health OK passes; a 500 on /health is one line."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        status = 200

        def do_GET(self):  # noqa: N802
            self.send_response(Handler.status)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        uri = f"http://127.0.0.1:{server.server_address[1]}"
        check_tracking_uri(uri, source=SPEC)
        Handler.status = 500
        with pytest.raises(PreflightError) as err:
            check_tracking_uri(uri, source=SPEC)
        assert "HTTP 500" in one_line(err)
    finally:
        server.shutdown()
        server.server_close()


def test_tracking_database_unreachable_hides_the_password(tmp_path):
    uri = f"postgresql+psycopg2://mlflow:s3cr3t-pw@127.0.0.1:{free_port()}/mlflow"
    with pytest.raises(PreflightError) as err:
        check_tracking_uri(uri, source=SPEC)
    text = one_line(err)
    assert "s3cr3t-pw" not in text and "mlflow:***@" in text and "cannot connect to the tracking database" in text


def test_tracking_sqlite_folder_missing(tmp_path):
    check_tracking_uri(f"sqlite:///{tmp_path / 'ok.db'}", source=SPEC)
    with pytest.raises(PreflightError) as err:
        check_tracking_uri(f"sqlite:///{tmp_path / 'nope' / 'mlflow.db'}", source=SPEC)
    assert "does not exist" in one_line(err)


def test_cli_exits_2_with_one_line_before_ray(tmp_path):
    spec = write_spec(tmp_path, str(tmp_path / "corpus"), tracking=f"http://127.0.0.1:{free_port()}")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "orchestrator.sweep", str(spec)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {spec}: tracking.uri=http://127.0.0.1:"), proc.stderr
    assert "Traceback" not in proc.stderr and "ray" not in proc.stdout.lower()
    assert time.monotonic() - start < 60


# -- corrupt audio in an S3 corpus -> MLflow ------------------------------------------------------


def corrupt(local: Path) -> list[str]:
    """Three ways a FLAC goes bad: not audio at all, truncated (valid header), zero bytes."""
    files = sorted((local / "train-clean-100").rglob("*.flac"))
    garbage, truncated, empty = files[0], files[1], files[2]
    garbage.write_bytes(b"this is not a flac file" * 20)
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    empty.write_bytes(b"")
    return [p.relative_to(local).as_posix() for p in (garbage, truncated, empty)]


def test_corrupt_s3_audio_is_skipped_counted_and_logged_to_mlflow(s3_env, tmp_path):
    from mlflow.tracking import MlflowClient

    from orchestrator.tracking import Tracker

    local = tmp_path / "LibriSpeech"
    for subset in ("train-clean-100", "dev-clean", "test-clean"):
        make_corpus(local, subset)
    bad = corrupt(local)
    sf.write(local / "train-clean-100" / "19" / "198" / "19-198-0002.flac",
             (0.1 * np.ones(8000)).astype(np.float32), 16000)  # one more valid file (no transcript line)
    bucket = f"pf-{next(_buckets)}"
    upload(local, f"s3://{bucket}/LibriSpeech")
    spec = load_spec(write_spec(tmp_path, f"s3://{bucket}/LibriSpeech"))

    report = check_data(spec)
    bad_uris = sorted(f"s3://{bucket}/LibriSpeech/{rel}" for rel in bad)
    assert sorted(s.path for _, s in report.skipped if s.kind == "bad_audio") == bad_uris
    assert report.counts() == {"bad_audio": 3, "no_transcript": 1}
    assert report.kept["train-clean-100"] == 1 and report.kept["dev-clean"] == 4

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker.open(uri, "pf")
    run_id = tracker.sweep_run("pf-1", "pf-1")
    report.log_to(tracker, run_id, tmp_path)

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.data.metrics["data/skipped_files"] == 4
    assert run.data.metrics["data/skipped/bad_audio"] == 3
    assert run.data.metrics["data/skipped_files/train-clean-100"] == 4
    assert run.data.metrics["data/skipped_files/dev-clean"] == 0
    assert run.data.tags["data_skipped_files"] == "4"
    assert all(u in run.data.tags["data_skipped_paths"] for u in bad_uris)
    listing = Path(client.download_artifacts(run_id, "data/skipped_files.tsv", str(tmp_path / "dl"))).read_text()
    for u in bad_uris:
        assert u in listing
    assert "truncated or corrupt" in listing and "empty file" in listing and "not a readable audio file" in listing


def test_corpus_with_no_usable_subset_is_one_line(s3_env, tmp_path):
    local = tmp_path / "LibriSpeech"
    for subset in ("train-clean-100", "dev-clean"):
        make_corpus(local, subset)
    bucket = f"pf-{next(_buckets)}"
    upload(local, f"s3://{bucket}/LibriSpeech")
    spec = load_spec(write_spec(tmp_path, f"s3://{bucket}/LibriSpeech"))  # test-clean is missing
    with pytest.raises(PreflightError) as err:
        check_data(spec)
    text = one_line(err)
    assert text.startswith(f"{spec.source}: data.root=s3://{bucket}/LibriSpeech: ") and "'test-clean' not found" in text


# -- secrets ---------------------------------------------------------------------------------------


def test_uri_passwords_never_reach_mlflow(tmp_path):
    """A password inside a URI (command line tag, parameter, spec artifact) is hidden before MLflow sees it."""
    from mlflow.tracking import MlflowClient

    from orchestrator.tracking import Tracker

    secret = "Sup3r-s3cret_pw"
    db_uri = f"postgresql+psycopg2://mlflow:{secret}@127.0.0.1:5432/mlflow"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker.open(uri, "secrets")
    run_id = tracker.sweep_run("s-1", "s-1", tags={"command": f"python -m orchestrator.sweep x.yaml --tracking-uri {db_uri}"})
    tracker.log_params(run_id, {"tracking": {"uri": db_uri}, "data": {"root": "s3://corpus/synth"}})
    tracker.log_params(run_id, {"tracking": {"uri": db_uri}})  # logging it again is not a conflict
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"tracking": {"uri": db_uri}, "data": {"root": "s3://corpus/synth"}}))
    tracker.log_artifact(run_id, str(spec), "spec")
    assert secret in spec.read_text()  # the user's own file is left alone

    run = MlflowClient(tracking_uri=uri).get_run(run_id)
    assert secret not in repr(run.data.tags) and secret not in repr(run.data.params)
    assert run.data.params["tracking.uri"] == "postgresql+psycopg2://mlflow:***@127.0.0.1:5432/mlflow"
    assert run.data.params["data.root"] == "s3://corpus/synth"
    got = Path(MlflowClient(tracking_uri=uri).download_artifacts(run_id, "spec/spec.yaml", str(tmp_path / "dl"))).read_text()
    assert secret not in got and "mlflow:***@127.0.0.1" in got


def test_ray_tune_no_longer_copies_aws_credentials_into_runtime_envs(monkeypatch):
    """Ray Tune puts the driver's AWS keys into each trial actor's runtime_env, which Ray's runtime-env
    agent logs in plain text; after preflight it does not (trials use their node's credentials)."""
    from ray.tune.execution import class_cache

    from orchestrator.preflight import keep_credentials_out_of_ray

    monkeypatch.setattr(class_cache, "ENV_VARS_TO_PROPAGATE", class_cache.ENV_VARS_TO_PROPAGATE)  # restored after
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEEXAMPLE00")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-log-this-secret")

    class Trainable:
        pass

    def runtime_env() -> dict:
        remote = class_cache._ActorClassCache().get(Trainable)
        return remote._default_options["runtime_env"]

    assert runtime_env()["env_vars"].get("AWS_SECRET_ACCESS_KEY") == "do-not-log-this-secret"  # Ray's default
    keep_credentials_out_of_ray()
    env_vars = runtime_env()["env_vars"]
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(env_vars), env_vars


def test_preflight_does_not_import_the_tuner():
    """The tuner calls the preflight; the preflight never reaches back (no import cycle)."""
    import ast

    tree = ast.parse((REPO / "orchestrator" / "preflight.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    assert not imported & {"orchestrator.tuner", "orchestrator.sweep", "orchestrator.driver"}, imported

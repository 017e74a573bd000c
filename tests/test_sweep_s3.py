"""A sweep with ``storage.path: s3://...`` (an in-process moto S3 server): everything durable in
S3, and ``--resume`` after a SIGKILL of the driver works from S3 alone -- the resumed sweep runs
with an empty working folder, as on another machine.

Slow: real Ray, real training of a micro model, as in tests/test_sweep.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.conftest import free_port
from tests.test_sweep import mlflow_runs, ray_env, run_sweep_cmd, stop_ray_started_under, sweep_spec

pytestmark = pytest.mark.slow


@pytest.fixture
def s3_server(tmp_path):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "sweep-s3-secret", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": str(tmp_path / "none"),
           "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "NO_PROXY": "127.0.0.1,localhost"}
    import boto3

    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="sweep-s3-secret")
    client.create_bucket(Bucket="runs")
    try:
        yield env, client
    finally:
        server.stop()


def _objects(client, prefix: str) -> dict[str, object]:
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket="runs", Prefix=prefix):
        out.update({o["Key"]: o["LastModified"] for o in page.get("Contents", [])})
    return out


def test_s3_sweep_resumes_from_s3_after_driver_sigkill(small_corpus, tmp_path, s3_server):
    aws, client = s3_server
    spec = sweep_spec(small_corpus, tmp_path, name="s3resume",
                      search={"finetune.head_lr": {"values": [0.001, 0.002]}}, num_trials=2)
    spec["storage"] = {"path": "s3://runs/team"}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))

    env, ray_tmp = ray_env(tmp_path)
    env.update(aws, POM_WORK_DIR=str(tmp_path / "node-a"))
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.sweep", str(path)], cwd=tmp_path, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    done_keys: dict[str, object] = {}
    try:
        deadline = time.time() + 900
        while time.time() < deadline and proc.poll() is None and not done_keys:
            for key, modified in _objects(client, "team/sweeps/").items():
                if key.endswith("/trial.json"):
                    state = json.loads(client.get_object(Bucket="runs", Key=key)["Body"].read())
                    if state.get("status") == "done":
                        done_keys[key] = modified
            time.sleep(1.0)
        assert done_keys, (tmp_path / "first.log").read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        stop_ray_started_under(ray_tmp)

    # Another machine: an empty working folder; only S3 and MLflow know the sweep.
    env, ray_tmp = ray_env(tmp_path)
    env.update(aws, POM_WORK_DIR=str(tmp_path / "node-b"))
    try:
        resumed = run_sweep_cmd(path, env, "--resume")
    finally:
        stop_ray_started_under(ray_tmp)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]

    _, runs = mlflow_runs(tmp_path / "mlflow.db")
    parents = [r for r in runs if r.data.tags.get("run_kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("run_kind") == "trial"]
    assert len(parents) == 1 and len(children) == 2, [r.data.tags for r in runs]
    assert all(c.info.status == "FINISHED" for c in children)
    assert parents[0].data.tags["storage"] == "s3://runs/team"

    objects = _objects(client, "team/")
    for key, modified in done_keys.items():  # the finished trial was not run again
        assert objects[key] == modified
    sweep = next(k for k in objects if k.endswith("/sweep.json")).rsplit("/", 1)[0]
    assert f"{sweep}/report.md" in objects and any(k.startswith(f"{sweep}/tune/") for k in objects)
    assert len([k for k in objects if k.endswith("/final_metrics.json")]) == 2
    assert any("/run/finetune/checkpoints/step-" in k and k.endswith("/_COMPLETE.json") for k in objects)
    assert len([k for k in objects if k.endswith("/pretrain.done.json")]) == 1, "pre-trained once, reused"
    assert not (tmp_path / "runs").exists(), "nothing written to a local storage folder"
    # No secret in MLflow.
    for run in runs:
        assert "sweep-s3-secret" not in json.dumps({**run.data.params, **run.data.tags})

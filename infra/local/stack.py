"""A local stack that mirrors a cluster: PostgreSQL, S3 (SeaweedFS), MLflow and a Ray cluster.

Usage:
    infra/local/stack.sh up          # start everything, write .stack/env, wait until it answers
    infra/local/stack.sh status      # one line per service
    infra/local/stack.sh down        # stop exactly what `up` started (data is kept)
    infra/local/stack.sh down --purge   # ... and delete the state folder
    set -a; . .stack/env; set +a     # then: ray job submit, mlflow, boto3, psycopg2 all just work

Every TCP socket of the stack is bound to 127.0.0.1 (measured with `ss -ltnp` on the stack's
processes after `up` and while a job ran; Ray's gRPC servers show as [::ffff:127.0.0.1], a
dual-stack socket that accepts loopback only). In brackets, the keys of state.json's "ports"::

    PostgreSQL         [postgres]; a Unix socket in pg/run/
    SeaweedFS          [s3] the S3 API; master, volume, filer, admin, each http and gRPC [weed_*];
                       Unix sockets s3/filer.sock, s3/s3.sock
    MLflow             [mlflow]
    Ray, head only     GCS [ray_gcs], dashboard and job API [ray_dashboard], Ray client server
                       [ray_client], Prometheus metrics of the dashboard and the autoscaler
                       [ray_dashboard_metrics], [ray_autoscaler_metrics]
    Ray, every node    raylet [N_nm], object manager [N_om], dashboard agent http and gRPC
    (N: head, w0 ...)  [N_agent], [N_agent_grpc], runtime-env agent [N_rtenv], metrics export
                       [N_metrics], one port per worker process (job drivers, actors, tasks) in
                       N_wmin .. N_wmin + 99; Unix sockets (raylet, object store) in the Ray folder

Ray binds its servers to 127.0.0.1 only when the node's address is 127.0.0.1 (any other address:
all interfaces), and `ray start` turns --node-ip-address=127.0.0.1 into the machine's address
unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, with which it refuses worker nodes: the stack starts
its nodes through ray_start_loopback (below), and the env file carries that variable so that
ray.init(address=...) keeps 127.0.0.1 too. So no other machine can join or reach this cluster.

Ports are free ones picked at `up` (the Ray dashboard prefers 8265), or fixed with STACK_PG_PORT, STACK_S3_PORT, STACK_MLFLOW_PORT, STACK_RAY_PORT,
STACK_RAY_DASHBOARD_PORT. Other settings: STACK_DIR (state folder, default <repo>/.stack),
STACK_RAY_WORKERS (worker nodes, default 1), STACK_RAY_HEAD_CPUS (1), STACK_RAY_WORKER_CPUS (2),
STACK_RAY_OBJECT_STORE_MB (256 per node), STACK_S3_BUCKETS (corpus,mlflow,runs), PG_BIN
(/usr/lib/postgresql/15/bin), STACK_TIMEOUT_S (120).

State folder::

    state.json   ports, and for each service the session id and the (pid, start time) it started
    env          the variables clients need (mode 0600; holds the local credentials)
    secrets.json database password, S3 keys, Ray token (mode 0600; reused by the next `up`)
    pg/          data/ (owned by postgres), run/ (socket), log; when root runs the stack from a folder
                 user postgres cannot reach (a parent of mode 0700), this folder is a private
                 /tmp/stack-pg-XXXXXXXX owned by postgres instead (state.json "pg_dir"; `up` says so,
                 `down --purge` deletes it)
    s3/          data/, s3.json (identities)
    ray/         Ray's temp dir (sessions, logs); its path names every Ray process of this stack
    logs/        one log per service

Each service is started in a new session (setsid). `down` signals the processes of those
sessions, plus any process whose command line names this stack's Ray folder, plus the recorded
pids whose start time still matches: nothing else, never by program name, never `ray stop`.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv's bin: weed, mlflow, ray
PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))
HOST = "127.0.0.1"
SERVICES = ("postgres", "s3", "ray", "mlflow")  # start order; stopped in reverse
# Ray binds its servers (GCS, raylet, object manager, workers, agents, metrics) to 127.0.0.1 only
# when the node's address is 127.0.0.1; otherwise to all interfaces. `ray start` replaces a
# loopback --node-ip-address with the machine's address unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0,
# and with that variable it refuses to start a worker node (a guard for macOS/Windows).
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
PG_TMP_PREFIX = "stack-pg-"  # PostgreSQL's folder in /tmp when the state folder is out of its reach


class StackError(RuntimeError):
    pass


# ---------------------------------------------------------------- small helpers


def state_dir() -> Path:
    return Path(os.environ.get("STACK_DIR", REPO / ".stack")).absolute()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise StackError(f"{name}={value!r} is not an integer") from None


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT after `down` is free
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def pick_ports(names: list[str], fixed: dict[str, int], preferred: dict[str, int]) -> dict[str, int]:
    """A distinct port per name: fixed ones as given, preferred ones when free, else kernel-picked free ones."""
    ports: dict[str, int] = {}
    held: list[socket.socket] = []
    try:
        for name in names:
            if name in fixed:
                if not _port_free(fixed[name]):
                    raise StackError(f"port {fixed[name]} for {name} is in use on {HOST}: pick another one")
                ports[name] = fixed[name]
                continue
            want = preferred.get(name)
            if want and want not in ports.values() and _port_free(want):
                ports[name] = want
                continue
            s = socket.socket()
            s.bind((HOST, 0))  # held open until all are chosen, so no two names get the same port
            held.append(s)
            ports[name] = s.getsockname()[1]
    finally:
        for s in held:
            s.close()
    return ports


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def _proc_stat(pid: int) -> tuple[int, int, int] | None:
    """(ppid, session id, start time) of a live process, or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    if fields[0] == "Z":
        return None  # a zombie is gone for our purposes
    return int(fields[1]), int(fields[3]), int(fields[19])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _alive(pid: int, start: int | None = None) -> bool:
    st = _proc_stat(pid)
    return st is not None and (start is None or st[2] == start)


def service_pids(svc: dict, marker: str | None = None) -> dict[int, int]:
    """pid -> start time of every live process of one service: its session, its marker, its recorded pids."""
    found: dict[int, int] = {}
    stats = {pid: st for pid in _all_pids() if (st := _proc_stat(pid)) is not None}
    # A session id stays ours while its members live (the kernel does not reuse it); once all are
    # gone, a new process with that pid could lead a foreign session: its start time tells.
    sids = {sid for sid, start in svc.get("sids", []) if sid not in stats or stats[sid][2] == start}
    for pid, st in stats.items():
        if st[1] in sids or (marker and marker in _cmdline(pid)):
            found[pid] = st[2]
    for pid, start in svc.get("pids", []):
        if _alive(pid, start):
            found[pid] = start
    # Descendants too: PostgreSQL's backends (and some Ray workers) start sessions of their own.
    grew = True
    while grew:
        grew = False
        for pid, st in stats.items():
            if pid not in found and st[0] in found:
                found[pid] = st[2]
                grew = True
    found.pop(os.getpid(), None)
    return found


def _sid(pid: int) -> list[int]:
    """[session id, start time of its leader] for a session we created."""
    st = _proc_stat(pid)
    return [pid, st[2] if st else -1]


def _spawn(cmd: list[str], log: Path, env: dict[str, str] | None = None, user: str | None = None) -> subprocess.Popen:
    """Start a command in a new session, output appended to log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    if user:
        cmd = _as_user(user, cmd)
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True, cwd=str(log.parent))


def _as_user(user: str, cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd  # a non-root user runs PostgreSQL as itself
    return ["runuser", "-u", user, "--", *cmd]


def _run(cmd: list[str], env: dict[str, str] | None = None, user: str | None = None, timeout: float = 60) -> str:
    if user:
        cmd = _as_user(user, cmd)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        tail = " ".join((proc.stderr or proc.stdout).split())[-600:]
        raise StackError(f"{' '.join(cmd[:4])} ... failed (exit {proc.returncode}): {tail}")
    return proc.stdout


def _wait(what: str, probe, deadline: float, log: Path | None = None) -> None:
    last = ""
    while time.monotonic() < deadline:
        try:
            if probe():
                return
        except Exception as err:  # noqa: BLE001 - any failure means "not ready yet"
            last = " ".join(str(err).split())[:300]
        time.sleep(0.5)
    hint = f"; see {log}" if log else ""
    raise StackError(f"{what} did not answer in time{(': ' + last) if last else ''}{hint}")


# ---------------------------------------------------------------- service probes


def pg_ready(st: dict) -> bool:
    proc = subprocess.run([str(PG_BIN / "pg_isready"), "-h", HOST, "-p", str(st["ports"]["postgres"]), "-t", "2"],
                          capture_output=True, timeout=10)
    return proc.returncode == 0


def _s3_client(st: dict, sec: dict):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=f"http://{HOST}:{st['ports']['s3']}", region_name="us-east-1",
                        aws_access_key_id=sec["s3_access_key"], aws_secret_access_key=sec["s3_secret_key"],
                        config=Config(connect_timeout=2, read_timeout=5, retries={"max_attempts": 1}))


def s3_ready(st: dict, sec: dict) -> bool:
    _s3_client(st, sec).list_buckets()
    return True


def mlflow_ready(st: dict) -> bool:
    with urllib.request.urlopen(f"http://{HOST}:{st['ports']['mlflow']}/health", timeout=3) as r:
        return r.status == 200


def ray_nodes(st: dict, env: dict[str, str]) -> int:
    """Alive nodes according to `ray status` (token auth through env)."""
    proc = subprocess.run([str(BIN / "ray"), "status", "--address", f"{HOST}:{st['ports']['ray_gcs']}"],
                          capture_output=True, text=True, env=env, timeout=60)
    if proc.returncode != 0:
        raise StackError(" ".join((proc.stderr or proc.stdout).split())[-300:])
    active = proc.stdout.split("Active:", 1)[-1].split("Pending:", 1)[0]
    return sum(1 for line in active.splitlines() if "node_" in line)


def dashboard_ready(st: dict, sec: dict) -> bool:
    req = urllib.request.Request(f"http://{HOST}:{st['ports']['ray_dashboard']}/api/jobs/",
                                 headers={"Authorization": f"Bearer {sec['ray_token']}"})
    with urllib.request.urlopen(req, timeout=3) as r:
        return r.status == 200


# ---------------------------------------------------------------- state


def load_state(root: Path) -> tuple[dict, dict]:
    st = json.loads((root / "state.json").read_text()) if (root / "state.json").exists() else {}
    sec = json.loads((root / "secrets.json").read_text()) if (root / "secrets.json").exists() else {}
    return st, sec


def save_state(root: Path, st: dict) -> None:
    _write_private(root / "state.json", json.dumps(st, indent=2) + "\n")


def ray_dir(root: Path) -> Path:
    # Ray puts Unix sockets under its temp dir (path limit 107 bytes): a long state path gets a
    # short private folder in /tmp named after it, recorded in state.json (worker nodes add "-w<i>").
    path = root / "ray"
    if len(str(path)) > 37:
        import hashlib

        path = Path("/tmp") / f"raystack-{hashlib.sha1(str(root).encode()).hexdigest()[:10]}"
    return path


def client_env(st: dict, sec: dict) -> dict[str, str]:
    p = st["ports"]
    return {
        "MLFLOW_TRACKING_URI": f"http://{HOST}:{p['mlflow']}",
        "AWS_ENDPOINT_URL": f"http://{HOST}:{p['s3']}",
        "AWS_ACCESS_KEY_ID": sec["s3_access_key"],
        "AWS_SECRET_ACCESS_KEY": sec["s3_secret_key"],
        "AWS_DEFAULT_REGION": "us-east-1",
        "RAY_ADDRESS": f"http://{HOST}:{p['ray_dashboard']}",  # `ray job submit` / JobSubmissionClient
        "RAY_GCS_ADDRESS": f"{HOST}:{p['ray_gcs']}",          # ray.init(address=...) / --address
        "RAY_DASHBOARD_URL": f"http://{HOST}:{p['ray_dashboard']}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(Path(st["dir"]) / "ray_token"),
        "PGHOST": HOST,
        "PGPORT": str(p["postgres"]),
        "PGUSER": "mlflow",
        "PGDATABASE": "mlflow",
        "PGPASSWORD": sec["pg_password"],
        "STACK_S3_BUCKETS": ",".join(st["buckets"]),
        "STACK_DIR": st["dir"],
        **LOOPBACK_ENV,  # ray.init(address="127.0.0.1:...") must not turn it into the machine's address
    }


def write_env(root: Path, env: dict[str, str]) -> None:
    lines = ["# written by infra/local/stack.sh up; load with: set -a; . .stack/env; set +a"]
    lines += [f"{k}={_shell_quote(v)}" for k, v in env.items()]
    _write_private(root / "env", "\n".join(lines) + "\n")


def _shell_quote(value: str) -> str:
    return value if all(c.isalnum() or c in "-_./:@,=+" for c in value) else "'" + value.replace("'", "'\\''") + "'"


# ---------------------------------------------------------------- up


def _secrets(root: Path, sec: dict) -> dict:
    if not sec:
        sec = {
            "pg_password": secrets.token_urlsafe(24),
            "s3_access_key": "stack" + secrets.token_hex(8),
            "s3_secret_key": secrets.token_urlsafe(30),
            "ray_token": secrets.token_hex(32),
        }
        _write_private(root / "secrets.json", json.dumps(sec, indent=2) + "\n")
    _write_private(root / "ray_token", sec["ray_token"])
    return sec


def _postgres_reaches(path: Path) -> bool:
    """Whether user postgres can write to path (every parent folder traversable)."""
    return subprocess.run(["runuser", "-u", "postgres", "--", "test", "-w", str(path)], capture_output=True,
                          timeout=30, stdin=subprocess.DEVNULL).returncode == 0


def pg_home(root: Path, previous: str | None = None) -> Path:
    """PostgreSQL's folder (data/, run/, log): <state>/pg, or, when root runs the stack from a
    folder that user postgres cannot reach (a parent of mode 0700), a private folder in /tmp
    owned by postgres, recorded in state.json as pg_dir and deleted by `down --purge`."""
    pg = root / "pg"
    if os.geteuid() != 0:
        return pg  # PostgreSQL runs as the invoking user
    if previous and Path(previous).is_dir():
        return Path(previous)  # the data of an earlier `up`
    pg.mkdir(parents=True, exist_ok=True)
    shutil.chown(pg, "postgres", "postgres")
    os.chmod(pg, 0o700)
    if _postgres_reaches(pg):
        return pg
    if not any(pg.iterdir()):
        pg.rmdir()
    home = Path(tempfile.mkdtemp(prefix=PG_TMP_PREFIX, dir="/tmp"))
    shutil.chown(home, "postgres", "postgres")
    print(f"note: user postgres cannot reach {root} (a parent folder is private), so PostgreSQL's data is in "
          f"{home} (kept by `down`, deleted by `down --purge`, lost at reboot); "
          "set STACK_DIR to a folder outside private ones to keep it with the rest")
    return home


def _start_postgres(root: Path, st: dict, sec: dict, deadline: float) -> None:
    if not (PG_BIN / "pg_ctl").exists():
        raise StackError(f"PostgreSQL server binaries not found in {PG_BIN}: apt-get install -y postgresql-15 (or set PG_BIN)")
    pg = pg_home(root, st.get("pg_dir"))
    st["pg_dir"] = str(pg)
    data, run = pg / "data", pg / "run"
    for d in (pg, run):
        d.mkdir(parents=True, exist_ok=True)
    user = "postgres" if os.geteuid() == 0 else None
    if user:
        shutil.chown(pg, "postgres", "postgres")
        shutil.chown(run, "postgres", "postgres")
        os.chmod(pg, 0o700)
    fresh = not (data / "PG_VERSION").exists()
    if fresh:
        pwfile = pg / "pwfile"
        _write_private(pwfile, sec["pg_password"] + "\n")
        if user:
            shutil.chown(pwfile, "postgres", "postgres")
        try:
            _run([str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--pwfile", str(pwfile),
                  "--auth-local=scram-sha-256", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync"],
                 user=user, timeout=120)
        finally:
            pwfile.unlink(missing_ok=True)
    log = pg / "log"
    opts = f"-c listen_addresses={HOST} -p {st['ports']['postgres']} -k {run} -c max_connections=50 -c shared_buffers=32MB"
    # pg_ctl forks the postmaster; start it in a new session so `down` can find the whole server.
    proc = subprocess.run(_as_user("postgres", [str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", opts,
                                                "-w", "-t", "60", "start"]),
                          capture_output=True, text=True, start_new_session=True, timeout=90, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise StackError(f"pg_ctl start failed: {' '.join(proc.stderr.split())[-300:]}; see {log}")
    pid = int((data / "postmaster.pid").read_text().split()[0])
    pst = _proc_stat(pid)
    st["services"]["postgres"] = {"sids": [_sid(pst[1])], "pids": [], "data": str(data), "user": user}
    _wait("PostgreSQL", lambda: pg_ready(st), deadline, log)
    if fresh:
        env = dict(os.environ, PGPASSWORD=sec["pg_password"])
        psql = [str(PG_BIN / "psql"), "-h", HOST, "-p", str(st["ports"]["postgres"]), "-U", "postgres", "-v", "ON_ERROR_STOP=1", "-q"]
        # The password travels on stdin, never on a command line.
        sql = (f"CREATE ROLE mlflow LOGIN PASSWORD '{sec['pg_password']}';\n"
               "CREATE DATABASE mlflow OWNER mlflow;\n")
        proc = subprocess.run([*psql, "-d", "postgres"], input=sql, capture_output=True, text=True, env=env, timeout=60)
        if proc.returncode != 0:
            raise StackError(f"creating the mlflow database failed: {proc.stderr.strip()[-300:]}")


def _start_s3(root: Path, st: dict, sec: dict) -> subprocess.Popen:
    s3 = root / "s3"
    (s3 / "data").mkdir(parents=True, exist_ok=True)
    config = {"identities": [{
        "name": "stack",
        "credentials": [{"accessKey": sec["s3_access_key"], "secretKey": sec["s3_secret_key"]}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}
    _write_private(s3 / "s3.json", json.dumps(config, indent=2))
    p = st["ports"]
    cmd = [
        str(BIN / "weed"), "mini", f"-dir={s3 / 'data'}", f"-ip={HOST}", f"-ip.bind={HOST}",
        "-master.telemetry=false", f"-master.port={p['weed_master']}", f"-master.port.grpc={p['weed_master_grpc']}",
        f"-volume.port={p['weed_volume']}", f"-volume.port.grpc={p['weed_volume_grpc']}",
        f"-filer.port={p['weed_filer']}", f"-filer.port.grpc={p['weed_filer_grpc']}",
        f"-filer.localSocket={s3 / 'filer.sock'}", f"-s3.localSocket={s3 / 's3.sock'}",
        f"-s3.port={p['s3']}", f"-s3.port.grpc={p['weed_s3_grpc']}", "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-s3.config={s3 / 's3.json'}", f"-admin.port={p['weed_admin']}", f"-admin.port.grpc={p['weed_admin_grpc']}",
        "-admin.ui=false", "-webdav=false", "-master.volumeSizeLimitMB=64",
    ]
    # weed mini may also take credentials from AWS_* variables; give it none but its config file.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return _spawn(cmd, root / "logs" / "s3.log", env=env)


def _ray_env(st: dict, sec: dict) -> dict[str, str]:
    env = dict(os.environ)
    env.update(client_env(st, sec))
    env.pop("RAY_ADDRESS", None)  # `ray start --head` must not try to join anything
    env.pop("PGPASSWORD", None)
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_TMPDIR=st["ray_dir"], VIRTUAL_ENV=str(BIN.parent))
    # The head's two Prometheus endpoints default to fixed ports (44227, 44217): free ones instead,
    # so a second stack on the machine gets its own.
    env.update(DASHBOARD_METRIC_PORT=str(st["ports"]["ray_dashboard_metrics"]),
               AUTOSCALER_METRIC_PORT=str(st["ports"]["ray_autoscaler_metrics"]))
    # Job entrypoints run `python ...` on the nodes: that must be this venv's, as on a cluster image.
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def ray_start_loopback(argv: list[str]) -> None:
    """`ray start ARGV` with LOOPBACK_ENV, the worker-node guard lifted for the CLI's check alone.

    Run as `stack.py _ray-start ARGV`: every process it starts inherits LOOPBACK_ENV, so job
    drivers also resolve 127.0.0.1 to 127.0.0.1 (ray.init(address=...)).
    """
    import types

    os.environ.update(LOOPBACK_ENV)
    import ray._private.ray_constants as ray_constants
    from ray.scripts import scripts

    if ray_constants.ENABLE_RAY_CLUSTER:  # read from LOOPBACK_ENV at import: Ray changed how
        raise StackError("this Ray ignores RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER: infra/local/stack.py needs updating")
    scripts.ray_constants = types.SimpleNamespace(**{**vars(ray_constants), "ENABLE_RAY_CLUSTER": True})
    sys.argv = ["ray", "start", *argv]
    scripts.main()


def _start_ray(root: Path, st: dict, sec: dict, deadline: float) -> None:
    p = st["ports"]
    rdir = st["ray_dir"]
    Path(rdir).mkdir(parents=True, exist_ok=True)
    env = _ray_env(st, sec)
    ray = [sys.executable, str(Path(__file__).resolve()), "_ray-start"]
    store = str(_env_int("STACK_RAY_OBJECT_STORE_MB", 256) * 1024 * 1024)
    head = [*ray, "--head", f"--node-ip-address={HOST}", f"--port={p['ray_gcs']}", f"--temp-dir={rdir}",
            "--include-dashboard=true", f"--dashboard-host={HOST}", f"--dashboard-port={p['ray_dashboard']}",
            f"--ray-client-server-port={p['ray_client']}", f"--num-cpus={_env_int('STACK_RAY_HEAD_CPUS', 1)}",
            "--num-gpus=0", f"--object-store-memory={store}", "--disable-usage-stats", *_node_ports(p, "head")]
    log = root / "logs" / "ray-head.log"
    proc = _spawn(head, log, env=env)
    sids = [_sid(proc.pid)]
    # Recorded before anything can fail: `down` (also after a failed `up`) stops what was started.
    st["services"]["ray"] = {"sids": sids, "pids": [], "marker": rdir}
    if proc.wait(timeout=max(5, deadline - time.monotonic())) != 0:
        raise StackError(f"ray start --head failed; see {log}")
    for i in range(st["ray_workers"]):
        wlog = root / "logs" / f"ray-worker{i}.log"
        # Its own temp dir, as on a separate machine: with the head's, the worker's runtime-env
        # agent would delete and re-extract a job's working_dir under the running job driver.
        wdir = f"{rdir}-w{i}"
        Path(wdir).mkdir(parents=True, exist_ok=True)
        worker = [*ray, f"--address={HOST}:{p['ray_gcs']}", f"--node-ip-address={HOST}", f"--temp-dir={wdir}",
                  f"--num-cpus={_env_int('STACK_RAY_WORKER_CPUS', 2)}", "--num-gpus=0", f"--object-store-memory={store}",
                  "--disable-usage-stats", *_node_ports(p, f"w{i}")]
        wproc = _spawn(worker, wlog, env=env)
        sids.append(_sid(wproc.pid))
        if wproc.wait(timeout=max(5, deadline - time.monotonic())) != 0:
            raise StackError(f"ray start (worker {i}) failed; see {wlog}")
    st["services"]["ray"] = {"sids": sids, "pids": [], "marker": rdir}


def _node_ports(p: dict, node: str) -> list[str]:
    return [f"--node-manager-port={p[node + '_nm']}", f"--object-manager-port={p[node + '_om']}",
            f"--dashboard-agent-listen-port={p[node + '_agent']}", f"--dashboard-agent-grpc-port={p[node + '_agent_grpc']}",
            f"--runtime-env-agent-port={p[node + '_rtenv']}", f"--metrics-export-port={p[node + '_metrics']}",
            f"--min-worker-port={p[node + '_wmin']}", f"--max-worker-port={p[node + '_wmin'] + 99}"]


def _start_mlflow(root: Path, st: dict, sec: dict) -> subprocess.Popen:
    p = st["ports"]
    env = dict(os.environ)
    env = {k: v for k, v in env.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    # The database password reaches libpq through PGPASSWORD, so it is on no command line and in
    # no URI MLflow could log; the S3 keys likewise through the standard AWS_* variables.
    env.update(PGPASSWORD=sec["pg_password"], MLFLOW_S3_ENDPOINT_URL=f"http://{HOST}:{p['s3']}",
               AWS_ACCESS_KEY_ID=sec["s3_access_key"], AWS_SECRET_ACCESS_KEY=sec["s3_secret_key"],
               AWS_DEFAULT_REGION="us-east-1")
    cmd = [str(BIN / "mlflow"), "server", "--host", HOST, "--port", str(p["mlflow"]), "--workers", "1",
           "--backend-store-uri", f"postgresql+psycopg2://mlflow@{HOST}:{p['postgres']}/mlflow",
           "--serve-artifacts", "--artifacts-destination", f"s3://{st['buckets'][1]}/mlflow"]
    return _spawn(cmd, root / "logs" / "mlflow.log", env=env)


def _snapshot(st: dict) -> None:
    for name, svc in st["services"].items():
        svc["pids"] = sorted([pid, start] for pid, start in service_pids(svc, svc.get("marker")).items())


def up() -> int:
    t0 = time.monotonic()
    root = state_dir()
    st, sec = load_state(root)
    if st.get("services") and any(service_pids(s, s.get("marker")) for s in st["services"].values()):
        print(f"stack in {root} is already (partly) running:")
        status()
        print("run `infra/local/stack.sh down` first to restart it")
        return 1
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o755)  # postgres must traverse it; the secrets inside are 0600
    sec = _secrets(root, sec)
    workers = _env_int("STACK_RAY_WORKERS", 1)
    fixed = {k: _env_int(v, 0) for k, v in {
        "postgres": "STACK_PG_PORT", "s3": "STACK_S3_PORT", "mlflow": "STACK_MLFLOW_PORT",
        "ray_gcs": "STACK_RAY_PORT", "ray_dashboard": "STACK_RAY_DASHBOARD_PORT"}.items()}
    names = ["postgres", "s3", "mlflow", "ray_gcs", "ray_dashboard", "ray_client", "ray_dashboard_metrics",
             "ray_autoscaler_metrics",
             "weed_master", "weed_volume", "weed_filer", "weed_admin"]
    nodes = ["head"] + [f"w{i}" for i in range(workers)]
    names += [f"{n}_{k}" for n in nodes for k in ("nm", "om", "agent", "agent_grpc", "rtenv", "metrics")]
    ports = pick_ports(names, {k: v for k, v in fixed.items() if v}, {"ray_dashboard": 8265})
    # gRPC ports: SeaweedFS's default is http + 10000; pick free ones instead.
    ports.update(pick_ports(["weed_master_grpc", "weed_volume_grpc", "weed_filer_grpc", "weed_s3_grpc", "weed_admin_grpc"],
                            {}, {}))
    for n in nodes:  # a 100-port range per node for Ray's worker processes
        ports[f"{n}_wmin"] = _free_range(100, set(ports.values()))
    buckets = [b for b in os.environ.get("STACK_S3_BUCKETS", "corpus,mlflow,runs").split(",") if b]
    if len(buckets) < 2:
        raise StackError("STACK_S3_BUCKETS needs at least two buckets: the corpus bucket and the MLflow bucket")
    st = {"dir": str(root), "ports": ports, "buckets": buckets, "ray_workers": workers,
          "ray_dir": str(ray_dir(root)), "services": {}, "started_at": time.time(), "pg_dir": st.get("pg_dir")}
    timeout = _env_int("STACK_TIMEOUT_S", 120)
    deadline = t0 + timeout
    save_state(root, st)
    try:
        s3proc = _start_s3(root, st, sec)
        st["services"]["s3"] = {"sids": [_sid(s3proc.pid)], "pids": []}
        save_state(root, st)
        _start_postgres(root, st, sec, deadline)
        save_state(root, st)
        _wait("S3 (SeaweedFS)", lambda: s3_ready(st, sec), deadline, root / "logs" / "s3.log")
        client = _s3_client(st, sec)
        have = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        for b in buckets:
            if b not in have:
                client.create_bucket(Bucket=b)
        mproc = _start_mlflow(root, st, sec)
        st["services"]["mlflow"] = {"sids": [_sid(mproc.pid)], "pids": []}
        save_state(root, st)
        _start_ray(root, st, sec, deadline)  # while MLflow migrates its database
        save_state(root, st)
        env = dict(os.environ, **client_env(st, sec))
        _wait("Ray cluster", lambda: ray_nodes(st, env) >= 1 + workers, deadline, root / "logs" / "ray-head.log")
        _wait("Ray dashboard (job API)", lambda: dashboard_ready(st, sec), deadline, root / "logs" / "ray-head.log")
        _wait("MLflow", lambda: mlflow_ready(st), deadline, root / "logs" / "mlflow.log")
    except BaseException as err:
        _snapshot(st)
        save_state(root, st)
        print(f"error: stack did not come up: {err}", file=sys.stderr)
        print("stopping what was started ...", file=sys.stderr)
        down()
        return 1
    _snapshot(st)
    st["up_seconds"] = round(time.monotonic() - t0, 1)
    save_state(root, st)
    write_env(root, client_env(st, sec))
    p = st["ports"]
    print(f"stack up in {st['up_seconds']} s (state {root})")
    print(f"  postgres  {HOST}:{p['postgres']}  database mlflow, user mlflow (password in {root}/env)")
    print(f"  s3        http://{HOST}:{p['s3']}  buckets {', '.join(buckets)}")
    print(f"  mlflow    http://{HOST}:{p['mlflow']}  artifacts -> s3://{buckets[1]}/mlflow (proxied)")
    print(f"  ray       {HOST}:{p['ray_gcs']} (head + {workers} worker node(s)), dashboard http://{HOST}:{p['ray_dashboard']}")
    print(f"load it with:  set -a; . {root}/env; set +a")
    return 0


def _free_range(width: int, taken: set[int]) -> int:
    rng = secrets.SystemRandom()
    for _ in range(200):
        start = rng.randrange(20000, 30000 - width)
        if all(q not in taken for q in range(start, start + width)) and all(_port_free(q) for q in range(start, start + width, 10)):
            return start
    raise StackError("no free 100-port range for Ray workers between 20000 and 30000")


# ---------------------------------------------------------------- down / status


def _signal_all(pids: dict[int, int], sig: int) -> None:
    for pid, start in pids.items():
        if _alive(pid, start):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


# Ray's processes in the order they are asked to stop: with the GCS gone first, the autoscaler
# monitor and the agents keep retrying it until killed (10 s); in this order all exit in about 2 s.
RAY_STOP_WAVES = (lambda cmd: "/raylet/raylet" in cmd, lambda cmd: "/gcs/gcs_server" not in cmd)


def _stop_service(name: str, svc: dict, grace_s: float = 10.0) -> None:
    if name == "postgres" and svc.get("data") and (Path(svc["data"]) / "postmaster.pid").exists():
        cmd = [str(PG_BIN / "pg_ctl"), "-D", svc["data"], "-m", "fast", "-w", "-t", "20", "stop"]
        subprocess.run(_as_user(svc["user"], cmd) if svc.get("user") else cmd, capture_output=True, timeout=40)
    end = time.monotonic() + grace_s
    for wave in (*(RAY_STOP_WAVES if name == "ray" else ()), lambda cmd: True):
        pids = {pid: start for pid, start in service_pids(svc, svc.get("marker")).items() if wave(_cmdline(pid))}
        _signal_all(pids, signal.SIGTERM)
        while pids and time.monotonic() < end:
            time.sleep(0.3)
            pids = {pid: start for pid, start in pids.items() if _alive(pid, start)}
    pids = service_pids(svc, svc.get("marker"))
    if not pids:
        return
    _signal_all(pids, signal.SIGKILL)
    time.sleep(0.5)
    # Ray workers may be spawned while we stop: one more sweep.
    left = service_pids(svc, svc.get("marker"))
    _signal_all(left, signal.SIGKILL)


def down(purge: bool = False) -> int:
    root = state_dir()
    st, _ = load_state(root)
    if not st:
        print(f"no stack state in {root}: nothing to stop")
        return 0
    for name in reversed(SERVICES):
        svc = st.get("services", {}).get(name)
        if svc:
            _stop_service(name, svc)
            print(f"  {name:8s} stopped")
    left = {n: service_pids(s, s.get("marker")) for n, s in st.get("services", {}).items()}
    left = {n: p for n, p in left.items() if p}
    if left:
        print(f"error: still running after down: {left}", file=sys.stderr)
        return 1
    (root / "env").unlink(missing_ok=True)
    if purge:
        shutil.rmtree(root, ignore_errors=True)
        pg = Path(st.get("pg_dir") or root)
        if pg.parent == Path("/tmp") and pg.name.startswith(PG_TMP_PREFIX):  # only the folder pg_home made
            shutil.rmtree(pg, ignore_errors=True)
        if st.get("ray_dir"):
            for i in range(int(st.get("ray_workers", 1))):
                shutil.rmtree(f"{st['ray_dir']}-w{i}", ignore_errors=True)
            if not st["ray_dir"].startswith(str(root)):
                shutil.rmtree(st["ray_dir"], ignore_errors=True)
        print(f"stack down; {root} deleted")
    else:
        print(f"stack down (data kept in {root}; `down --purge` deletes it)")
    return 0


def status() -> int:
    root = state_dir()
    st, sec = load_state(root)
    if not st.get("services"):
        print(f"no stack in {root} (run infra/local/stack.sh up)")
        return 3
    env = dict(os.environ, **client_env(st, sec)) if sec else dict(os.environ)
    probes = {
        "postgres": lambda: pg_ready(st),
        "s3": lambda: s3_ready(st, sec),
        "mlflow": lambda: mlflow_ready(st),
        "ray": lambda: f"{ray_nodes(st, env)} node(s)" if dashboard_ready(st, sec) else False,
    }
    ok = True
    for name in SERVICES:
        svc = st["services"].get(name)
        pids = service_pids(svc, svc.get("marker")) if svc else {}
        if not pids:
            print(f"  {name:8s} stopped")
            ok = False
            continue
        try:
            answer = probes[name]()
        except Exception as err:  # noqa: BLE001
            answer, ok = False, False
            print(f"  {name:8s} NOT ANSWERING ({len(pids)} processes): {' '.join(str(err).split())[:200]}")
            continue
        ok = ok and bool(answer)
        detail = answer if isinstance(answer, str) else ("answers" if answer else "NOT ANSWERING")
        print(f"  {name:8s} {detail} ({len(pids)} processes, port {_main_port(name, st)})")
    return 0 if ok else 1


def _main_port(name: str, st: dict) -> int:
    return st["ports"][{"postgres": "postgres", "s3": "s3", "mlflow": "mlflow", "ray": "ray_dashboard"}[name]]


def main(argv: list[str]) -> int:
    if argv[:1] == ["_ray-start"]:  # internal: how _start_ray runs `ray start`
        ray_start_loopback(argv[1:])
        return 0
    if not argv or argv[0] not in ("up", "down", "status") or argv[0] == "-h":
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    try:
        if argv[0] == "up":
            return up()
        if argv[0] == "down":
            return down(purge="--purge" in argv[1:])
        return status()
    except StackError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The cluster configs in infra/ cannot run here: parse them and check them against the real CLI and specs.

Each entrypoint must parse with the sweep's own argument parser and its spec must load with its
overrides; the GPU capacity must hold the shipped search spaces; no file may carry a secret.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

from orchestrator.spec import load_spec
from orchestrator.sweep import build_parser

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
SWEEP_PREFIX = ["python", "-m", "orchestrator.sweep"]
# A value that looks like a credential: AWS key ids, or a password/secret key assigned a literal.
SECRET_PATTERNS = [
    re.compile(r"AKIA[0-9A-Z]{16}"),
    re.compile(r"(?i)(secret_access_key|password|pgpassword|auth_token)\s*[:=]\s*['\"]?[A-Za-z0-9/+]{12,}"),
    re.compile(r"postgres(?:ql)?(?:\+\w+)?://[^/\s:@]+:[^@\s]+@"),  # a password inside a database URI
]


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _rayjob() -> dict:
    return next(d for d in _docs(INFRA / "k8s" / "rayjob.yaml") if d["kind"] == "RayJob")


def _sweep_argv(command: str) -> list[str]:
    argv = shlex.split(command)
    assert argv[:3] == SWEEP_PREFIX, f"entrypoint is not the sweep command: {command}"
    return argv[3:]


def _load_entrypoint_spec(command: str):
    args = build_parser().parse_args(_sweep_argv(command))
    spec_path = REPO / args.spec
    assert spec_path.is_file(), f"entrypoint spec {args.spec} does not exist"
    return args, load_spec(spec_path, args.overrides)


@pytest.fixture(scope="module")
def rayjob_spec():
    return _load_entrypoint_spec(_rayjob()["spec"]["entrypoint"])


@pytest.fixture(scope="module")
def paper_base():
    return load_spec(REPO / "search_spaces" / "paper_base.yaml", check_run=False)


def test_every_infra_yaml_parses():
    files = sorted(INFRA.rglob("*.yaml"))
    assert {f.relative_to(INFRA).as_posix() for f in files} >= {"aws/cluster.yaml", "k8s/rayjob.yaml", "mlflow/k8s.yaml"}
    for f in files:
        assert _docs(f), f"{f} is empty"


def test_no_secrets_in_infra_files():
    for f in sorted(INFRA.rglob("*")):
        if f.is_file() and f.suffix in {".yaml", ".sh", ".py", ".md", ""}:
            text = f.read_text()
            for pattern in SECRET_PATTERNS:
                assert not pattern.search(text), f"{f}: looks like a secret: {pattern.search(text).group(0)[:40]}"


# ------------------------------------------------------------------ KubeRay RayJob


def test_rayjob_entrypoint_is_the_real_sweep_cli(rayjob_spec):
    args, spec = rayjob_spec
    assert args.spec == "search_spaces/paper_base.yaml"
    assert args.address == "auto", "on a cluster the sweep must join the existing Ray, not start its own"
    assert not args.dry_run
    assert spec.storage.path.startswith("/shared/"), "storage must be on the volume every pod mounts"


def test_rayjob_mounts_the_storage_path_on_every_pod(rayjob_spec):
    _, spec = rayjob_spec
    cluster = _rayjob()["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        mounts = {m["mountPath"] for c in pod["spec"]["containers"] for m in c.get("volumeMounts", [])}
        assert any(spec.storage.path.startswith(m.rstrip("/") + "/") for m in mounts), mounts


def test_rayjob_gpu_capacity_holds_paper_base(paper_base):
    res, concurrent = paper_base.resources, paper_base.sweep.max_concurrent
    groups = _rayjob()["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpu = [g for g in groups if float(g["rayStartParams"].get("num-gpus", 0)) > 0]
    assert gpu, "no GPU worker group"
    for g in gpu:
        cpus, gpus = float(g["rayStartParams"]["num-cpus"]), float(g["rayStartParams"]["num-gpus"])
        container = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert float(container["nvidia.com/gpu"]) == gpus and float(container["cpu"]) >= cpus
        # one DDP worker (a Ray Train bundle) must fit on one pod
        assert cpus >= res.cpus_per_worker and gpus >= res.gpus_per_worker
    start = sum(g["replicas"] * float(g["rayStartParams"]["num-gpus"]) for g in gpu)
    most = sum(g["maxReplicas"] * float(g["rayStartParams"]["num-gpus"]) for g in gpu)
    assert start >= res.workers * res.gpus_per_worker, "the first trial cannot start without scaling up"
    assert most >= res.workers * res.gpus_per_worker * concurrent, "max_concurrent trials do not fit"


def test_rayjob_tracking_uri_points_at_the_mlflow_service():
    env = next(d for d in _docs(INFRA / "k8s" / "rayjob.yaml") if d["kind"] == "ConfigMap")["data"]
    service = next(d for d in _docs(INFRA / "mlflow" / "k8s.yaml") if d["kind"] == "Service")
    port = service["spec"]["ports"][0]["port"]
    assert env["MLFLOW_TRACKING_URI"] == f"http://{service['metadata']['name']}:{port}"


# ------------------------------------------------------------------ AWS cluster launcher


def test_aws_cluster_has_cpu_head_and_gpu_workers_for_paper_base(paper_base):
    cfg = yaml.safe_load((INFRA / "aws" / "cluster.yaml").read_text())
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head is CPU-only"
    workers = {n: t for n, t in types.items() if n != cfg["head_node_type"] and t["resources"].get("GPU", 0) > 0}
    assert workers, "no GPU worker type"
    res, concurrent = paper_base.resources, paper_base.sweep.max_concurrent
    total = 0.0
    for t in workers.values():
        r = t["resources"]
        assert r["CPU"] >= res.cpus_per_worker and r["GPU"] >= res.gpus_per_worker
        per_node = min(r["GPU"] // res.gpus_per_worker, r["CPU"] // res.cpus_per_worker)
        total += t["max_workers"] * per_node
    assert total >= res.workers * concurrent, "max_concurrent paper_base trials do not fit the GPU workers"
    assert cfg["max_workers"] >= max(t["max_workers"] for t in workers.values())


def test_aws_cluster_installs_the_project_and_keeps_the_upload_small():
    cfg = yaml.safe_load((INFRA / "aws" / "cluster.yaml").read_text())
    mounts = cfg["file_mounts"]
    assert "." in mounts.values()
    target = next(k for k, v in mounts.items() if v == ".")
    setup = " ".join(cfg["setup_commands"])
    assert f"pip install -q -e {target}" in setup
    assert {".git", ".venv", "data", "runs", ".stack"} <= set(cfg["rsync_exclude"])
    for cmds in (cfg["head_start_ray_commands"], cfg["worker_start_ray_commands"]):
        assert any("pom-ablations.env" in c for c in cmds), "ray must start with the MLflow/S3 environment"
    assert "MLFLOW_TRACKING_URI" in setup and "ssm get-parameter" in setup


def test_aws_cluster_submit_example_is_the_real_cli():
    text = (INFRA / "aws" / "cluster.yaml").read_text()
    block = re.search(r"ray job submit .*? -- \\\n#\s+(python -m orchestrator\.sweep .*?)\n#\s+(--set .*?)\n", text)
    assert block, "cluster.yaml lost its submit example"
    command = block.group(1).rstrip(" \\") + " " + block.group(2)
    args, spec = _load_entrypoint_spec(command)
    assert args.address == "auto" and spec.run["data"]["root"].startswith("s3://")


# ------------------------------------------------------------------ MLflow server


def test_mlflow_deployment_uses_postgres_and_proxied_s3_without_secrets():
    docs = _docs(INFRA / "mlflow" / "k8s.yaml")
    deploy = next(d for d in docs if d["kind"] == "Deployment")
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    args = " ".join(container["args"])
    assert "--backend-store-uri=postgresql+psycopg2://" in args
    assert "--serve-artifacts" in args and "--artifacts-destination=s3://" in args
    env = {e["name"]: e for e in container["env"]}
    assert "valueFrom" in env["PGPASSWORD"], "the database password must come from a Secret"
    port = container["ports"][0]["containerPort"]
    assert f"--port={port}" in args
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"


# ------------------------------------------------------------------ local stack scripts


def test_local_stack_scripts_are_valid_and_documented():
    for script in ("stack.sh", "upload_corpus.sh"):
        path = INFRA / "local" / script
        assert path.stat().st_mode & 0o111, f"{script} is not executable"
        subprocess.run(["bash", "-n", str(path)], check=True)
        assert "Usage:" in path.read_text()
    out = subprocess.run(["bash", str(INFRA / "local" / "stack.sh")], capture_output=True, text=True)
    assert out.returncode == 2 and "up" in out.stderr


# ------------------------------------------------------------------ make system-deps


def _system_deps(tmp: Path, as_user: str | None = None) -> subprocess.CompletedProcess:
    """`make system-deps` with PostgreSQL reported missing and apt-get replaced by a script that only echoes."""
    fake = tmp / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "apt-get").write_text('#!/bin/sh\necho "APT-GET $*"\n')
    (fake / "apt-get").chmod(0o755)
    env = ["env", f"PATH={fake}:{os.environ['PATH']}"]
    cmd = [*env, "make", "-s", "-C", str(REPO), "system-deps", "PG_CTL=/nonexistent/pg_ctl"]
    if as_user:
        cmd = ["runuser", "-u", as_user, "--", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_make_system_deps_calls_apt_get_only_as_root():
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    tmp = Path(tempfile.mkdtemp(prefix="sysdeps-", dir="/tmp"))
    try:
        tmp.chmod(0o755)  # reachable by the unprivileged user below
        if os.geteuid() == 0:
            out = _system_deps(tmp)
            assert out.returncode == 0, out.stderr
            assert "APT-GET install -y -qq postgresql-15" in out.stdout, out.stdout
            user = "nobody"
        else:
            user = None
        out = _system_deps(tmp, as_user=user)
        assert out.returncode == 0, out.stderr
        assert "APT-GET" not in out.stdout, "a user without root must not run apt-get"
        lines = out.stdout.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("system-deps: not root, so not installing: postgresql-15"), lines
        assert "sudo apt-get install -y postgresql-15" in lines[0]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

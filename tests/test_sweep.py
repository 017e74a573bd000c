"""End-to-end sweeps with real Ray, real Optuna and a real MLflow SQLite store.

Slow: each sweep starts a local Ray cluster and runs real pre-training / fine-tuning of a micro
model on the generated corpus.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import micro_run_dict

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent


def sweep_spec(corpus: Path, tmp: Path, *, name: str, search: dict, num_trials: int = 2, sampler: str = "grid",
               max_concurrent: int | None = 1) -> dict:
    """A micro sweep; ``max_concurrent=None`` leaves the concurrency to the cluster's CPUs."""
    run = micro_run_dict(corpus, tmp / "unused", tmp / "cache")
    run.pop("output_dir")
    concurrency = {"max_concurrent": max_concurrent} if max_concurrent is not None else {}
    return {
        "sweep": {"name": name, "objective": {"metric": "dev_wer", "mode": "min"}, "num_trials": num_trials,
                  **concurrency, "sampler": sampler, "scheduler": {"type": "fifo"}},
        "search": search,
        **run,
        "resources": {"workers": 1, "cpus_per_worker": 1},
        "profile": {"lengths_s": [2.0], "batch_size": 1, "repeats": 1},
        "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "e2e"},
        "storage": {"path": str(tmp / "runs")},
    }


def ray_env(tmp: Path) -> tuple[dict, Path]:
    # A short private temp dir: every Ray process this test starts has it on its command line.
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    env = dict(os.environ, RAY_TMPDIR=str(ray_tmp), PYTHONPATH=str(REPO), RAY_DEDUP_LOGS="0")
    env.pop("RAY_ADDRESS", None)
    return env, ray_tmp


def stop_ray_started_under(ray_tmp: Path) -> None:
    """Stop the Ray processes that this test's sweep started (identified by its private temp dir)."""
    import shutil

    marker = str(ray_tmp)
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            cmdline = (pid_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            try:
                os.kill(int(pid_dir.name), signal.SIGKILL)
            except ProcessLookupError:
                pass
    shutil.rmtree(ray_tmp, ignore_errors=True)


def mlflow_runs(db: Path, experiment: str = "e2e"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id], max_results=1000)


def run_sweep_cmd(spec_path: Path, env: dict, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.sweep", str(spec_path), *args],
        cwd=spec_path.parent, env=env, capture_output=True, text=True, timeout=timeout,
    )


def test_sweep_tracks_trials_and_pretrains_once(small_corpus, tmp_path):
    """Three trials that differ only in fine-tuning settings, as many at once as the CPUs allow:
    one pre-training (the others wait for it), three MLflow children with their time breakdown;
    the trial whose loss becomes NaN fails with the reason, the others finish."""
    from orchestrator.worker import TIME_METRICS

    spec = sweep_spec(small_corpus, tmp_path, name="reuse", num_trials=3, max_concurrent=None,
                      search={"finetune.head_lr": {"values": [0.001, 0.003, 1e30]}})
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    env, ray_tmp = ray_env(tmp_path)
    try:
        proc = run_sweep_cmd(path, env)
    finally:
        stop_ray_started_under(ray_tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    client, runs = mlflow_runs(tmp_path / "mlflow.db")
    parents = [r for r in runs if r.data.tags.get("run_kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("run_kind") == "trial"]
    assert len(parents) == 1 and len(children) == 3
    parent = parents[0]
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    diverged = [c for c in children if c.data.params["sampled.finetune.head_lr"] == "1e+30"]
    assert len(diverged) == 1 and diverged[0].info.status == "FAILED"
    assert "diverged" in diverged[0].data.tags["failure_reason"], diverged[0].data.tags["failure_reason"]
    children = [c for c in children if c not in diverged]
    assert {c.data.params["sampled.finetune.head_lr"] for c in children} == {"0.001", "0.003"}
    for child in children:
        assert child.info.status == "FINISHED"
        assert 0.0 <= child.data.metrics["dev_wer"] <= 2.0
        assert "test_wer" in child.data.metrics and "encoder_peak_mem_mb" in child.data.metrics
        assert child.data.params["config.model.encoder.model_dim"] == "32"
        assert child.data.tags["layer_plan"]
        history = client.get_metric_history(child.info.run_id, "pretrain/loss") or []
        assert child.data.tags["pretrain_reused"] == "true" or history, "the pre-training trial logs its curve"
        times = {name: child.data.metrics[name] for name in TIME_METRICS}
        assert all(value >= 0.0 for value in times.values()), times
        parts = sum(value for name, value in times.items() if name != "time/total_s")
        assert parts <= times["time/total_s"] + 1.0, times  # the phases lie inside the trial's wall time
        assert (times["time/pretrain_s"] > 0) == (child.data.tags["pretrain_reused"] == "false"), times
    # Pre-trained once, reused by the other trial.
    done = list((tmp_path / "runs" / "pretrain").glob("*/pretrain.done.json"))
    assert len(done) == 1
    assert sorted(c.data.tags["pretrain_reused"] for c in children + diverged) == ["false", "true", "true"]
    sweep_dir = next((tmp_path / "runs" / "sweeps").iterdir())
    states = sorted(json.loads(p.read_text())["status"] for p in sweep_dir.glob("trials/*/trial.json"))
    assert states == ["done", "done", "failed"], states
    at_once = re.search(r"(\d+) trial\(s\) at once", proc.stdout)  # one per CPU here (1 worker x 1 CPU each)
    assert at_once and int(at_once.group(1)) >= min(2, os.cpu_count() or 1), proc.stdout[-2000:]
    report = (sweep_dir / "report.md").read_text()
    assert report.count("| FINISHED |") == 2 and "FAILED: DivergedError" in report, report
    artifacts = [a.path for a in client.list_artifacts(parent.info.run_id, "report")]
    assert "report/report.md" in artifacts


def test_resume_after_driver_sigkill(small_corpus, tmp_path):
    """SIGKILL the sweep driver after one trial finished; --resume completes without reruns or duplicates."""
    spec = sweep_spec(small_corpus, tmp_path, name="resume",
                      search={"finetune.head_lr": {"values": [0.001, 0.002, 0.003]}}, num_trials=3)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    env, ray_tmp = ray_env(tmp_path)
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.sweep", str(path)], cwd=tmp_path, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    finished: list[Path] = []
    try:
        deadline = time.time() + 900
        while time.time() < deadline and proc.poll() is None:
            finished = [p for p in (tmp_path / "runs" / "sweeps").glob("*/trials/*/trial.json")
                        if json.loads(p.read_text() or "{}").get("status") == "done"]
            if finished:
                break
            time.sleep(1.0)
        assert finished, (tmp_path / "first.log").read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        stop_ray_started_under(ray_tmp)
    first_done = {p.parent.name: p.stat().st_mtime for p in finished}

    env, ray_tmp = ray_env(tmp_path)
    try:
        resumed = run_sweep_cmd(path, env, "--resume")
    finally:
        stop_ray_started_under(ray_tmp)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]

    _, runs = mlflow_runs(tmp_path / "mlflow.db")
    parents = [r for r in runs if r.data.tags.get("run_kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("run_kind") == "trial"]
    assert len(parents) == 1, "resume re-attaches to the sweep's parent run"
    keys = [c.data.tags["trial_key"] for c in children]
    assert len(keys) == len(set(keys)) == 3, keys
    assert all(c.info.status == "FINISHED" for c in children)
    # The trial that had finished was not run again.
    for trial_id, mtime in first_done.items():
        state = next((tmp_path / "runs" / "sweeps").glob(f"*/trials/{trial_id}/trial.json"))
        assert state.stat().st_mtime == mtime

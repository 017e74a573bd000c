"""Fault tests: a Ray node killed in the middle of pre-training.

Real parts only: a Ray cluster of several nodes on this machine (``ray.cluster_utils.Cluster``),
the sweep CLI connected to it with ``--address``, a real MLflow SQLite store, real training of a
micro model on the generated corpus.

1. A worker node dies (``test_worker_node_killed_during_pretraining``). The head has no CPU, so
   the Ray Train worker (1 CPU) runs on the worker node; the trial driver (no CPU: it only waits)
   asks for a custom resource (``resources.driver``) only the head has. The trial driver,
   its Train controller (pinned to the driver's node by Ray Train) and the pre-training registry
   live on the head; the killed node holds the Train worker alone. Ray Train
   (``FailureConfig`` from ``sweep.max_failures``) restarts the worker group on a fresh node; the
   trial driver never sees the failure (no Tune-level retry).
2. The node that hosts the trial DRIVER dies (``test_trial_driver_node_killed_during_pretraining``).
   The driver asks for a custom resource (``resources.driver``) that only the worker node has,
   so the driver, its Train controller, the Train worker and (created by the driver) the
   detached pre-training registry all start there. The node dies; Tune retries the trial
   (``sweep.max_failures``) on a fresh node with the same resources; the retried driver
   re-attaches to its MLflow run, claims its pre-training again from the registry (detached: it
   outlived its creator; restartable: it survives its node) and the worker resumes from the
   newest checkpoint.

The fault: once pre-training has written a checkpoint, the node dies at once: SIGKILL to the
processes it runs and to its Ray processes (``remove_node(allow_graceful=False)``); then a fresh
node with the same resources joins.

What is checked: one MLflow trial run, FINISHED, without a ``failure_reason`` tag; the restarted
worker logged that it resumed from the newest checkpoint left at the kill; the pre-training
curve has every step from 1 to the budget; after the kill it holds exactly the checkpoint's step
(logged again from the checkpoint: the loop writes a checkpoint before it logs that step, and the
kill may fall between the two) and every step after it, nothing from before it (so not restarted
from scratch). Steps logged both before and after the kill (the checkpoint's, and any trained
again after it) appear twice in the curve with the same values; that duplication is expected and
accepted, nothing else is.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from orchestrator.train.checkpoint import latest_checkpoint
from tests.conftest import free_port
from tests.test_sweep import mlflow_runs, ray_env, stop_ray_started_under, sweep_spec

pytestmark = pytest.mark.slow

PRETRAIN_STEPS = 60
CHECKPOINT_EVERY = 4
KILL_AFTER_STEP = 4
"""Kill the worker node once a checkpoint at this step or later exists."""


def _step(checkpoint: Path | None) -> int:
    return int(checkpoint.name.split("-")[1]) if checkpoint is not None else 0


def _newest_pretrain_checkpoint(runs: Path) -> Path | None:
    found = [c for c in (latest_checkpoint(d) for d in runs.glob("pretrain/*/pretrain/checkpoints")) if c is not None]
    return max(found, key=_step) if found else None


def _descendants(roots: list[int]) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_node(cluster, node) -> None:
    """SIGKILL a worker node as a machine that dies: the processes it runs (the Ray Train worker
    among them) and its Ray processes at once.

    ``remove_node`` alone kills the node's Ray processes (raylet, agents); the worker processes
    the raylet started would notice its death only after a moment, and train on meanwhile.
    """
    roots = [info.process.pid for infos in node.all_processes.values() for info in infos]
    for pid in _descendants(roots):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    cluster.remove_node(node, allow_graceful=False)


def _wait(what: str, predicate, proc: subprocess.Popen, log: Path, timeout: float, interval: float = 0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            pytest.fail(f"the sweep exited (code {proc.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}:\n{log.read_text()[-4000:]}")


def _run_sweep_with_a_node_kill(small_corpus, tmp_path, monkeypatch, *, name: str, node: dict, head_resources: dict | None = None,
                                driver_resources: dict | None = None) -> tuple[str, int, int]:
    """Run a 1-trial sweep on a Cluster, kill the node ``node`` once pre-training has a checkpoint,
    add a fresh one like it; return the sweep's output, the checkpoint step resumed from and the
    kill time (ms)."""
    from ray.cluster_utils import Cluster

    spec = sweep_spec(small_corpus, tmp_path, name=name, num_trials=1,
                      search={"finetune.head_lr": {"values": [0.002]}})
    spec["sweep"]["max_failures"] = 1  # feeds ray.train.FailureConfig and Tune's
    spec["pretrain"].update({"steps": PRETRAIN_STEPS, "checkpoint_every": CHECKPOINT_EVERY, "log_every": 1,
                             "keep_checkpoints": 0})
    spec["resources"] = {"workers": 1, "cpus_per_worker": 1, **({"driver": driver_resources} if driver_resources else {})}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    runs = tmp_path / "runs"

    env, ray_tmp = ray_env(tmp_path)
    # A replacement node on a busy 2-CPU machine can take longer than Ray Train's default 60 s
    # to start a worker; a start timeout would count as a second failure.
    env["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "300"
    # The nodes are started from this process: they (and the workers they start) get the same
    # private temp dir and can import the project.
    for key in ("RAY_TMPDIR", "PYTHONPATH", "RAY_DEDUP_LOGS", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"):
        monkeypatch.setenv(key, env[key])
    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    log_path = tmp_path / "sweep.log"
    cluster = proc = None
    try:
        # The head's dashboard (its state API): Ray Train's placement-group cleaner asks it whether
        # the Train controller is alive and removes a dead controller's worker group; without it
        # that group is rescheduled onto the replacement node and holds its CPU, so the retried
        # trial's worker group never starts. On a free port of its own, never another cluster's
        # 8265. No CPU on the head: the Train worker can only run on a worker node.
        cluster = Cluster(initialize_head=True, connect=False,
                          head_node_args={"num_cpus": 0, "resources": head_resources or {}, "include_dashboard": True,
                                          "dashboard_host": "127.0.0.1", "dashboard_port": free_port()})
        victim = cluster.add_node(**node)
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "orchestrator.sweep", str(path), "--address", cluster.address],
                cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        # The trial driver runs and has claimed the pre-training.
        _wait("the trial to start pre-training", lambda: list(runs.glob("pretrain/*/config.json")), proc, log_path,
              timeout=600)

        def checkpoint_to_kill_at() -> Path | None:
            found = _newest_pretrain_checkpoint(runs)
            return found if _step(found) >= KILL_AFTER_STEP else None

        newest = _wait(f"a pre-training checkpoint at step >= {KILL_AFTER_STEP}", checkpoint_to_kill_at, proc,
                       log_path, timeout=600, interval=0.05)
        _kill_node(cluster, victim)
        killed_ms = int(time.time() * 1000)
        resumed_from = _step(_newest_pretrain_checkpoint(runs))
        assert resumed_from >= _step(newest)
        assert resumed_from < PRETRAIN_STEPS, (
            f"pre-training finished (step {resumed_from}) before the kill: raise PRETRAIN_STEPS")
        assert not list(runs.glob("pretrain/*/pretrain.done.json"))
        cluster.add_node(**node)  # the replacement node, same resources

        try:
            code = proc.wait(timeout=900)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the sweep did not finish after the node failure:\n{log_path.read_text()[-4000:]}")
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        if cluster is not None:
            cluster.shutdown()
        stop_ray_started_under(ray_tmp)
    output = log_path.read_text()
    assert code == 0, output[-4000:]
    return output, resumed_from, killed_ms


def _check_one_trial_resumed(tmp_path, output: str, resumed_from: int, killed_ms: int):
    """The checks both faults share (see the module docstring); returns the trial's MLflow run."""
    client, found = mlflow_runs(tmp_path / "mlflow.db")
    trials = [r for r in found if r.data.tags.get("run_kind") == "trial"]
    assert len([r for r in found if r.data.tags.get("run_kind") == "sweep"]) == 1
    assert len(trials) == 1, [r.data.tags.get("trial_key") for r in trials]
    trial = trials[0]
    assert trial.info.status == "FINISHED"
    assert "failure_reason" not in trial.data.tags, trial.data.tags["failure_reason"]
    assert trial.data.tags["pretrain_reused"] == "false"
    # The restarted Train worker found that checkpoint (the loop's own log line, via Ray's log).
    assert re.search(rf"resumed pretrain from \S+/step-{resumed_from:08d} at step {resumed_from}\b", output), \
        output[-4000:]
    assert 0.0 <= trial.data.metrics["dev_wer"] <= 2.0

    history = client.get_metric_history(trial.info.run_id, "pretrain/loss")
    counts = Counter(m.step for m in history)
    assert sorted(counts) == list(range(1, PRETRAIN_STEPS + 1)), sorted(counts)
    before = sorted(m.step for m in history if m.timestamp < killed_ms)
    after = sorted(m.step for m in history if m.timestamp >= killed_ms)
    # Before the kill: steps 1..m once each; m is at least the checkpoint's step - 1 (the loop
    # writes a checkpoint, then logs its step: the kill may fall between the two).
    assert before == list(range(1, len(before) + 1)) and len(before) >= resumed_from - 1, before
    # After it: the resumed worker logs the checkpoint's own metrics again (closing that gap),
    # then trains from the step after the checkpoint to the end; nothing from before it.
    assert after == list(range(resumed_from, PRETRAIN_STEPS + 1)), (resumed_from, after)
    duplicated = sorted(step for step, n in counts.items() if n > 1)
    assert duplicated == list(range(resumed_from, len(before) + 1)), (resumed_from, duplicated)
    by_step = {}
    for m in history:  # a step logged twice was trained twice from the same state: same loss
        by_step.setdefault(m.step, []).append(m.value)
    assert all(max(v) - min(v) < 1e-3 * max(1.0, abs(v[0])) for v in by_step.values()), by_step

    # The pre-training finished exactly once and fine-tuning started from it.
    runs = tmp_path / "runs"
    done = list(runs.glob("pretrain/*/pretrain.done.json"))
    assert len(done) == 1
    meta = json.loads((latest_checkpoint(done[0].parent / "pretrain" / "checkpoints") / "meta.json").read_text())
    assert meta["step"] == PRETRAIN_STEPS and meta["complete"] is True
    assert client.get_metric_history(trial.info.run_id, "finetune/loss")
    return trial


def _trial_state(tmp_path) -> dict:
    states = list((tmp_path / "runs" / "sweeps").glob("*/trials/*/trial.json"))
    assert len(states) == 1, states
    return json.loads(states[0].read_text())


def test_worker_node_killed_during_pretraining(small_corpus, tmp_path, monkeypatch):
    output, resumed_from, killed_ms = _run_sweep_with_a_node_kill(
        small_corpus, tmp_path, monkeypatch, name="nodefail", node={"num_cpus": 1},
        head_resources={"trial_driver_head": 1}, driver_resources={"trial_driver_head": 0.01})
    _check_one_trial_resumed(tmp_path, output, resumed_from, killed_ms)
    # The trial driver never saw the failure: Ray Train restarted its worker group, Tune did not
    # restart the trial.
    state = _trial_state(tmp_path)
    assert state["status"] == "done" and state["attempts"] == 1, state


def test_trial_driver_node_killed_during_pretraining(small_corpus, tmp_path, monkeypatch):
    node = {"num_cpus": 1, "resources": {"trial_driver_node": 1}}
    output, resumed_from, killed_ms = _run_sweep_with_a_node_kill(
        small_corpus, tmp_path, monkeypatch, name="driverfail", node=node,
        driver_resources={"trial_driver_node": 0.01})
    trial = _check_one_trial_resumed(tmp_path, output, resumed_from, killed_ms)
    # Tune retried the trial once (its driver died with the node); the retry re-attached to the
    # same MLflow run and finished it, with no "owner has died" from the registry.
    state = _trial_state(tmp_path)
    assert state["status"] == "done" and state["attempts"] == 2, state
    assert state["mlflow_run_id"] == trial.info.run_id
    assert "owner has died" not in output, output[-4000:]

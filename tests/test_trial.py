"""The trial driver and the Train worker: keys, divergence, failure reasons, the worker config, the
pre-training registry (a real detached actor), bookkeeping after retries and early stops, and one
worker running every stage in Ray Train's local mode."""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import pytest

from orchestrator.trial_driver import failure_reason, flatten, pretrain_key
from orchestrator.worker import DivergedError, check_finite
from orchestrator.train.config import run_config_from_dict


def config(**sections):
    return run_config_from_dict({"preset": "demo", **sections})


def test_pretrain_key_ignores_what_does_not_shape_pretraining():
    base = config()
    assert pretrain_key(base) == pretrain_key(dataclasses.replace(base, output_dir="/elsewhere"))
    assert pretrain_key(base) == pretrain_key(config(finetune={"head_lr": 0.01}, eval={"beam_size": 3}))
    assert pretrain_key(base) != pretrain_key(config(pretrain={"steps": 151}))
    assert pretrain_key(base) != pretrain_key(config(model={"plan": "pom"}))
    assert pretrain_key(base) != pretrain_key(config(data={"synth_seed": 1}))


def test_divergence_is_detected_on_losses_only():
    check_finite("pre-training", {"pretrain/loss": 1.0, "pretrain/grad_norm": math.nan})
    with pytest.raises(DivergedError, match="pretrain/loss is nan at step 7"):
        check_finite("pre-training", {"pretrain/loss": math.nan, "step": 7})
    with pytest.raises(DivergedError):
        check_finite("fine-tuning", {"dev/loss": math.inf})
    with pytest.raises(DivergedError, match="1e\\+31"):
        check_finite("fine-tuning", {"finetune/loss": 1e31})


def test_failure_reason_finds_the_inner_error():
    err = RuntimeError("Training failed.\nTraceback (most recent call last):\n  File \"x.py\"\n"
                       "orchestrator.worker.DivergedError: fine-tuning diverged: finetune/loss is nan\n")
    assert failure_reason(err) == "DivergedError: fine-tuning diverged: finetune/loss is nan"
    assert failure_reason(ValueError("plain")) == "plain"


def test_flatten_tune_config():
    assert flatten({"model.plan": "pom", "a": {"b": 1}}) == {"model.plan": "pom", "a.b": 1}


def test_resumed_stage_logs_its_checkpoint_step_again(tmp_path):
    """A worker killed after writing checkpoint 4 but before logging step 4: the resumed stage
    logs step 4 from the checkpoint's meta.json, so the curve has no gap."""
    import torch

    from orchestrator.tracking import Tracker
    from orchestrator.train.checkpoint import save_checkpoint
    from orchestrator.worker import relog_checkpoint_metrics

    tracker = Tracker.open(f"sqlite:///{tmp_path / 'mlflow.db'}", "unit")
    parent = tracker.sweep_run("s", "s")
    run_id = tracker.trial_run(parent, "s/t", "trial-t")
    checkpoints = tmp_path / "pretrain" / "checkpoints"
    assert relog_checkpoint_metrics(tracker, run_id, "pretrain", checkpoints) is None  # a fresh stage
    for step in (1, 2, 3):
        tracker.log_metrics(run_id, {"pretrain/loss": 10.0 - step}, step=step)
    for step in (2, 4):
        metrics = {"stage": "pretrain", "step": step, "pretrain/loss": 10.0 - step, "lr": 0.1}
        save_checkpoint(checkpoints, step, {"x": torch.zeros(1)}, keep=0, meta={"metrics": metrics})

    assert relog_checkpoint_metrics(tracker, run_id, "pretrain", checkpoints) == 4
    history = tracker.client.get_metric_history(run_id, "pretrain/loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 6.0)]
    assert [(m.step, m.value) for m in tracker.client.get_metric_history(run_id, "pretrain/lr")] == [(4, 0.1)]


# -- the worker config, threads and the registry's rules (no Ray) ---------------------------------


def test_worker_config_round_trip_and_unknown_keys():
    from orchestrator.worker import ProfileSettings, WorkerConfig

    cfg = WorkerConfig(trial_key="s/t", run_id="r", tracking_uri="sqlite:///x.db", experiment_id="1", storage="/s",
                       run={"preset": "demo"}, run_rel="sweeps/s/trials/t/run", pretrain_rel="pretrain/k",
                       objectives=("dev_wer", "params"), cpus_per_worker=2.0,
                       profile=ProfileSettings(lengths_s=(2.0,), batch_size=1, repeats=1), trial_started=5.0)
    plain = cfg.to_dict()
    assert isinstance(plain["profile"], dict)  # plain values on the wire (Ray Train records them)
    assert WorkerConfig.from_dict(plain) == cfg
    assert WorkerConfig.from_dict({**plain, "profile": None}).profile is None
    with pytest.raises(ValueError, match="unknown keys \\['stage'\\]"):
        WorkerConfig.from_dict({**plain, "stage": "pretrain"})


def test_torch_threads_follow_the_cpus_given():
    from orchestrator.worker import torch_threads

    assert [torch_threads(c) for c in (0.5, 1, 1.0, 2, 3.99, 4)] == [1, 1, 1, 2, 3, 4]


def test_trials_at_once_fill_the_cluster_and_drivers_take_no_cpu():
    from orchestrator.trial_driver import driver_resources, trials_at_once

    assert trials_at_once(1, 1.0, cluster={"CPU": 2.0}) == 2  # hybrid.yaml on 2 cores
    assert trials_at_once(2, 1.0, cluster={"CPU": 2.0}) == 1
    assert trials_at_once(1, 4.0, cluster={"CPU": 2.0}) == 1  # never 0: the preflight refuses what cannot fit
    assert trials_at_once(2, 0.5, cluster={"CPU": 3.0}) == 3
    assert trials_at_once(1, 1.0, 1.0, cluster={"CPU": 16.0, "GPU": 4.0}) == 4
    res = driver_resources({"on_demand": 0.01})
    assert res["CPU"] == 0 and res["memory"] > 0 and res["on_demand"] == 0.01


def test_registry_grants_one_owner_per_key_with_a_lease(monkeypatch):
    from orchestrator import trial_driver
    from orchestrator.trial_driver import OWNER, PretrainRegistry

    now = [1000.0]
    monkeypatch.setattr(trial_driver.time, "time", lambda: now[0])
    reg = PretrainRegistry()
    assert reg.claim("k", "a", 60) == OWNER
    assert reg.claim("k", "b", 60) == "a"  # held
    assert reg.claim("k", "a", 60) == OWNER  # the owner renews (or its retried trial reclaims)
    assert reg.claim("other", "b", 60) == OWNER and reg.held() == 2
    now[0] += 61  # the owner stopped renewing: its lease ran out
    assert reg.held() == 0
    assert reg.claim("k", "b", 60) == OWNER
    reg.release("k", "a")  # not the owner any more: no effect
    assert reg.claim("k", "a", 60) == "b"
    reg.release("k", "b")
    assert reg.claim("k", "a", 60) == OWNER


def test_profile_settings_from_the_sweep():
    from orchestrator.trial_driver import TrialContext

    ctx = dict(sweep_id="s", storage="/s", sweep_rel="sweeps/s", spec_run={}, tracking_uri="x", experiment_id="1",
               parent_run_id="p")
    assert TrialContext(**ctx, profile={"enabled": False}).profile_settings() is None
    prof = TrialContext(**ctx, profile={"lengths_s": [2, 4], "batch_size": 1, "repeats": 3}).profile_settings()
    assert (prof.lengths_s, prof.batch_size, prof.repeats) == ((2.0, 4.0), 1, 3)


# -- bookkeeping after retries and early stops ------------------------------------------------------


def test_stopped_trials_state_and_failure_tag_cleared(tmp_path):
    from orchestrator.storage import open_storage
    from orchestrator.tracking import Tracker
    from orchestrator.trial_driver import FAILURE_TAG, TRIAL_STATE, clear_failure, mark_stopped

    storage = open_storage(str(tmp_path / "runs"))
    for tid, status in (("t1", "running"), ("t2", "done"), ("t3", "running")):
        storage.write_json(f"sweeps/s/trials/{tid}/{TRIAL_STATE}", {"status": status})
    assert mark_stopped(storage, "sweeps/s", ["s/t1", "s/t2", "s/missing"]) == ["t1"]
    assert [storage.read_json(f"sweeps/s/trials/{t}/{TRIAL_STATE}")["status"] for t in ("t1", "t2", "t3")] == \
        ["stopped", "done", "running"]

    tracker = Tracker.open(f"sqlite:///{tmp_path / 'mlflow.db'}", "unit")
    run_id = tracker.trial_run(tracker.sweep_run("s", "s"), "s/t1", "trial-t1")
    assert clear_failure(tracker, run_id) is False
    tracker.set_tags(run_id, {FAILURE_TAG: "ActorDiedError: the node died", "layer_plan": "x"})
    assert clear_failure(tracker, run_id) is True
    tags = tracker.client.get_run(run_id).data.tags
    assert FAILURE_TAG not in tags and tags["layer_plan"] == "x"


# -- the Ray layers -------------------------------------------------------------------------------


def test_ray_layers_import_without_cycles():
    """Each layer imports alone, and an inner layer never imports an outer one."""
    import subprocess
    import sys

    outer = {"orchestrator.worker": ("orchestrator.trial_driver", "orchestrator.driver", "orchestrator.tuner"),
             "orchestrator.trial_driver": ("orchestrator.driver", "orchestrator.tuner")}
    for module, forbidden in outer.items():
        code = f"import sys, {module}; print([m for m in {forbidden!r} if m in sys.modules])"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip() == "[]", (module, out.stdout)


def test_registry_outlives_the_trial_that_created_it(tmp_path, monkeypatch):
    """The registry is created by a trial driver (an actor in a placement group that captures what
    it starts, as Tune places trials) that then dies and whose group is removed, as on a dead node
    or at the trial's end: the registry keeps its claims; the retried trial reclaims; the sweep's
    end removes it."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from orchestrator.trial_driver import OWNER, REGISTRY_NAMESPACE, registry, registry_name, remove_registry

    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parent.parent))
    uri = str(tmp_path / "runs")
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        @ray.remote(num_cpus=0)
        class TrialDriver:
            def claim(self, storage_uri: str) -> str:
                return ray.get(registry(storage_uri).claim.remote("k", "s/t1"))

        group = placement_group([{"CPU": 0.01}])
        ray.get(group.ready())
        trial = TrialDriver.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
            group, placement_group_capture_child_tasks=True)).remote()
        assert ray.get(trial.claim.remote(uri)) == OWNER
        ray.kill(trial)  # the process that created the registry is gone, and its group
        remove_placement_group(group)
        time.sleep(1.0)
        assert ray.get(registry(uri).claim.remote("k", "s/t2")) == "s/t1"  # the claim survived
        assert ray.get(registry(uri).claim.remote("k", "s/t1")) == OWNER  # the retried trial
        assert remove_registry(uri) is False  # a claim is held: another sweep may be using it
        ray.get(registry(uri).release.remote("k", "s/t1"))
        assert remove_registry(uri) is True
        for _ in range(50):
            try:
                ray.get_actor(registry_name(uri), namespace=REGISTRY_NAMESPACE)
            except ValueError:
                break
            time.sleep(0.1)
        else:
            pytest.fail("the registry is still alive after remove_registry")
    finally:
        ray.shutdown()


def test_one_worker_runs_every_stage_and_logs_the_time_breakdown(small_corpus, tmp_path):
    """trial_worker in Ray Train's local mode (the same function the worker group runs): pre-train,
    hand-off, fine-tune, eval, profile; every phase timed in MLflow. A second trial with the same
    pre-training key skips straight to fine-tuning."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from orchestrator.storage import open_storage
    from orchestrator.tracking import Tracker
    from orchestrator.worker import FINAL_METRICS, PRETRAIN_DONE, TIME_METRICS, ProfileSettings, WorkerConfig, trial_worker
    from tests.conftest import micro_run_dict

    run = micro_run_dict(small_corpus, tmp_path / "unused", tmp_path / "cache")
    run.pop("output_dir")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker.open(uri, "unit")
    parent = tracker.sweep_run("s", "s")
    storage = open_storage(str(tmp_path / "runs"))

    def run_trial(tid: str) -> tuple[str, dict]:
        run_id = tracker.trial_run(parent, f"s/{tid}", f"trial-{tid}")
        cfg = WorkerConfig(trial_key=f"s/{tid}", run_id=run_id, tracking_uri=uri, experiment_id=tracker.experiment_id,
                           storage=storage.uri, run=run, run_rel=f"sweeps/s/trials/{tid}/run", pretrain_rel="pretrain/k",
                           objectives=("dev_wer",), cpus_per_worker=1,
                           profile=ProfileSettings(lengths_s=(1.0,), batch_size=1, repeats=1), trial_started=time.time())
        result = TorchTrainer(trial_worker, train_loop_config=cfg.to_dict(),
                              scaling_config=ScalingConfig(num_workers=0)).fit()
        assert math.isfinite(result.metrics["dev_wer"])
        return run_id, storage.read_json(f"sweeps/s/trials/{tid}/run/{FINAL_METRICS}")

    first_id, first = run_trial("t1")
    assert storage.exists(f"pretrain/k/{PRETRAIN_DONE}")
    logged = tracker.client.get_run(first_id).data.metrics
    for name in TIME_METRICS[:-1]:  # time/total_s is the trial driver's
        assert name in logged and name in first and logged[name] >= 0.0, name
    assert logged["time/pretrain_s"] > 0 and logged["time/finetune_s"] > 0 and logged["time/eval_s"] > 0
    assert first["encoder_peak_mem_mb"] >= 0 and "test_wer" in first and math.isfinite(first["dev_wer"])
    assert [m.step for m in tracker.client.get_metric_history(first_id, "pretrain/loss")] == [1, 2, 3, 4]
    # per-utterance dev and test records for the report's paired bootstrap, in MLflow
    assert {a.path for a in tracker.client.list_artifacts(first_id, "eval")} >= {"eval/dev-clean.tsv", "eval/test-clean.tsv"}

    second_id, second = run_trial("t2")
    assert second["time/pretrain_s"] == 0.0
    assert not tracker.client.get_metric_history(second_id, "pretrain/loss")
    assert tracker.client.get_metric_history(second_id, "finetune/loss")

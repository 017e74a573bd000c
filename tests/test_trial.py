"""Pieces of the per-trial driver that need no Ray: keys, divergence, failure reasons."""

from __future__ import annotations

import dataclasses
import math

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

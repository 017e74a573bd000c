"""Pieces of the per-trial driver that need no Ray: keys, divergence, failure reasons."""

from __future__ import annotations

import dataclasses
import math

import pytest

from orchestrator.trial import DivergedError, check_finite, failure_reason, flatten, pretrain_key
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
                       "orchestrator.trial.DivergedError: fine-tuning diverged: finetune/loss is nan\n")
    assert failure_reason(err) == "DivergedError: fine-tuning diverged: finetune/loss is nan"
    assert failure_reason(ValueError("plain")) == "plain"


def test_flatten_tune_config():
    assert flatten({"model.plan": "pom", "a": {"b": 1}}) == {"model.plan": "pom", "a.b": 1}

"""The per-worker loops (pure PyTorch: no Ray, no MLflow): BEST-RQ pre-training, CTC fine-tuning,
test evaluation, and their configuration, checkpoints and metrics.

Each stage is ``stage(config: RunConfig, *, report=None, ...) -> dict`` and runs the same as one
process, under ``torchrun`` or inside a Ray Train worker (which passes its own ``report``).
"""

from __future__ import annotations

from typing import Any, Callable

from orchestrator.train.config import (
    ConfigError,
    DataConfig,
    EvalConfig,
    FinetuneConfig,
    PretrainConfig,
    RunConfig,
    load_run_config,
    run_config_from_dict,
)
from orchestrator.train.evaluate import evaluate_run
from orchestrator.train.finetune import finetune
from orchestrator.train.pretrain import pretrain


def run_all(config: RunConfig, *, report=None) -> dict[str, Any]:
    """Pre-train, fine-tune from that checkpoint, and evaluate: one trial without Ray."""
    return {
        "pretrain": pretrain(config, report=report),
        "finetune": finetune(config, report=report),
        "evaluate": evaluate_run(config, report=report),
    }


STAGES: dict[str, Callable[..., dict[str, Any]]] = {
    "pretrain": pretrain,
    "finetune": finetune,
    "evaluate": evaluate_run,
    "all": run_all,
}
"""The single-run command's stages by name."""

__all__ = [
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "FinetuneConfig",
    "PretrainConfig",
    "RunConfig",
    "STAGES",
    "evaluate_run",
    "finetune",
    "load_run_config",
    "pretrain",
    "run_all",
    "run_config_from_dict",
]

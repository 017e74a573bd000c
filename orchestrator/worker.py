"""The Ray Train worker: one training stage on one DDP rank (rank 0 logs to MLflow).

The innermost of the three Ray layers (see :mod:`orchestrator.trial_driver`): the trial driver
builds a ``TorchTrainer`` whose ``train_loop_per_worker`` is :func:`stage_worker`, fed a
:class:`WorkerConfig` (typed; Ray pickles it to every worker). The worker calls the plain PyTorch
loops of :mod:`orchestrator.train` (which import no Ray), uploads their checkpoints through
:mod:`orchestrator.storage`, logs their metrics to the trial's MLflow run and reports fine-tuning
dev-WER rungs to Tune (ASHA) through ``ray.train.report``.

This module imports nothing from the trial driver: the driver imports it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

FINAL_METRICS = "final_metrics.json"

MAX_LOSS = 1e6
"""Losses here are per target (cross-entropy over codes, CTC per token): a few units when
training works; above this the run has diverged even if the number is still finite."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class WorkerConfig:
    """What one Ray Train worker group needs to run a stage of one trial."""

    stage: str
    """``pretrain`` or ``finetune``."""
    run: dict[str, Any]
    """The trial's resolved run config (plain dict, without ``output_dir``: each worker sets it to
    its own node's working folder)."""
    storage: str
    """``storage.path``: an absolute folder or ``s3://bucket/prefix``."""
    output_rel: str
    """The stage's output folder relative to the storage (``pretrain/<key>`` or the trial's run folder)."""
    init_rel: str | None = None
    """Fine-tuning: the pre-training folder (relative to the storage) to start from."""
    trial_key: str
    run_id: str
    """The trial's MLflow run."""
    tracking_uri: str
    experiment_id: str
    objectives: tuple[str, ...] = ("dev_wer",)

    def __post_init__(self) -> None:
        if self.stage not in ("pretrain", "finetune"):
            raise ValueError(f"WorkerConfig.stage must be 'pretrain' or 'finetune', not {self.stage!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain values for ``TorchTrainer(train_loop_config=...)`` (Ray Train records it as a dict)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, plain: dict[str, Any]) -> "WorkerConfig":
        return cls(**{**plain, "objectives": tuple(plain.get("objectives", ("dev_wer",)))})


class DivergedError(RuntimeError):
    """A training loss became NaN or infinite: the trial fails with this reason."""


def check_finite(stage: str, metrics: dict[str, Any]) -> None:
    """Raise :class:`DivergedError` when a reported loss is not finite or above ``MAX_LOSS``
    (every rank sees the same all-reduced value, so every rank raises together)."""
    for key, value in metrics.items():
        if key.endswith("loss") and isinstance(value, float) and not (math.isfinite(value) and abs(value) < MAX_LOSS):
            raise DivergedError(
                f"{stage} diverged: {key} is {value} at step {metrics.get('step', '?')}; "
                "lower the learning rate or raise the warm-up"
            )


def _prefixed(stage: str, metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if key in ("step",):
            continue
        out[key if "/" in key else f"{stage}/{key}"] = float(value)
    return out


def relog_checkpoint_metrics(tracker, run_id: str, stage: str, checkpoints: Path) -> int | None:
    """Log again, at its step, the metrics saved with the newest checkpoint in ``checkpoints``.

    A stage calls this when it starts. The loops write a checkpoint and then report that step's
    metrics: a worker killed between the two would leave the step out of the MLflow curve, and the
    resumed run starts at the step after it. Logging the checkpoint's own metrics (its
    ``meta.json``) closes that gap; when the step was already logged it appears twice with the
    same values. Returns the step logged, or ``None`` when there is no checkpoint yet.
    """
    from orchestrator.train.checkpoint import latest_checkpoint

    newest = latest_checkpoint(checkpoints)
    if newest is None:
        return None
    try:
        meta = json.loads((newest / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    metrics, step = meta.get("metrics") or {}, meta.get("step")
    if not metrics or not isinstance(step, int):
        return None
    tracker.log_metrics(run_id, _prefixed(stage, metrics), step=step)
    return step


def flatten_eval(evaluation: dict[str, Any]) -> dict[str, float]:
    """``evaluate_run`` results -> flat metrics: test_wer (first subset), test/<subset>/wer, CI."""
    out: dict[str, float] = {}
    subsets = evaluation.get("subsets") or {}
    first = True
    for subset, scores in subsets.items():
        for key in ("wer", "cer", "wer_ci_low", "wer_ci_high", "utterances"):
            if key in scores and isinstance(scores[key], (int, float)):
                out[f"test/{subset}/{key}"] = float(scores[key])
                if first and key in ("wer", "cer"):
                    out[f"test_{key}"] = float(scores[key])
        first = False
    return out


def fill_objectives(metrics: dict[str, Any], objectives: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """Every Tune report must carry every objective (Tune checks); NaN where not known yet."""
    out = dict(metrics)
    for name in objectives:
        out.setdefault(name, float("nan"))
    return out


def stage_worker(plain: dict[str, Any]) -> None:
    """Ray Train worker entry (``plain``: :meth:`WorkerConfig.to_dict`): run one stage with the
    plain loops; rank 0 logs to MLflow."""
    import ray.train

    from orchestrator.storage import open_storage
    from orchestrator.tracking import Tracker
    from orchestrator.train.config import run_config_from_dict
    from orchestrator.train.runtime import barrier

    cfg = WorkerConfig.from_dict(plain)
    stage = cfg.stage
    storage = open_storage(cfg.storage)
    run = dict(cfg.run)
    run["output_dir"] = str(storage.local(cfg.output_rel))
    if cfg.init_rel:
        run["finetune"] = {**(run.get("finetune") or {}), "init": str(storage.local(cfg.init_rel))}
    config = run_config_from_dict(run, source=f"trial {cfg.trial_key}")
    context = ray.train.get_context()
    rank = context.get_world_rank()
    checkpoints_rel = f"{cfg.output_rel}/{stage}/checkpoints"
    keep = config.pretrain.keep_checkpoints if stage == "pretrain" else config.finetune.keep_checkpoints
    # One process per node fetches what this stage reads (its newest checkpoint, or the
    # pre-trained one it starts from) into the node's working folder; the others wait.
    if context.get_local_rank() == 0:
        found = storage.pull_checkpoint(checkpoints_rel)
        if found is None and cfg.init_rel:
            storage.pull_checkpoint(f"{cfg.init_rel}/pretrain/checkpoints")
    barrier()

    def publish(checkpoint_dir: Path | None) -> None:
        if checkpoint_dir is not None and rank == 0:
            storage.push_checkpoint(checkpoints_rel, Path(checkpoint_dir), keep=keep)

    tracker = Tracker(uri=cfg.tracking_uri, experiment_id=cfg.experiment_id) if rank == 0 else None
    run_id = cfg.run_id
    objectives = cfg.objectives
    if tracker is not None:  # a resumed stage: its checkpoint's step may not be in MLflow yet
        relog_checkpoint_metrics(tracker, run_id, stage, Path(config.output_dir) / stage / "checkpoints")

    def log_metrics(prefix: str, metrics: dict[str, Any]) -> None:
        if tracker is not None:
            step = int(metrics.get("step", 0) or 0)
            tracker.log_metrics(run_id, _prefixed(prefix, metrics), step=step)

    if stage == "pretrain":
        from orchestrator.train.pretrain import pretrain

        def report(metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
            publish(checkpoint_dir)
            log_metrics("pretrain", metrics)
            check_finite("pre-training", metrics)

        result = pretrain(config, report=report)
        if not result.get("complete", True):
            raise RuntimeError(f"pre-training stopped at step {result.get('step')} before its budget")
        return

    from orchestrator.train.evaluate import evaluate_run
    from orchestrator.train.finetune import finetune

    latest: dict[str, float] = {}

    def report(metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        publish(checkpoint_dir)
        log_metrics("finetune", metrics)
        check_finite("fine-tuning", metrics)
        wer = metrics.get("dev/wer")
        if wer is not None:
            latest["dev_wer"] = float(wer)
            if "dev/cer" in metrics:
                latest["dev_cer"] = float(metrics["dev/cer"])
            # Every rank reports (Train V2 collects one report per worker); ASHA sees dev_wer.
            tune_metrics = {"dev_wer": float(wer), "finetune_step": int(metrics.get("step", 0))}
            if "dev/cer" in metrics:
                tune_metrics["dev_cer"] = float(metrics["dev/cer"])
            ray.train.report(fill_objectives(tune_metrics, objectives))

    result = finetune(config, report=report)
    last = dict(result.get("metrics") or {})
    if "dev/wer" in last:  # a fine-tuning run that was already complete reports nothing new
        latest.setdefault("dev_wer", float(last["dev/wer"]))
        if "dev/cer" in last:
            latest.setdefault("dev_cer", float(last["dev/cer"]))
    final: dict[str, float] = dict(latest)
    evaluation = evaluate_run(config)
    final.update(flatten_eval(evaluation))
    if tracker is not None:
        tracker.log_metrics(run_id, final, step=int(result.get("step", 0)))
    final["finetune_step"] = int(result.get("step", 0))
    if rank == 0:  # the trial driver reads it (Train V2's Result.metrics only follows checkpoints)
        if (Path(config.output_dir) / "eval").is_dir():  # results.json and the per-subset hypotheses
            storage.push_dir(f"{cfg.output_rel}/eval")
        storage.write_json(f"{cfg.output_rel}/{FINAL_METRICS}", final)
    ray.train.report(fill_objectives(final, objectives))

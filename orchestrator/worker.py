"""The Ray Train worker: one trial's stages on one DDP rank (rank 0 logs to MLflow).

The innermost of the three Ray layers (see :mod:`orchestrator.trial_driver`). The trial driver
starts ONE ``TorchTrainer`` (one worker group) per trial whose ``train_loop_per_worker`` is
:func:`trial_worker`, fed a :class:`WorkerConfig` (typed here; a plain dict on the wire, because
Ray Train records ``train_loop_config`` as one). On every rank the worker runs, with the plain
PyTorch loops of :mod:`orchestrator.train` (which import no Ray)::

    pre-training   skipped when the pre-training's done marker exists (reused, or finished
                   before a restart); else resumed from its newest checkpoint; done marker last
    hand-off       the fine-tuning folder's newest checkpoint, or the pre-trained one, fetched
    fine-tuning    dev-WER rungs reported to Tune (ASHA) through ``ray.train.report``
    evaluation     test subsets (WER with its bootstrap CI)
    profile        rank 0: the encoder's forward time and peak memory, on this worker's device

When Ray Train restarts the worker group (a worker or its node died), the same function runs
again and every stage resumes from what storage holds: the pre-training's checkpoints (or its
done marker), then the fine-tuning's. Each phase's wall time is logged as it ends
(``time/<phase>_s``, :data:`TIME_METRICS`), so a trial stopped early by ASHA keeps what it spent.

This module imports nothing from the trial driver: the driver imports it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

FINAL_METRICS = "final_metrics.json"
PRETRAIN_DONE = "pretrain.done.json"

TIME_METRICS = (
    "time/startup_s", "time/pretrain_s", "time/handoff_s", "time/finetune_s", "time/eval_s",
    "time/profile_s", "time/total_s",
)
"""A trial's wall-time breakdown in MLflow: start-up (trial start -> this worker's loop, the
worker group start included), pre-training (0 when reused), hand-off (fetching the checkpoint
fine-tuning starts from: its own newest, or the pre-trained one), fine-tuning (loading the
pre-trained encoder and the dev evaluations included), test evaluation, profile, and the
trial's total. ``time/pretrain_wait_s`` (waiting for another trial computing the same
pre-training) is logged besides by the trial driver."""

MAX_LOSS = 1e6
"""Losses here are per target (cross-entropy over codes, CTC per token): a few units when
training works; above this the run has diverged even if the number is still finite."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProfileSettings:
    """The sweep's ``profile`` section: what the encoder profile measures."""

    scope: str = "encoder"
    """``encoder`` or ``paper`` (see orchestrator/profile.py)."""
    lengths_s: tuple[float, ...] = (10.0, 20.0)
    batch_size: int = 2
    repeats: int = 2


@dataclasses.dataclass(frozen=True, kw_only=True)
class WorkerConfig:
    """What one trial's Ray Train worker group needs, the same on every rank."""

    trial_key: str
    """``<sweep_id>/<tune trial id>``: names the trial's MLflow run and folder."""
    run_id: str
    """The trial's MLflow run (rank 0 logs to it)."""
    tracking_uri: str
    experiment_id: str
    storage: str
    """``storage.path``: an absolute folder or ``s3://bucket/prefix``."""
    run: dict[str, Any]
    """The trial's resolved run config (plain dict, without ``output_dir``: each stage sets it to
    its folder in the node's working copy of the storage)."""
    run_rel: str
    """The trial's fine-tuning/eval folder, relative to the storage."""
    pretrain_rel: str
    """The pre-training folder (``pretrain/<key>``), relative to the storage."""
    objectives: tuple[str, ...] = ("dev_wer",)
    cpus_per_worker: float = 1.0
    """torch's intra-op threads on each worker (the CPUs Ray gave it, not the machine's cores)."""
    profile: ProfileSettings | None = None
    """``None``: no encoder profile."""
    trial_started: float = 0.0
    """``time.time()`` when the trial driver started (for ``time/startup_s``)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain values for ``TorchTrainer(train_loop_config=...)``."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, plain: dict[str, Any]) -> "WorkerConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(plain) - known)
        if unknown:
            raise ValueError(f"WorkerConfig: unknown keys {unknown}; allowed: {sorted(known)}")
        values = dict(plain)
        values["objectives"] = tuple(values.get("objectives", ("dev_wer",)))
        if values.get("profile") is not None:
            prof = dict(values["profile"])
            values["profile"] = ProfileSettings(**{**prof, "lengths_s": tuple(prof.get("lengths_s", (10.0, 20.0)))})
        return cls(**values)


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
    """``evaluate_run`` results -> flat metrics: test_wer (first subset), test/<subset>/wer, CI,
    and with an LM test/<subset>/wer_lm, cer_lm, wer_lm_ci_low, wer_lm_ci_high and the LM's
    paired gain wer_lm_gain, wer_lm_gain_ci_low, wer_lm_gain_ci_high."""
    out: dict[str, float] = {}
    subsets = evaluation.get("subsets") or {}
    first = True
    for subset, scores in subsets.items():
        for key in ("wer", "cer", "wer_ci_low", "wer_ci_high", "utterances",
                    "wer_lm", "cer_lm", "wer_lm_ci_low", "wer_lm_ci_high",
                    "wer_lm_gain", "wer_lm_gain_ci_low", "wer_lm_gain_ci_high"):
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


def torch_threads(cpus: float) -> int:
    """Intra-op threads for a worker given ``cpus`` CPUs by Ray (at least 1)."""
    return max(1, int(math.floor(cpus + 1e-9)))


def profile_trial(config, settings: ProfileSettings) -> dict[str, float]:
    """Forward time and peak memory in the profile's scope, on this process's device (GPU when it has one)."""
    from orchestrator.profile import profile_model

    return profile_model(config.model, scope=settings.scope, lengths_s=tuple(settings.lengths_s),
                         batch_size=settings.batch_size, repeats=settings.repeats)


class _Rank:
    """This worker's place in the group, its storage and (rank 0) its MLflow logging."""

    def __init__(self, cfg: WorkerConfig) -> None:
        import ray.train

        from orchestrator.storage import open_storage
        from orchestrator.tracking import Tracker

        self.cfg = cfg
        context = ray.train.get_context()
        self.rank, self.local_rank = context.get_world_rank(), context.get_local_rank()
        self.storage = open_storage(cfg.storage)
        self.tracker = Tracker(uri=cfg.tracking_uri, experiment_id=cfg.experiment_id) if self.rank == 0 else None

    def run_config(self, output_rel: str, init_rel: str | None = None):
        from orchestrator.train.config import run_config_from_dict

        run = dict(self.cfg.run)
        run["output_dir"] = str(self.storage.local(output_rel))
        if init_rel:
            run["finetune"] = {**(run.get("finetune") or {}), "init": str(self.storage.local(init_rel))}
        return run_config_from_dict(run, source=f"trial {self.cfg.trial_key}")

    def fetch(self, *checkpoint_rels: str) -> None:
        """One process per node fetches the first of ``checkpoint_rels`` that storage holds into
        the node's working folder; the others wait."""
        from orchestrator.train.runtime import barrier

        if self.local_rank == 0:
            for rel in checkpoint_rels:
                if self.storage.pull_checkpoint(rel) is not None:
                    break
        barrier()

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.tracker is not None:
            self.tracker.log_metrics(self.cfg.run_id, metrics, step=step)

    def reporter(self, stage: str, label: str, checkpoints_rel: str, keep: int, on_metrics=None):
        """The loops' ``report(metrics, checkpoint_dir)``: upload the checkpoint (rank 0), log
        the metrics, stop on divergence, then ``on_metrics`` (fine-tuning: Tune's rungs)."""

        def report(metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
            if checkpoint_dir is not None and self.rank == 0:
                self.storage.push_checkpoint(checkpoints_rel, Path(checkpoint_dir), keep=keep)
            self.log(_prefixed(stage, metrics), step=int(metrics.get("step", 0) or 0))
            check_finite(label, metrics)
            if on_metrics is not None:
                on_metrics(metrics)

        return report

    def relog(self, stage: str, config) -> None:
        if self.tracker is not None:  # a resumed stage: its checkpoint's step may not be in MLflow yet
            relog_checkpoint_metrics(self.tracker, self.cfg.run_id, stage, Path(config.output_dir) / stage / "checkpoints")


def _pretrain_phase(me: _Rank) -> float:
    """Pre-train unless the done marker says it is complete; return the seconds spent."""
    from orchestrator.train.pretrain import pretrain
    from orchestrator.train.runtime import barrier

    cfg = me.cfg
    done = f"{cfg.pretrain_rel}/{PRETRAIN_DONE}"
    if me.storage.exists(done):
        return 0.0
    started = time.time()
    config = me.run_config(cfg.pretrain_rel)
    checkpoints_rel = f"{cfg.pretrain_rel}/pretrain/checkpoints"
    me.fetch(checkpoints_rel)
    me.relog("pretrain", config)
    report = me.reporter("pretrain", "pre-training", checkpoints_rel, config.pretrain.keep_checkpoints)
    result = pretrain(config, report=report)
    if not result.get("complete", True):
        raise RuntimeError(f"pre-training stopped at step {result.get('step')} before its budget")
    if me.rank == 0:  # written last: from now on every trial needing this key reuses it
        me.storage.write_json(done, {"key": cfg.pretrain_rel.rsplit("/", 1)[-1], "by": cfg.trial_key,
                                     "time": time.time(), "step": result.get("step")})
    barrier()
    return time.time() - started


def trial_worker(plain: dict[str, Any]) -> None:
    """Ray Train worker entry (``plain``: :meth:`WorkerConfig.to_dict`): the trial's stages."""
    import ray.train
    import torch

    from orchestrator.train.evaluate import evaluate_run
    from orchestrator.train.finetune import finetune

    loop_started = time.time()
    cfg = WorkerConfig.from_dict(plain)
    torch.set_num_threads(torch_threads(cfg.cpus_per_worker))
    me = _Rank(cfg)
    times = {"time/startup_s": max(0.0, loop_started - cfg.trial_started) if cfg.trial_started else 0.0}
    me.log(times)

    times["time/pretrain_s"] = _pretrain_phase(me)
    me.log({"time/pretrain_s": times["time/pretrain_s"]})

    started = time.time()
    config = me.run_config(cfg.run_rel, init_rel=cfg.pretrain_rel)
    checkpoints_rel = f"{cfg.run_rel}/finetune/checkpoints"
    me.fetch(checkpoints_rel, f"{cfg.pretrain_rel}/pretrain/checkpoints")
    me.relog("finetune", config)
    times["time/handoff_s"] = time.time() - started
    me.log({"time/handoff_s": times["time/handoff_s"]})

    latest: dict[str, float] = {}

    def rung(metrics: dict[str, Any]) -> None:
        wer = metrics.get("dev/wer")
        if wer is None:
            return
        latest["dev_wer"] = float(wer)
        tune_metrics = {"dev_wer": float(wer), "finetune_step": int(metrics.get("step", 0))}
        if "dev/cer" in metrics:
            latest["dev_cer"] = tune_metrics["dev_cer"] = float(metrics["dev/cer"])
        # Every rank reports (Train V2 collects one report per worker); ASHA sees dev_wer.
        ray.train.report(fill_objectives(tune_metrics, cfg.objectives))

    started = time.time()
    report = me.reporter("finetune", "fine-tuning", checkpoints_rel, config.finetune.keep_checkpoints, rung)
    result = finetune(config, report=report)
    times["time/finetune_s"] = time.time() - started
    me.log({"time/finetune_s": times["time/finetune_s"]})
    last = dict(result.get("metrics") or {})
    if "dev/wer" in last:  # a fine-tuning run that was already complete reports nothing new
        latest.setdefault("dev_wer", float(last["dev/wer"]))
        if "dev/cer" in last:
            latest.setdefault("dev_cer", float(last["dev/cer"]))

    started = time.time()
    final: dict[str, float] = dict(latest)
    # Greedy per-utterance dev records (eval/<dev subset>.tsv) for the report's paired tests;
    # the test evaluation runs second, so its results.json is the one kept.
    greedy = dataclasses.replace(config, eval=dataclasses.replace(config.eval, decoder="greedy"))
    evaluate_run(greedy, subsets=tuple(config.data.dev_subsets))
    final.update(flatten_eval(evaluate_run(config)))
    if me.tracker is not None:  # the report reads them from MLflow alone
        me.tracker.log_eval_records(cfg.run_id, Path(config.output_dir) / "eval")
    times["time/eval_s"] = time.time() - started
    me.log({**final, "time/eval_s": times["time/eval_s"]}, step=int(result.get("step", 0)))

    if me.rank == 0:
        if cfg.profile is not None:
            started = time.time()
            prof = profile_trial(config, cfg.profile)
            times["time/profile_s"] = time.time() - started
            final.update(prof)
            me.log({**prof, "time/profile_s": times["time/profile_s"]})
        else:
            times["time/profile_s"] = 0.0
            me.log({"time/profile_s": 0.0})
        final.update(times)
        final["finetune_step"] = int(result.get("step", 0))
        if (Path(config.output_dir) / "eval").is_dir():  # results.json and the per-subset hypotheses
            me.storage.push_dir(f"{cfg.run_rel}/eval")
        # The trial driver reads it (Train V2's Result.metrics only follows checkpoints).
        me.storage.write_json(f"{cfg.run_rel}/{FINAL_METRICS}", final)
    ray.train.report(fill_objectives({k: v for k, v in final.items() if not k.startswith("time/")}, cfg.objectives))

"""The training-stage loop both stages run, and what it is built from: one optimiser step, the
training state in a checkpoint, the metric window, and a progress printer for the single-run command.

The split follows icefall's: an :class:`Objective` per stage holds what differs (the model and
its optimiser, the batch source, ``compute_loss(model, batch, runtime) -> (loss, Counters)``,
the summary of a metric window, the validation hook), and :func:`run_stage` holds what is the
same (resume, checkpoint contents, log/save/report cadence, per-rank RNG states, the
non-finite loss warning). Metrics are :class:`~orchestrator.train.metrics.Counters`, reduced
across ranks before the ``report`` callback sees them. No Ray here: a Ray Train worker passes
its own ``report``.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TextIO

import torch
from torch import nn

from orchestrator.errors import StageError
from orchestrator.fileio import atomic_write_json, atomic_write_text
from orchestrator.train.checkpoint import (
    latest_checkpoint,
    load_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from orchestrator.train.metrics import Counters
from orchestrator.train.runtime import (
    Report,
    Runtime,
    all_gather_objects,
    barrier,
    deterministic,
    log,
    no_sync,
    seed_everything,
)

if TYPE_CHECKING:
    from orchestrator.train.config import OptimConfig, RunConfig
    from orchestrator.train.data import Loader

STATE_FORMAT = 1
ComputeLoss = Callable[[nn.Module, dict, Runtime], "tuple[torch.Tensor, Counters]"]


def train_one_step(
    model: nn.Module,
    batches: list[dict],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    runtime: Runtime,
    compute_loss: ComputeLoss,
    *,
    clip_norm: float,
) -> Counters:
    """One optimiser step over ``len(batches)`` accumulated micro-batches.

    The loss of each micro-batch is divided by the number of micro-batches, DDP's gradient
    all-reduce runs once (on the last backward), gradients are unscaled (fp16), clipped to
    ``clip_norm`` (0 = no clipping, the norm is still measured) and the step is skipped when the
    norm is not finite (the GradScaler decides under fp16). The schedule advances either way.

    Returns:
        The micro-batches' counters plus ``grad_norm`` and ``skipped_steps`` (same names on
        every rank, as :meth:`Counters.reduce` needs).
    """
    model.train()
    counters = Counters()
    n = len(batches)
    for i, batch in enumerate(batches):
        with no_sync(model, skip=i < n - 1):
            loss, batch_counters = compute_loss(model, batch, runtime)
            scaled = loss / n
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        counters.merge(batch_counters)
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_norm if clip_norm > 0 else math.inf)
    finite = bool(torch.isfinite(grad_norm))
    if scaler is not None:
        scaler.step(optimizer)  # skips the update itself when the unscaled gradients are not finite
        scaler.update()
    elif finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    counters.add("grad_norm", float(grad_norm) if finite else 0.0, 1.0 if finite else 0.0)
    counters.add_total("skipped_steps", 0.0 if finite else 1.0)
    return counters


class MetricWindow:
    """Counters and wall time since the last report."""

    def __init__(self) -> None:
        self.counters = Counters()
        self.start = time.perf_counter()
        self.steps = 0

    def add(self, counters: Counters) -> None:
        self.counters.merge(counters)
        self.steps += 1

    def reset_clock(self) -> None:
        """Start timing now (after an evaluation or a checkpoint, which are not training time)."""
        self.start = time.perf_counter()

    def close(self) -> tuple[Counters, float]:
        """The window's counters reduced over ranks, and its wall time; starts a new window."""
        reduced = self.counters.reduce()
        elapsed = time.perf_counter() - self.start
        self.counters = Counters()
        self.start = time.perf_counter()
        self.steps = 0
        return reduced, elapsed


# ---------------------------------------------------------------------------------------------
# Training state <-> checkpoint


def gather_rank_states(extra: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every rank's RNG states (and ``extra``, e.g. augmentation generators), in rank order.

    A collective: every rank must call it. Each rank draws its own masks and dropout, so an
    exact resume needs each rank's generators, not only rank 0's.
    """
    return all_gather_objects({"rng": rng_state(), **(extra or {})})


def restore_rank_state(states: list[dict[str, Any]], runtime: Runtime) -> dict[str, Any] | None:
    """Restore this rank's RNG states from a checkpoint's per-rank list; returns its entry.

    With another world size than the checkpoint's, the states cannot be matched to ranks: the
    generators stay as seeded (the resume is then statistically, not bitwise, the same run).
    """
    if len(states) != runtime.world_size:
        log.warning(
            "checkpoint has RNG states of %d rank(s), this run has %d: generators are reseeded, "
            "so the resumed run is not bit-identical",
            len(states), runtime.world_size,
        )
        return None
    mine = states[runtime.rank]
    set_rng_state(mine["rng"])
    return mine


def save_training_checkpoint(
    checkpoint_root: Path,
    step: int,
    state: dict[str, Any],
    rank_states: list[dict[str, Any]],
    runtime: Runtime,
    *,
    keep: int,
    meta: dict[str, Any],
    write_files: Callable[[Path], None] | None = None,
    best: dict[str, Any] | None = None,
) -> Path:
    """Rank 0 writes the checkpoint atomically; every rank returns its folder after a barrier."""
    final = Path(checkpoint_root) / f"step-{step:08d}"
    if runtime.is_main:
        final = save_checkpoint(
            checkpoint_root,
            step,
            {"format": STATE_FORMAT, "step": step, "world_size": runtime.world_size, "ranks": rank_states, **state},
            keep=keep,
            meta=meta,
            write_files=write_files,
            best=best,
        )
    barrier()
    return final


def find_resume_checkpoint(checkpoint_root: Path, resume_from: Path | None) -> Path | None:
    """``resume_from`` when given (e.g. the checkpoint Ray restored), else the newest in the stage folder."""
    if resume_from is not None:
        path = Path(resume_from)
        if not (path / "state.pt").is_file():
            raise StageError(f"cannot resume from {path}: no state.pt there (pass a checkpoint folder step-NNNNNNNN)")
        return path
    return latest_checkpoint(checkpoint_root)


def load_training_state(path: Path, runtime: Runtime, stage: str) -> dict[str, Any]:
    state = load_state(path, map_location=runtime.device)
    if state.get("stage") != stage:
        raise StageError(f"{path} is a {state.get('stage')!r} checkpoint, not a {stage!r} one")
    return state


write_json = atomic_write_json  # the name older importers use


def check_same_model(state: dict[str, Any], model_config: dict[str, Any], path: Path) -> None:
    """Refuse to resume ``state`` with another model configuration than this run's."""
    saved = state.get("model_config")
    if saved is not None and saved != model_config:
        raise StageError(
            f"{path} was trained with another model configuration than this run's; resume with the "
            "same model: section, or choose another output_dir"
        )


# ---------------------------------------------------------------------------------------------
# One training stage


class Objective:
    """What one training stage trains and how; :func:`run_stage` calls these hooks in order.

    Before the model: :meth:`prepare` (corpus, tokenizer, the batch source), :meth:`total_steps`.
    After ``seed_everything(settings.seed)``: :meth:`build` (model, optimiser, schedule), then
    :meth:`restore` (resumed) or :meth:`initialise` (fresh). Per step: :meth:`before_step`,
    :meth:`compute_loss`; at reports :meth:`summary` and, when :meth:`evaluate_now`,
    :meth:`validate`. Per checkpoint: :meth:`state`, :meth:`meta`, :meth:`rank_state`,
    :meth:`save_files`, :meth:`best`.
    """

    stage: str = ""

    def __init__(self, config: "RunConfig", settings: "OptimConfig") -> None:
        self.config = config
        self.settings = settings
        self.runtime = Runtime.create(config.device, settings.precision)
        self.root = Path(config.output_dir) / self.stage
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None

    # -- before the model exists
    def check_resume(self, state: dict[str, Any], path: Path) -> None:
        """Refuse a checkpoint this run cannot continue (called before anything is built)."""

    def known_steps(self) -> int | None:
        """The step budget when it is known before the data (``None``: after :meth:`prepare`)."""
        return self.settings.steps

    def prepare(self, resume: Path | None) -> "Loader":
        """Corpus, tokenizer, ...: returns the training batch source."""
        raise NotImplementedError

    def total_steps(self, data: "Loader") -> int:
        return self.settings.steps

    def model_config(self) -> dict[str, Any]:
        raise NotImplementedError

    # -- the model
    def build(self, steps: int) -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        raise NotImplementedError

    def initialise(self) -> None:
        """A fresh start: whatever the model needs before step 0 (normaliser, pre-trained weights)."""

    def restore(self, state: dict[str, Any], mine: dict[str, Any] | None) -> None:
        """A resume: this stage's own state (``mine``: this rank's entry, ``None`` on another world size)."""

    # -- each step
    def before_step(self, step: int) -> bool:
        """Called before each step (and once before the first); True = wrap the model again."""
        return False

    def compute_loss(self, model: nn.Module, batch: dict, runtime: Runtime) -> tuple[torch.Tensor, Counters]:
        raise NotImplementedError

    def summary(self, counters: Counters, elapsed: float, *, step: int, epoch: float) -> dict[str, Any]:
        raise NotImplementedError

    def evaluate_now(self, step: int, steps: int) -> bool:
        return False

    def validate(self, step: int, metrics: dict[str, Any]) -> bool:
        """Add validation metrics to ``metrics``; True = write a checkpoint at this step."""
        return False

    # -- checkpoints and the result
    def state(self) -> dict[str, Any]:
        return {}

    def meta(self) -> dict[str, Any]:
        return {}

    def rank_state(self) -> dict[str, Any]:
        return {}

    def save_files(self, folder: Path) -> None:
        """Files that go with the run folder's ``config.yaml`` and with every checkpoint."""

    def best(self) -> dict[str, Any] | None:
        """The best checkpoint so far (``{"step": N, ...}``), kept and pointed to by ``best.json``."""
        return None

    def result(self, meta: dict[str, Any]) -> dict[str, Any]:
        """Extra keys of the stage's result."""
        return {}


def _complete(objective: Objective, state: dict[str, Any], path: Path) -> dict[str, Any]:
    log.info("%s already complete at step %d (%s)", objective.stage, state["step"], path)
    meta = state.get("meta", {})
    return {"step": state["step"], "complete": True, "checkpoint": path, "metrics": meta.get("metrics", {}),
            **objective.result(meta)}


def run_stage(
    objective: Objective, *, report: Report | None = None, stop_after: int | None = None,
    resume_from: str | Path | None = None,
) -> dict[str, Any]:
    """Run (or resume, or skip when complete) one training stage into ``<output_dir>/<stage>/``.

    Works as a single process and, unchanged, on every rank of an initialised process group;
    a folder with checkpoints resumes from the newest, a complete one returns at once.

    Args:
        objective: the stage (:class:`Objective`), built from the run configuration.
        report: ``report(metrics, checkpoint_dir)``, called on every rank after the reduce:
            every ``log_every`` steps, at evaluations, and with the folder at each checkpoint
            (every ``checkpoint_every`` steps, at the end, and when :meth:`Objective.validate`
            asks). Each checkpoint's ``meta.json`` holds the metrics reported with it, so a
            resumed stage can log them again.
        stop_after: stop (with a checkpoint) after this step, as a preempted run would; the
            schedule still follows the full budget.
        resume_from: a checkpoint folder to resume from instead of the newest of the stage.

    Returns:
        ``{"step", "complete", "checkpoint", "metrics", **objective.result(meta)}``: the last
        step, whether the budget is reached, the last checkpoint folder, the last reported metrics.
    """
    settings, runtime, stage, root = objective.settings, objective.runtime, objective.stage, objective.root
    checkpoints = Path(root) / "checkpoints"
    report = report or (lambda metrics, checkpoint_dir: None)
    with deterministic(settings.deterministic):
        resume = find_resume_checkpoint(checkpoints, Path(resume_from) if resume_from else None)
        state = load_training_state(resume, runtime, stage) if resume is not None else None
        if state is not None:
            objective.check_resume(state, resume)
            known = objective.known_steps()
            if known is not None and state["step"] >= known:
                return _complete(objective, state, resume)
        data = objective.prepare(resume)
        steps = objective.total_steps(data)
        if state is not None:
            check_same_model(state, objective.model_config(), resume)
            if state["step"] >= steps:
                return _complete(objective, state, resume)
        seed_everything(settings.seed)
        model, optimizer, scheduler = objective.build(steps)
        objective.model, objective.optimizer, objective.scheduler = model, optimizer, scheduler
        scaler = runtime.grad_scaler()
        step = 0
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if scaler is not None and state.get("scaler") is not None:
                scaler.load_state_dict(state["scaler"])
            data.sampler.load_state_dict(state["sampler"])
            step = int(state["step"])
            mine = restore_rank_state(state["ranks"], runtime)
            objective.restore(state, mine)
            if mine is None:
                seed_everything(settings.seed + 1000 * runtime.rank + step)
            log.info("resumed %s from %s at step %d", stage, resume, step)
        else:
            objective.initialise()
            seed_everything(settings.seed + runtime.rank)  # ranks draw different masks, noise and dropout
            if runtime.is_main:
                Path(root).mkdir(parents=True, exist_ok=True)
                objective.save_files(Path(root))
                write_yaml_config(Path(root) / "config.yaml", objective.config)
        del state

        objective.before_step(step)
        ddp_model = runtime.wrap(model)
        window = MetricWindow()
        batches = data.batches()
        metrics: dict[str, Any] = {}
        checkpoint: Path | None = resume
        last = steps if stop_after is None else min(steps, stop_after)
        while step < last:
            if objective.before_step(step):
                # DDP registers gradient hooks for the parameters that require grad when it is built.
                ddp_model = runtime.wrap(model)
            micro = [next(batches) for _ in range(settings.accum_steps)]
            counters = train_one_step(
                ddp_model, micro, optimizer, scheduler, scaler, runtime, objective.compute_loss,
                clip_norm=settings.clip_norm,
            )
            step += 1
            window.add(counters)
            save = step % settings.checkpoint_every == 0 or step >= last
            evaluate_now = objective.evaluate_now(step, steps)
            report_now = step % settings.log_every == 0 or save or evaluate_now
            if report_now:
                reduced, elapsed = window.close()
                epoch = data.sampler.epoch + data.sampler.batches_done / max(1, len(data.sampler))
                metrics = objective.summary(reduced, elapsed, step=step, epoch=epoch)
                if evaluate_now:
                    start = time.perf_counter()
                    save = objective.validate(step, metrics) or save
                    metrics["dev/seconds"] = time.perf_counter() - start
                if not math.isfinite(metrics[f"{stage}/loss"]):
                    log.warning("%s loss is %s at step %d", stage, metrics[f"{stage}/loss"], step)
            checkpoint_dir = None
            if save:
                rank_states = gather_rank_states(objective.rank_state())
                meta = {"stage": stage, "steps": steps, "complete": step >= steps, "metrics": metrics, **objective.meta()}
                full_state = {
                    "stage": stage,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "sampler": data.sampler.state_dict(),
                    "config": objective.config.to_dict(),
                    "model_config": objective.model_config(),
                    "meta": meta,
                    **objective.state(),
                }
                checkpoint_dir = save_training_checkpoint(
                    checkpoints, step, full_state, rank_states, runtime, keep=settings.keep_checkpoints, meta=meta,
                    write_files=objective.save_files, best=objective.best(),
                )
                checkpoint = checkpoint_dir
            if report_now:
                report(metrics, checkpoint_dir)
                window.reset_clock()
        return {"step": step, "complete": step >= steps, "checkpoint": checkpoint, "metrics": metrics,
                **objective.result({"metrics": metrics, **objective.meta()})}


def write_yaml_config(path: Path, config: "RunConfig") -> None:
    import yaml

    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))


# ---------------------------------------------------------------------------------------------
# Progress


def format_metrics(metrics: dict[str, Any]) -> str:
    """One progress line: ``[stage] step N  key value  key value ...``."""
    parts = [f"[{metrics.get('stage', '?')}] step {metrics.get('step', '?')}"]
    for key, value in metrics.items():
        if key in ("stage", "step"):
            continue
        if isinstance(value, float):
            if value != value:
                text = "nan"
            elif value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
                text = f"{value:.3e}"
            else:
                text = f"{value:.4g}"
        else:
            text = str(value)
        parts.append(f"{key} {text}")
    return "  ".join(parts)


class ProgressPrinter:
    """A ``report`` callback that prints one line per report (rank 0 only) and notes checkpoints."""

    def __init__(self, stream: TextIO | None = None, rank: int = 0) -> None:
        self.stream = stream
        self.rank = rank

    def __call__(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        if self.rank != 0:
            return
        stream = self.stream or sys.stdout
        line = format_metrics(metrics)
        if checkpoint_dir is not None:
            line += f"  checkpoint {checkpoint_dir}"
        print(line, file=stream, flush=True)

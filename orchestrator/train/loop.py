"""What the pre-training and fine-tuning loops share: one optimiser step, the training state in a
checkpoint, the metric window, and a progress printer for the single-run command.

The loops follow icefall's split: ``compute_loss(model, batch, runtime) -> (loss, Counters)``
per stage, :func:`train_one_step` (gradient accumulation, clipping, mixed precision) shared,
``evaluate`` per stage. Metrics are :class:`~orchestrator.train.metrics.Counters`, reduced across
ranks before the ``report`` callback sees them.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, TextIO

import torch
from torch import nn

from orchestrator.train.checkpoint import (
    atomic_write_bytes,
    latest_checkpoint,
    load_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from orchestrator.train.metrics import Counters
from orchestrator.train.runtime import Runtime, all_gather_objects, barrier, log, no_sync

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
        )
    barrier()
    return final


def find_resume_checkpoint(checkpoint_root: Path, resume_from: Path | None) -> Path | None:
    """``resume_from`` when given (e.g. the checkpoint Ray restored), else the newest in the stage folder."""
    if resume_from is not None:
        path = Path(resume_from)
        if not (path / "state.pt").is_file():
            raise ValueError(f"cannot resume from {path}: no state.pt there (pass a checkpoint folder step-NNNNNNNN)")
        return path
    return latest_checkpoint(checkpoint_root)


def load_training_state(path: Path, runtime: Runtime, stage: str) -> dict[str, Any]:
    state = load_state(path, map_location=runtime.device)
    if state.get("stage") != stage:
        raise ValueError(f"{path} is a {state.get('stage')!r} checkpoint, not a {stage!r} one")
    return state


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


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


def chain_reports(*reports: Callable[[dict[str, Any], Path | None], None] | None):
    """One callback calling each non-None callback in turn."""
    active = [r for r in reports if r is not None]

    def report(metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        for r in active:
            r(metrics, checkpoint_dir)

    return report

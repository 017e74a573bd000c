"""Atomic, resumable training checkpoints.

A checkpoint is a folder ``<run_dir>/checkpoints/step-<N>/`` holding ``state.pt`` (model,
optimizer, scheduler, sampler position, RNG states, step, config) and ``meta.json``. It is written
under a temporary name and renamed into place, so a crash never leaves a half-written checkpoint
that a resume would pick up; ``latest`` always names a complete one. ``best.json`` (written by
fine-tuning) names the checkpoint with the best dev WER; that one is never pruned while it is
the best, and the pointer is rewritten before any pruning, so it always names a complete folder.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from orchestrator.errors import StageError
from orchestrator.fileio import atomic_directory, atomic_write_bytes, atomic_write_json, json_bytes

__all__ = [  # atomic_write_* re-exported for older importers: they live in orchestrator.fileio
    "BEST_POINTER", "atomic_write_bytes", "atomic_write_json", "best_checkpoint", "checkpoint_to_test",
    "latest_checkpoint", "list_checkpoints", "load_state", "rng_state", "save_checkpoint", "set_rng_state",
]

_PREFIX = "step-"
BEST_POINTER = "best.json"


def rng_state() -> dict[str, Any]:
    """Capture every RNG a training step draws from (python, numpy, torch CPU and CUDA)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the RNG states captured by :func:`rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    checkpoint_root: Path,
    step: int,
    state: dict[str, Any],
    *,
    keep: int = 2,
    meta: dict | None = None,
    write_files: Callable[[Path], None] | None = None,
    best: dict[str, Any] | None = None,
) -> Path:
    """Write ``state`` as ``<checkpoint_root>/step-<step>`` atomically; keep the newest ``keep``.

    Args:
        checkpoint_root: the folder of a stage's checkpoints.
        step: the optimiser step the state was taken after.
        state: what ``torch.save`` writes to ``state.pt``.
        keep: newest checkpoints kept (0 keeps all).
        meta: JSON-able facts written to ``meta.json`` (step, metrics, completeness).
        write_files: called with the temporary folder to add files (e.g. the tokenizer) that
            must appear together with the state, in the same rename.
        best: ``{"step": N, ...}`` naming the best checkpoint so far (this one or an earlier one
            that still exists): written to ``best.json`` before pruning, and that checkpoint is
            kept besides the newest ``keep``.

    Returns:
        The folder of the new checkpoint.
    """
    root = Path(checkpoint_root)
    final = root / f"{_PREFIX}{step:08d}"
    with atomic_directory(final) as tmp:  # a rerun of the same step replaces it whole
        torch.save(state, tmp / "state.pt")
        if write_files is not None:
            write_files(tmp)
        (tmp / "meta.json").write_bytes(json_bytes({"step": step, **(meta or {})}))  # published by the rename
    atomic_write_json(root / "latest.json", {"step": step, "path": final.name})
    protected = None
    if best is not None:
        protected = f"{_PREFIX}{int(best['step']):08d}"
        if (root / protected / "state.pt").is_file():
            atomic_write_json(root / BEST_POINTER, {**best, "path": protected})
        else:  # e.g. resumed on a fresh node that only fetched the newest checkpoint
            logging.getLogger("orchestrator.train").warning(
                "the best checkpoint %s is not here: best.json not updated", root / protected
            )
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        if old.name != protected:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(checkpoint_root: Path) -> list[Path]:
    """Complete checkpoints under ``checkpoint_root``, oldest first."""
    root = Path(checkpoint_root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and (p / "state.pt").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX):]))


def best_checkpoint(checkpoint_root: Path) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint ``best.json`` names and the pointer's content, or ``None`` when there is
    no pointer or its checkpoint is gone."""
    root = Path(checkpoint_root)
    try:
        pointer = json.loads((root / BEST_POINTER).read_text())
    except (OSError, ValueError):
        return None
    path = root / str(pointer.get("path", ""))
    return (path, pointer) if pointer.get("path") and (path / "state.pt").is_file() else None


def checkpoint_to_test(checkpoint_root: Path) -> Path | None:
    """The checkpoint a test evaluation loads: the best dev WER's (``best.json``), else the newest."""
    best = best_checkpoint(checkpoint_root)
    return best[0] if best is not None else latest_checkpoint(checkpoint_root)


def latest_checkpoint(checkpoint_root: Path) -> Path | None:
    """The newest complete checkpoint folder, or ``None``."""
    found = list_checkpoints(checkpoint_root)
    return found[-1] if found else None


def load_state(checkpoint_dir: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load ``state.pt`` from a checkpoint folder."""
    path = Path(checkpoint_dir) / "state.pt"
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except FileNotFoundError:
        raise StageError(f"no checkpoint at {path}: pass a folder written by save_checkpoint") from None

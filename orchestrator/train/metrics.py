"""Summable metric counters, reduced across workers before anyone reports them.

Means are never averaged across ranks (that weighs a rank with 3 frames like one with 3000):
every metric is kept as a sum and a count, summed over ranks with one all-reduce, and only then
divided.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist


class Counters:
    """Named float sums. ``add("loss", 3.2, weight)`` keeps ``loss`` and ``loss/count``."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)

    def add(self, name: str, value: float, count: float = 1.0) -> None:
        """Add ``value`` (already a sum over ``count`` items) to ``name``."""
        self.sums[name] += float(value)
        self.sums[f"{name}/count"] += float(count)

    def add_total(self, name: str, value: float) -> None:
        """Add to a plain total (no count), e.g. audio seconds processed."""
        self.sums[name] += float(value)

    def reduce(self) -> "Counters":
        """Sum every counter over all ranks (a no-op without an initialised process group).

        All ranks must call it with the same names: names are sorted and the union is not
        negotiated, so the loops add every name on every rank (zero where nothing was seen).
        """
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        names = sorted(self.sums)
        backend = dist.get_backend()
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        values = torch.tensor([self.sums[n] for n in names], dtype=torch.float64, device=device)
        dist.all_reduce(values)
        out = Counters()
        for name, value in zip(names, values.tolist()):
            out.sums[name] = value
        return out

    def means(self) -> dict[str, float]:
        """``sum / count`` for every counted metric, and plain totals as they are."""
        out: dict[str, float] = {}
        for name, value in self.sums.items():
            if name.endswith("/count"):
                continue
            count = self.sums.get(f"{name}/count")
            if count is None:
                out[name] = value
            else:
                out[name] = value / count if count > 0 else float("nan")
        return out

    def clear(self) -> None:
        self.sums.clear()

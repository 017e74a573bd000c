"""Summable metric counters, reduced across workers before anyone reports them.

Means are never averaged across ranks (that weighs a rank with 3 frames like one with 3000):
every metric is kept as a sum and a count, summed over ranks with one all-reduce, and only then
divided. Histograms (e.g. how often each codebook entry is a target) are summable vectors and
reduced in the same all-reduce.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.distributed as dist


class Counters:
    """Named float sums and summable vectors.

    ``add("loss", 3.2, weight)`` keeps ``loss`` and ``loss/count``; ``add_total("audio_seconds", 4.1)``
    keeps a plain total; ``add_vector("code_usage", histogram)`` keeps an element-wise sum.
    """

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.vectors: dict[str, torch.Tensor] = {}

    def add(self, name: str, value: float, count: float = 1.0) -> None:
        """Add ``value`` (already a sum over ``count`` items) to ``name``."""
        self.sums[name] += float(value)
        self.sums[f"{name}/count"] += float(count)

    def add_total(self, name: str, value: float) -> None:
        """Add to a plain total (no count), e.g. audio seconds processed."""
        self.sums[name] += float(value)

    def add_vector(self, name: str, value: torch.Tensor) -> None:
        """Add a 1-D tensor element-wise to the vector ``name`` (kept in float64 on the CPU)."""
        value = value.detach().to("cpu", torch.float64).flatten()
        if name in self.vectors:
            if self.vectors[name].shape != value.shape:
                raise ValueError(f"Counters.add_vector({name!r}): shape {tuple(value.shape)} != {tuple(self.vectors[name].shape)}")
            self.vectors[name] += value
        else:
            self.vectors[name] = value.clone()

    def merge(self, other: "Counters") -> "Counters":
        """Add every counter of ``other`` into this one; returns self."""
        for name, value in other.sums.items():
            self.sums[name] += value
        for name, value in other.vectors.items():
            self.add_vector(name, value)
        return self

    def reduce(self) -> "Counters":
        """Sum every counter over all ranks (a no-op without an initialised process group).

        All ranks must call it with the same names and vector shapes: names are sorted and the
        union is not negotiated, so the loops add every name on every rank (zero where nothing
        was seen).
        """
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        names = sorted(self.sums)
        vector_names = sorted(self.vectors)
        backend = dist.get_backend()
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        parts = [torch.tensor([self.sums[n] for n in names], dtype=torch.float64)]
        parts += [self.vectors[n] for n in vector_names]
        flat = torch.cat(parts).to(device)
        dist.all_reduce(flat)
        flat = flat.cpu()
        out = Counters()
        for name, value in zip(names, flat[: len(names)].tolist()):
            out.sums[name] = value
        offset = len(names)
        for name in vector_names:
            size = self.vectors[name].numel()
            out.vectors[name] = flat[offset : offset + size].clone()
            offset += size
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
        self.vectors.clear()


def perplexity(histogram: torch.Tensor) -> float:
    """``exp(entropy)`` of the distribution given by ``histogram`` (counts).

    For codebook usage: the effective number of codebook entries in use. It equals the
    codebook size when every entry is a target equally often and falls towards 1 when the
    targets collapse onto a few entries. ``nan`` for an empty histogram.
    """
    counts = histogram.double().flatten()
    total = counts.sum()
    if total <= 0:
        return math.nan
    p = counts[counts > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))

"""Forward time and peak memory: the one memory measurement, and the profile of a trial's model.

Peak memory of one call (the extra bytes the call needs on top of what is live before it) is
measured one way for the sweep profile and the benchmarks (:func:`measure_peak_memory`):

- CUDA: ``torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()`` around the call
  (caching-allocator bytes, the number papers quote).
- CPU, ``peak_alloc_bytes``: the same quantity for the CPU allocator, from the allocation and free
  events of the autograd profiler (``profile_memory=True``): their running sum in time order is
  the live-bytes curve and its maximum is the peak. It counts every tensor PyTorch allocates
  (forward, autograd buffers, gradients) and nothing else.
- CPU, ``peak_rss_bytes`` (cross-check, what the operating system sees): after the warm-up,
  ``malloc_trim(0)`` returns freed heap pages to the kernel, writing ``5`` to
  ``/proc/self/clear_refs`` resets the kernel's resident-set high-water mark (``VmHWM``), and the
  peak is ``VmHWM`` after the call minus ``VmRSS`` before it. It adds what the allocator cannot
  see (BLAS/oneDNN scratch buffers, fragmentation). ``None`` where ``/proc`` is unavailable.
  (A sampled resident-set size is not used: the allocator reuses pages freed by the warm-up,
  so it reported 0.0 MB for models that ran.)

The trial profile (:func:`profile_model`) has two scopes (``profile.scope`` in the sweep spec):

- ``encoder``: the Conformer blocks alone on front-end-sized inputs (40 ms frames), the call's
  peak above the weights and inputs; comparable across the trials of one sweep.
- ``paper``: what the PoM paper measured -- the forward of front-end + encoder + CTC head on
  80-dim fbank frames, the weights and inputs included (everything allocated at the peak),
  batch 6 x 10..80 s, fp16 autocast on GPU (fp32 on CPU).

Both report ``encoder_time_s`` / ``encoder_peak_mem_mb`` (at the longest length, the metric names
objectives use) and the same per length (``.../<L>s``). Numbers from one machine are comparable
with each other, not across machines.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

FRAME_SECONDS = 0.04  # encoder frames after 4x subsampling of 10 ms fbank frames
SCOPE_DEFAULTS: dict[str, tuple[tuple[float, ...], int]] = {
    "encoder": ((10.0, 20.0), 2),  # (lengths in seconds, batch size)
    "paper": ((10.0, 20.0, 40.0, 80.0), 6),
}
SCOPES = tuple(SCOPE_DEFAULTS)


# --------------------------------------------------------------------------------------------
# peak memory of one call
# --------------------------------------------------------------------------------------------

_LIBC: Any = None


def _malloc_trim() -> None:
    global _LIBC
    if _LIBC is None:
        name = ctypes.util.find_library("c")
        _LIBC = ctypes.CDLL(name) if name else False
    if _LIBC and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def peak_rss_growth(fn: Callable[[], Any], setup: Callable[[], Any] | None = None) -> int | None:
    """Resident-set high-water growth during ``fn()`` in bytes (Linux), else ``None``."""
    if setup is not None:
        setup()
    try:
        _malloc_trim()
        with open("/proc/self/clear_refs", "w") as f:  # "5": reset VmHWM to the current RSS
            f.write("5")
        before = _status_bytes("VmRSS")
    except (OSError, KeyError):
        return None
    fn()
    return max(0, _status_bytes("VmHWM") - before)


def peak_cpu_alloc_growth(fn: Callable[[], Any], setup: Callable[[], Any] | None = None) -> int | None:
    """Peak of live CPU-allocator bytes during ``fn()`` above the start, from profiler events.

    Uses the autograd profiler (``torch.autograd.profiler.profile``): unlike ``torch.profiler``
    it starts in milliseconds (no compiler-stack import). ``None`` if this PyTorch build does not
    expose the raw allocation events.
    """
    from torch.autograd.profiler import profile

    # Kineto (the profiler's backend) logs "gpuGetDeviceCount failed" on a machine without a GPU
    # when PyTorch is a CUDA build; level 5 (above ERROR) keeps that line out of every trial's log.
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    if setup is not None:
        setup()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(profile_memory=True) as prof:
            fn()
    try:
        events = prof.kineto_results.events()  # raw events, allocations and frees included
        memory = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    except AttributeError:  # pragma: no cover - private attribute moved
        return None
    live = peak = 0
    for _, nbytes in memory:
        live += nbytes
        peak = max(peak, live)
    return peak


def measure_peak_memory(
    fn: Callable[[], Any],
    device: torch.device | str,
    *,
    rss: bool = True,
    setup: Callable[[], Any] | None = None,
) -> dict[str, int | None]:
    """Peak extra memory of one call of ``fn`` (see the module docstring for the method).

    ``setup`` runs before each measured call, outside it: it should free what the call would
    otherwise free first (e.g. gradients of the previous step, with ``set_to_none``), so the
    call's peak counts them as fresh allocations on every device alike.

    Returns:
        ``peak_alloc_bytes`` (allocator bytes above those live before the call),
        ``peak_rss_bytes`` (CPU only, resident-set growth; ``None`` on CUDA or when unavailable),
        ``live_before_bytes`` (CUDA: allocated bytes before the call; CPU: ``None``).
    """
    device = torch.device(device)
    if device.type == "cuda":
        if setup is not None:
            setup()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return {
            "peak_alloc_bytes": torch.cuda.max_memory_allocated(device) - before,
            "peak_rss_bytes": None,
            "live_before_bytes": before,
        }
    rss_peak = peak_rss_growth(fn, setup) if rss else None
    return {"peak_alloc_bytes": peak_cpu_alloc_growth(fn, setup), "peak_rss_bytes": rss_peak, "live_before_bytes": None}


def tensor_bytes(*objects: Any) -> int:
    """Bytes of the parameters and buffers of modules and of plain tensors (what a call starts with)."""
    total = 0
    for obj in objects:
        if isinstance(obj, torch.nn.Module):
            total += sum(t.numel() * t.element_size() for t in obj.parameters())
            total += sum(t.numel() * t.element_size() for t in obj.buffers())
        elif isinstance(obj, torch.Tensor):
            total += obj.numel() * obj.element_size()
    return total


# --------------------------------------------------------------------------------------------
# the trial profile
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One profiled forward: the module, its inputs, and whether weights + inputs count in the peak."""

    module: torch.nn.Module
    forward: Callable[[], Any]
    inputs: tuple[torch.Tensor, ...]
    include_weights_and_inputs: bool


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device_type=device.type, dtype=dtype)


def _profile_cases(
    make_case: Callable[[int], Case],
    prefix: str,
    *,
    lengths_s: Sequence[float],
    repeats: int,
    device: torch.device,
    dtype: torch.dtype | None,
) -> dict[str, float]:
    """Warm up, measure the peak memory of one call, then time ``repeats`` calls, per length."""
    out: dict[str, float] = {}
    for seconds in lengths_s:
        frames = max(1, int(round(seconds / FRAME_SECONDS)))
        case = make_case(frames)
        case.module.to(device).eval()

        def run() -> None:
            with torch.inference_mode(), _autocast(device, dtype):
                case.forward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        run()  # warm-up (kernel selection, caches, lazily built buffers)
        gc.collect()
        memory = measure_peak_memory(run, device, rss=False)
        peak = memory["peak_alloc_bytes"]
        if peak is None:  # this PyTorch exposes no allocation events: what the kernel saw instead
            peak = peak_rss_growth(run)
        if case.include_weights_and_inputs and peak is not None:
            live = memory["live_before_bytes"]
            peak += live if live is not None else tensor_bytes(case.module, *case.inputs)
        if not peak:
            log.warning("%s profile at %g s: no peak memory measured; reporting NaN", prefix, seconds)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        key = f"{seconds:g}s"
        out[f"{prefix}_time_s/{key}"] = statistics.median(times)
        out[f"{prefix}_peak_mem_mb/{key}"] = peak / 2**20 if peak else math.nan
        del case
        gc.collect()
    longest = f"{max(lengths_s):g}s"
    out[f"{prefix}_time_s"] = out[f"{prefix}_time_s/{longest}"]
    out[f"{prefix}_peak_mem_mb"] = out[f"{prefix}_peak_mem_mb/{longest}"]
    return out


def profile_encoder(
    encoder: torch.nn.Module,
    model_dim: int,
    *,
    lengths_s: Sequence[float] = (10.0, 20.0),
    batch_size: int = 2,
    repeats: int = 2,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Time and peak memory of ``encoder(x, padding_mask)`` forward passes (the ``encoder`` scope).

    Args:
        encoder: a module called as ``encoder(x (B, T, D), padding_mask (B, T))``.
        model_dim: D.
        lengths_s: audio lengths; T = seconds / 0.04.
        batch_size: B.
        repeats: timed runs per length after the warm-up and the memory call (the median is kept).
        device: where to run.
        dtype: autocast dtype (e.g. torch.float16 on CUDA), None for fp32.

    Returns:
        ``{"encoder_time_s/20s": ..., "encoder_peak_mem_mb/20s": ..., "encoder_time_s": <longest>,
        "encoder_peak_mem_mb": <longest>}``; the peak is the call's, above weights and inputs.
    """
    device = torch.device(device)

    def make_case(frames: int) -> Case:
        x = torch.randn(batch_size, frames, model_dim, device=device)  # (B, T, D)
        mask = torch.zeros(batch_size, frames, dtype=torch.bool, device=device)  # (B, T), True = pad
        return Case(encoder, lambda: encoder(x, mask), (x, mask), include_weights_and_inputs=False)

    return _profile_cases(make_case, "encoder", lengths_s=lengths_s, repeats=repeats, device=device, dtype=dtype)


def profile_paper_scope(
    model_config: Any,
    *,
    lengths_s: Sequence[float] = (10.0, 20.0, 40.0, 80.0),
    batch_size: int = 6,
    repeats: int = 2,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """The paper's protocol: forward of front-end + encoder + CTC head, weights and inputs included.

    The input is a batch of normalised fbank frames (10 ms, ``frontend.n_mels`` bins, 4 per
    encoder frame), every utterance ``L`` seconds long. Keys as :func:`profile_encoder`.
    """
    from models.builder import build_ctc

    device = torch.device(device)
    torch.manual_seed(0)
    model = build_ctc(model_config)
    factor = model_config.frontend.subsampling_factor

    def make_case(frames: int) -> Case:
        fbank = frames * factor
        features = torch.randn(batch_size, fbank, model_config.frontend.n_mels, device=device)  # (B, 4T, n_mels)
        lengths = torch.full((batch_size,), fbank, dtype=torch.long, device=device)  # (B,)
        return Case(model, lambda: model.forward_features(features, lengths), (features, lengths),
                    include_weights_and_inputs=True)

    return _profile_cases(make_case, "encoder", lengths_s=lengths_s, repeats=repeats, device=device, dtype=dtype)


def profile_model(
    model_config: Any,
    *,
    scope: str = "encoder",
    lengths_s: Sequence[float] | None = None,
    batch_size: int | None = None,
    repeats: int = 2,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """The trial profile of a :class:`models.config.ModelConfig` in ``scope`` (see the module docstring).

    ``lengths_s`` / ``batch_size`` ``None`` take the scope's defaults (``encoder``: 10, 20 s x 2;
    ``paper``: 10, 20, 40, 80 s x 6). ``device`` ``None``: CUDA when available (fp16 autocast there).
    """
    if scope not in SCOPE_DEFAULTS:
        raise ValueError(f"profile.scope {scope!r} is not one of {', '.join(SCOPES)}")
    default_lengths, default_batch = SCOPE_DEFAULTS[scope]
    lengths_s = tuple(lengths_s or default_lengths)
    batch_size = batch_size or default_batch
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if device.type == "cuda" else None
    if scope == "paper":
        return profile_paper_scope(model_config, lengths_s=lengths_s, batch_size=batch_size, repeats=repeats,
                                   device=device, dtype=dtype)
    from models.builder import build_encoder

    torch.manual_seed(0)
    return profile_encoder(build_encoder(model_config), model_config.encoder.model_dim, lengths_s=lengths_s,
                           batch_size=batch_size, repeats=repeats, device=device, dtype=dtype)

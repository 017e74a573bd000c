"""Encoder profile of one trial: forward time and peak memory at fixed audio lengths.

The measured part is the encoder stack (Conformer blocks) on front-end-sized inputs, as in the
paper's protocol (batch of B utterances of L seconds, 40 ms frames, forward only). Peak memory is
``torch.cuda.max_memory_allocated`` on GPU; on CPU it is the peak resident-set growth above the
baseline, sampled by a thread (a faithful upper bound of what the allocator held). Numbers from
one machine are comparable with each other, not across machines.
"""

from __future__ import annotations

import gc
import os
import statistics
import threading
import time
from typing import Any, Sequence

import torch

FRAME_SECONDS = 0.04  # encoder frames after 4x subsampling of 10 ms fbank frames


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakRss:
    """Samples the resident set size every millisecond while active."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.001)

    def __enter__(self) -> "_PeakRss":
        self.peak = _rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


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
    """Time and peak memory of ``encoder(x, padding_mask)`` forward passes.

    Args:
        encoder: a module called as ``encoder(x (B, T, D), padding_mask (B, T))``.
        model_dim: D.
        lengths_s: audio lengths; T = seconds / 0.04.
        batch_size: B.
        repeats: timed runs per length after one warm-up (the median is kept).
        device: where to run.
        dtype: autocast dtype on CUDA (e.g. torch.float16), None for fp32.

    Returns:
        ``{"encoder_time_s/20s": ..., "encoder_peak_mem_mb/20s": ..., "encoder_time_s": <longest>,
        "encoder_peak_mem_mb": <longest>}``.
    """
    device = torch.device(device)
    encoder = encoder.to(device).eval()
    out: dict[str, float] = {}
    for seconds in lengths_s:
        frames = max(1, int(round(seconds / FRAME_SECONDS)))
        x = torch.randn(batch_size, frames, model_dim, device=device)
        mask = torch.zeros(batch_size, frames, dtype=torch.bool, device=device)
        autocast = (
            torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else torch.autocast(device.type, enabled=False)
        )

        def run() -> None:
            with torch.inference_mode(), autocast:
                encoder(x, mask)
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        run()  # warm-up (kernel selection, caches)
        gc.collect()
        times = []
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            for _ in range(repeats):
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
            peak = torch.cuda.max_memory_allocated(device) - base
        else:
            peak = 0
            for _ in range(repeats):
                with _PeakRss() as sampler:
                    base = _rss_bytes()
                    start = time.perf_counter()
                    run()
                    times.append(time.perf_counter() - start)
                peak = max(peak, sampler.peak - base)
        key = f"{seconds:g}s"
        out[f"encoder_time_s/{key}"] = statistics.median(times)
        out[f"encoder_peak_mem_mb/{key}"] = peak / 2**20
        del x, mask
        gc.collect()
    longest = f"{max(lengths_s):g}s"
    out["encoder_time_s"] = out[f"encoder_time_s/{longest}"]
    out["encoder_peak_mem_mb"] = out[f"encoder_peak_mem_mb/{longest}"]
    return out

"""Measurement helpers shared by the benchmark scripts: timing, peak memory, fresh processes.

Timing. Machines running benchmarks are often shared, so absolute seconds drift from one minute to
the next. Every timed candidate is therefore run interleaved with a reference workload in the same
process (round-robin, the order rotated each repeat), and speed claims are medians of per-repeat
ratios ``candidate / reference``. On CPU the clock is the process's CPU time (see
:class:`Timings`; wall time is reported too), on CUDA the synchronised wall time. Across processes (one per measurement, for clean peak memory)
the reference is :func:`calibration_workload`, a fixed matrix product: ``time_rel`` is the
candidate's time in units of that product measured alongside it, so two processes that ran under
different load can still be compared.

Peak memory of one call (the extra bytes the call needs on top of what is live before it):

- CUDA: ``torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()`` around the call
  (caching-allocator bytes, the number papers quote).
- CPU, ``peak_alloc_bytes``: the same quantity for the CPU allocator, from the allocation and free
  events of ``torch.profiler`` (``profile_memory=True``): their running sum in time order is the
  live-bytes curve and its maximum is the peak. It counts every tensor PyTorch allocates (forward,
  autograd buffers, gradients) and nothing else.
- CPU, ``peak_rss_bytes`` (cross-check, what the operating system sees): after the warm-up,
  ``malloc_trim(0)`` returns freed heap pages to the kernel, writing ``5`` to
  ``/proc/self/clear_refs`` resets the kernel's resident-set high-water mark (``VmHWM``, the value
  behind ``getrusage().ru_maxrss``), and the peak is ``VmHWM`` after the call minus ``VmRSS``
  before it. It adds what the allocator cannot see (BLAS/oneDNN scratch buffers, allocator
  fragmentation). Resetting the high-water mark is what makes a warm-up possible: plain
  ``ru_maxrss`` would keep the warm-up's peak. ``None`` where ``/proc`` is unavailable.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
FRAME_SECONDS = 0.04  # encoder frame: 10 ms fbank hop x 4 (two stride-2 convolutions)
FBANK_SECONDS = 0.01


def seconds_to_frames(seconds: float) -> int:
    """Encoder frames (40 ms each) of ``seconds`` of audio."""
    return int(round(seconds / FRAME_SECONDS))


# --------------------------------------------------------------------------------------------
# device, dtype, environment
# --------------------------------------------------------------------------------------------


def pick_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; otherwise ``torch.device(name)``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name} asked for but CUDA is not available")
    return device


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def autocast(device: torch.device, dtype_name: str):
    """Mixed precision as in training (``torch.autocast``); a no-op context for float32."""
    if dtype_name == "float32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=DTYPES[dtype_name])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def environment(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on."""
    env: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "loadavg": _loadavg(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    try:
        import torchaudio

        env["torchaudio"] = torchaudio.__version__
    except ImportError:  # pragma: no cover - torchaudio is a project dependency
        pass
    return env


def _loadavg() -> list[float] | None:
    """1, 5 and 15 minute load averages: how busy the machine was (a shared one is noisy)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------


def calibration_workload(device: torch.device) -> Callable[[], None]:
    """A fixed matrix product used as the time unit of cross-process comparisons.

    1024^3 multiply-adds in float32 on CPU (tens of milliseconds on a laptop core pair), 4096^3 on
    CUDA; its inputs are built once, so a call allocates only its output.
    """
    n = 4096 if device.type == "cuda" else 1024
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device)
    b = torch.randn(n, n, generator=g).to(device)

    def run() -> None:
        torch.mm(a, b)

    return run


@dataclass
class Timings:
    """Per-call seconds of each timed function, by two clocks.

    ``wall``: elapsed time (``perf_counter``, the device synchronised around each call).
    ``cpu``: CPU time of this process (``process_time``: every thread, user + system).
    ``main``: the clock speed claims use: CPU time on CPU devices (time slices taken by other
    processes on an oversubscribed machine do not count, so ratios stay stable under load; with
    one intra-op thread it equals the wall time of an idle machine), wall time on CUDA (where the
    host's CPU time says nothing about the kernels). ``clock`` names it.
    """

    wall: dict[str, list[float]]
    cpu: dict[str, list[float]]
    clock: str

    @property
    def main(self) -> dict[str, list[float]]:
        return self.cpu if self.clock == "cpu" else self.wall


def time_interleaved(
    fns: dict[str, Callable[[], Any]],
    device: torch.device,
    *,
    repeats: int,
    warmup: int = 1,
    min_seconds: float = 0.0,
    max_seconds: float | None = None,
    max_repeats: int = 200,
    min_repeats: int = 3,
) -> Timings:
    """Time each function, run round-robin.

    The order rotates every round so no function always runs first (caches, turbo, a neighbour's
    burst of load hit every candidate alike). At least ``repeats`` rounds run; more run (up to
    ``max_repeats``) until the rounds have taken ``min_seconds`` of wall time, so short calls get
    many samples. ``max_seconds`` stops early, after at least ``min_repeats`` rounds, once the
    rounds have taken that long.

    Returns:
        :class:`Timings`: name -> list of seconds, one per round, all the same length.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    synchronize(device)
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    started = time.perf_counter()
    r = 0
    while True:
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            synchronize(device)
            w0, c0 = time.perf_counter(), time.process_time()
            fns[name]()
            synchronize(device)
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - w0)
        r += 1
        elapsed = time.perf_counter() - started
        if max_seconds is not None and r >= min_repeats and elapsed > max_seconds:
            break
        if r >= repeats and (elapsed >= min_seconds or r >= max_repeats):
            break
    return Timings(wall=wall, cpu=cpu, clock="wall" if device.type == "cuda" else "cpu")


def set_threads(threads: int | None) -> None:
    """``torch.set_num_threads``; ``None`` or 0 keeps torch's default."""
    if threads:
        torch.set_num_threads(threads)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def ratio_stats(numerator: Sequence[float], denominator: Sequence[float]) -> dict[str, float]:
    """Statistics of the per-round ratios ``numerator[i] / denominator[i]``.

    ``median`` (the headline), ``q1``/``q3`` (quartiles: the spread), ``min``/``max``, and
    ``of_best`` = ``min(numerator) / min(denominator)``: the ratio of the least-disturbed runs,
    a cross-check that is robust to load from other processes (timeit's "best of N").
    """
    ratios = sorted(a / b for a, b in zip(numerator, denominator))
    q1, q3 = (statistics.quantiles(ratios, n=4)[::2] if len(ratios) > 1 else (ratios[0], ratios[0]))
    return {
        "median": median(ratios),
        "q1": float(q1),
        "q3": float(q3),
        "min": ratios[0],
        "max": ratios[-1],
        "of_best": min(numerator) / min(denominator),
    }


# --------------------------------------------------------------------------------------------
# peak memory
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
    import warnings

    from torch.autograd.profiler import profile

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


def op_table(fn: Callable[[], Any], device: torch.device, *, calls: int = 1, top: int = 15) -> dict[str, Any]:
    """Operators of ``calls`` runs of ``fn`` by self time (CUDA time on CUDA), per run."""
    import warnings

    from torch.autograd.profiler import profile

    kwargs = {"use_device": "cuda"} if device.type == "cuda" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(**kwargs) as prof:
            for _ in range(calls):
                fn()
            synchronize(device)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    rows = sorted((e for e in prof.key_averages() if getattr(e, attr) > 0), key=lambda e: getattr(e, attr), reverse=True)
    total = sum(getattr(e, attr) for e in rows)
    return {
        "clock": device.type,
        "total_ms": total / calls / 1000,
        "ops": [
            {
                "op": e.key,
                "calls": e.count / calls,
                "self_ms": getattr(e, attr) / calls / 1000,
                "share": getattr(e, attr) / total,
            }
            for e in rows[:top]
        ],
    }


def measure_peak_memory(
    fn: Callable[[], Any],
    device: torch.device,
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
    if device.type == "cuda":
        if setup is not None:
            setup()
        synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
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
# fresh processes and output
# --------------------------------------------------------------------------------------------


class ChildFailed(RuntimeError):
    """A measurement subprocess exited with an error (its stderr tail is in the message)."""


def run_child(script: Path, args: Sequence[str], *, timeout: float | None = None) -> dict[str, Any]:
    """Run ``python script *args`` in a fresh process and parse the JSON it prints on stdout."""
    cmd = [sys.executable, str(script), *args]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ChildFailed(f"{' '.join(cmd[1:])} did not finish within {timeout} s") from None
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise ChildFailed(f"{' '.join(cmd[1:])} exited with {proc.returncode}:\n{tail}")
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError as err:
        raise ChildFailed(f"{' '.join(cmd[1:])} printed no JSON ({err}): {proc.stdout[-500:]!r}") from None


def emit(payload: dict[str, Any], out: str | None = None) -> None:
    """Print ``payload`` as JSON on stdout and, when ``out`` is given, write it there too."""
    text = json.dumps(payload, indent=2)
    print(text)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")


def log(message: str) -> None:
    """Progress on stderr (stdout carries the JSON only)."""
    print(message, file=sys.stderr, flush=True)


def mib(nbytes: int | None) -> float | None:
    return None if nbytes is None else round(nbytes / 2**20, 2)

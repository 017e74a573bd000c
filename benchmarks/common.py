"""Measurement helpers shared by the benchmark scripts: timing, peak memory, fresh processes.

Timing. Machines running benchmarks are often shared, so absolute seconds drift from one minute to
the next. Every timed candidate is therefore run interleaved with a reference workload in the same
process (round-robin, the order rotated each repeat), and speed claims are medians of per-repeat
ratios ``candidate / reference``. On CPU the clock is the process's CPU time (see
:class:`Timings`; wall time is reported too), on CUDA the synchronised wall time. Across processes (one per measurement, for clean peak memory)
the reference is :func:`calibration_workload`, a fixed matrix product: ``time_rel`` is the
candidate's time in units of that product measured alongside it, so two processes that ran under
different load can still be compared.

Peak memory of one call: :func:`orchestrator.profile.measure_peak_memory`, the project's one
memory measurement (the sweep's trial profile uses it too; its docstring gives the method: CUDA
``max_memory_allocated``, CPU allocator peak from profiler events, resident-set high-water mark as
a cross-check), re-exported here with the helpers the benchmarks use.
"""

from __future__ import annotations

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

from orchestrator.errors import cli_main, configure_logging
from orchestrator.fileio import atomic_write_text
from orchestrator.profile import (  # noqa: F401 - re-exported: the benchmarks' memory vocabulary
    FRAME_SECONDS,
    measure_peak_memory,
    peak_cpu_alloc_growth,
    peak_rss_growth,
    tensor_bytes,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
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


def cli(body: Callable[[], int | None], *, quiet: bool = False) -> int:
    """Run a benchmark's ``body`` as every CLI of the project runs: logging by
    :func:`~orchestrator.errors.configure_logging`, a user error (a bad config, ``--set`` or corpus)
    as one ``error:`` line and exit code 2 (:func:`~orchestrator.errors.cli_main`); ``None`` is exit 0."""
    configure_logging(quiet=quiet)
    return cli_main(lambda: body() or 0)


def emit(payload: dict[str, Any], out: str | None = None) -> None:
    """Print ``payload`` as JSON on stdout and, when ``out`` is given, write it there too."""
    text = json.dumps(payload, indent=2)
    print(text)
    if out:
        atomic_write_text(out, text + "\n")


def log(message: str) -> None:
    """Progress on stderr (stdout carries the JSON only)."""
    print(message, file=sys.stderr, flush=True)


def mib(nbytes: int | None) -> float | None:
    return None if nbytes is None else round(nbytes / 2**20, 2)

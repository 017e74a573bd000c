"""Time and peak memory of every token mixer, and of whole encoders, versus utterance length.

Usage:
    # every mixer in MIXERS at 10, 20, 40, 80, 160 s (T = 250 .. 4000 frames of 40 ms), batch 1,
    # d 512, forward (inference mode) and forward+backward; JSON on stdout, plot and JSON in
    # benchmarks/results/
    .venv/bin/python benchmarks/mixer_profile.py

    # a subset, other sizes
    .venv/bin/python benchmarks/mixer_profile.py --mixers mha_relpos pom --lengths 20 80 --batch 2 --model-dim 256

    # whole encoders: base config (12 layers; d 576 for attention plans, 488 for PoM k2 D2,
    # matched for SummaryMixing), front-end + encoder, batch 6, 10..80 s, forward in inference mode
    .venv/bin/python benchmarks/mixer_profile.py --encoder
    # the paper's protocol: front-end + encoder + CTC head, fp16 on a GPU (peak_total_bytes is
    # the number to set beside the paper's; the sweep's profile.scope: paper measures the same)
    .venv/bin/python benchmarks/mixer_profile.py --encoder --scope paper --dtype float16 --device cuda
    # what fits a CPU in minutes
    .venv/bin/python benchmarks/mixer_profile.py --encoder --batch 1 --lengths 10 20 40 80 --repeats 2

    # smoke mode (tiny sizes, seconds)
    .venv/bin/python benchmarks/mixer_profile.py --quick
    .venv/bin/python benchmarks/mixer_profile.py --encoder --quick

Every measurement (one mixer or plan, one length, one pass) runs in a fresh process: this script
re-runs itself with ``--single``, so allocator state, caches and the memory high-water mark of
one measurement never leak into the next.

Within that process, in order: build the module and its input; warm up; measure peak memory of
one call (``orchestrator.profile.measure_peak_memory``, the sweep profile's too: on CUDA
``max_memory_allocated``; on CPU the allocator's live-bytes peak from profiler allocation events,
cross-checked by the resident-set high-water growth after a kernel reset of the mark); then
time ``--repeats`` calls interleaved with a fixed calibration matrix product. ``time_s`` is the median time by the ``clock`` of
``benchmarks/common.py`` (process CPU time on CPU, which other processes' load does not inflate;
synchronised wall time on CUDA), ``wall_time_s`` the median wall time; ``time_rel`` is the median
per-round ratio to the calibration product, the number to compare across processes on a shared
machine (``time_rel_of_best``: the same from the fastest call of each, a cross-check). The plot
shows ``time_s``. ``peak_total_bytes`` adds the bytes of the weights and inputs to the call's peak (the
quantity the paper quotes: everything allocated at the peak).

Forward runs under ``torch.inference_mode()`` with the module in eval mode; forward+backward
runs in train mode, backpropagates ``output.sum()`` into the weights and the input (as inside a
network), and clears gradients (``set_to_none``) before every call so their allocation is counted.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import (
    RESULTS_DIR,
    ChildFailed,
    autocast,
    calibration_workload,
    cli,
    emit,
    environment,
    log,
    measure_peak_memory,
    median,
    mib,
    pick_device,
    ratio_stats,
    run_child,
    seconds_to_frames,
    set_threads,
    synchronize,
    tensor_bytes,
    time_interleaved,
)
from orchestrator.fileio import atomic_output

SCRIPT = Path(__file__).resolve()
PASSES = ("fwd", "fwdbwd")
MIXER_LENGTHS = (10.0, 20.0, 40.0, 80.0, 160.0)
ENCODER_LENGTHS = (10.0, 20.0, 40.0, 80.0)
ENCODER_PLANS = ("mha_relpos", "mha", "summary_mixing", "pom")
SCOPES = ("frontend+encoder", "encoder", "paper")
QUICK_MIXERS = ("mha_relpos", "pom")


# --------------------------------------------------------------------------------------------
# one measurement (the --single child)
# --------------------------------------------------------------------------------------------


def build_mixer_case(args: argparse.Namespace, device: torch.device):
    """The mixer and its input; returns (module, inputs tuple, info dict)."""
    from models.mixers import build_mixer, get_mixer_class

    options: dict[str, Any] = {}
    if "num_heads" in inspect.signature(get_mixer_class(args.mixer).__init__).parameters:
        options["num_heads"] = args.num_heads
    torch.manual_seed(0)
    module = build_mixer(args.mixer, args.model_dim, **options).to(device)
    frames = seconds_to_frames(args.length)
    x = torch.randn(args.batch, frames, args.model_dim, device=device)
    padding_mask = torch.zeros(args.batch, frames, dtype=torch.bool, device=device)
    info = {"mixer": args.mixer, "options": options, "model_dim": args.model_dim, "frames": frames}
    return module, (x, padding_mask), info


def build_encoder_case(args: argparse.Namespace, device: torch.device):
    """Front-end + encoder of the preset for ``args.plan`` and an fbank batch (or encoder input)."""
    from models.builder import build_ctc, build_encoder, build_frontend
    from models.config import make_config, plan_label
    from models.frontend import lengths_to_padding_mask

    config = make_config(args.preset, plan=args.plan)
    torch.manual_seed(0)
    encoder = build_encoder(config)
    frames = seconds_to_frames(args.length)
    info: dict[str, Any] = {
        "plan": args.plan,
        "plan_label": plan_label(config.encoder.layers),
        "preset": args.preset,
        "model_dim": config.encoder.model_dim,
        "num_layers": config.encoder.num_layers,
        "scope": args.scope,
        "frames": frames,
    }
    if args.scope == "encoder":
        module = encoder.to(device)
        x = torch.randn(args.batch, frames, config.encoder.model_dim, device=device)
        padding_mask = torch.zeros(args.batch, frames, dtype=torch.bool, device=device)
        info["parameters"] = sum(p.numel() for p in module.parameters())
        return module, (x, padding_mask), info

    class PaperScope(torch.nn.Module):
        """Front-end + encoder + CTC head, as ``orchestrator.profile``'s paper scope."""

        def __init__(self) -> None:
            super().__init__()
            self.model = build_ctc(config)

        def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
            return self.model.forward_features(features, lengths).log_probs  # (b, t', v)

    class FrontendEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.frontend = build_frontend(config)
            self.encoder = encoder

        def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
            x, lengths = self.frontend(features, lengths)  # (b, t', d)
            return self.encoder(x, lengths_to_padding_mask(lengths, x.shape[1]))

    module = (PaperScope() if args.scope == "paper" else FrontendEncoder()).to(device)
    fbank_frames = frames * config.frontend.subsampling_factor
    features = torch.randn(args.batch, fbank_frames, config.frontend.n_mels, device=device)
    lengths = torch.full((args.batch,), fbank_frames, dtype=torch.long, device=device)
    info["fbank_frames"] = fbank_frames
    info["parameters"] = sum(p.numel() for p in module.parameters())
    return module, (features, lengths), info


def make_call(module: torch.nn.Module, inputs: tuple, pass_: str, device: torch.device, dtype: str):
    """Zero-argument functions ``(call, reset)``: one measured call, and what clears its gradients."""
    if pass_ == "fwd":
        module.eval()

        def call() -> None:
            with torch.inference_mode(), autocast(device, dtype):
                module(*inputs)

        return call, None

    module.train()
    x = inputs[0].detach().requires_grad_(True)
    rest = inputs[1:]

    def reset() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None

    def call() -> None:
        reset()
        with autocast(device, dtype):
            y = module(x, *rest)
        y.float().sum().backward()

    return call, reset


def run_single(args: argparse.Namespace) -> dict[str, Any]:
    set_threads(args.threads)
    device = pick_device(args.device)
    if args.encoder:
        module, inputs, info = build_encoder_case(args, device)
    else:
        module, inputs, info = build_mixer_case(args, device)
    call, reset = make_call(module, inputs, args.pass_, device, args.dtype)
    baseline = tensor_bytes(module, *inputs)

    for _ in range(args.warmup):
        call()
    synchronize(device)
    memory = measure_peak_memory(call, device, rss=not args.no_rss, setup=reset)
    reference = calibration_workload(device)
    times = time_interleaved(
        {"candidate": call, "reference": reference},
        device,
        repeats=args.repeats,
        warmup=0,
        min_seconds=args.min_seconds,
        max_seconds=args.max_seconds,
    )
    main = times.main
    rel = ratio_stats(main["candidate"], main["reference"])
    live_before = memory.pop("live_before_bytes")
    peak = memory["peak_alloc_bytes"]
    return {
        **info,
        "pass": args.pass_,
        "seconds": args.length,
        "batch": args.batch,
        "dtype": args.dtype,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "clock": times.clock,
        "time_s": median(main["candidate"]),
        "wall_time_s": median(times.wall["candidate"]),
        "time_rel": rel["median"],
        "time_rel_q1_q3": [rel["q1"], rel["q3"]],
        "time_rel_of_best": rel["of_best"],
        "ref_time_s": median(main["reference"]),
        "repeats": len(main["candidate"]),
        "times_s": main["candidate"],
        **memory,
        "baseline_bytes": live_before if live_before is not None else baseline,
        "peak_total_bytes": None if peak is None else peak + (live_before if live_before is not None else baseline),
    }


# --------------------------------------------------------------------------------------------
# the sweep (parent) and its summary
# --------------------------------------------------------------------------------------------


def child_args(args: argparse.Namespace, name: str, length: float, pass_: str) -> list[str]:
    common = [
        "--single",
        "--length", str(length),
        "--pass", pass_,
        "--batch", str(args.batch),
        "--device", args.device,
        "--dtype", args.dtype,
        "--repeats", str(args.repeats),
        "--min-seconds", str(args.min_seconds),
        "--warmup", str(args.warmup),
        "--threads", str(args.threads),
    ]
    if args.max_seconds is not None:
        common += ["--max-seconds", str(args.max_seconds)]
    if args.no_rss:
        common.append("--no-rss")
    if args.encoder:
        return common + ["--encoder", "--plan", name, "--preset", args.preset, "--scope", args.scope]
    return common + ["--mixer", name, "--model-dim", str(args.model_dim), "--num-heads", str(args.num_heads)]


def run_sweep(args: argparse.Namespace) -> dict[str, Any]:
    names = args.plans if args.encoder else args.mixers
    jobs = [(name, length, pass_) for length in args.lengths for pass_ in args.passes for name in names]

    def measure(job: tuple[str, float, str]) -> dict[str, Any]:
        name, length, pass_ = job
        log(f"[mixer_profile] {name} {length:g} s {pass_} ...")
        try:
            record = run_child(SCRIPT, child_args(args, name, length, pass_), timeout=args.timeout)
        except (ChildFailed, OSError) as err:  # e.g. out of memory: record it and go on
            log(f"[mixer_profile]   {name} {length:g} s {pass_} failed: {err}")
            return {"failure": {"name": name, "seconds": length, "pass": pass_, "error": str(err)[-2000:]}}
        log(
            f"[mixer_profile]   {name} {length:g} s {pass_}: {record['time_s']:.4f} s "
            f"({record['time_rel']:.3f} ref), peak alloc {mib(record['peak_alloc_bytes'])} MiB, "
            f"rss {mib(record['peak_rss_bytes'])} MiB"
        )
        return record

    if args.jobs == 1:
        outcomes = [measure(job) for job in jobs]
    else:  # concurrent processes: memory stays per process, timings share the CPUs (smoke runs)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(args.jobs) as pool:
            outcomes = list(pool.map(measure, jobs))
    results = [o for o in outcomes if "failure" not in o]
    failures = [o["failure"] for o in outcomes if "failure" in o]
    key = "plan" if args.encoder else "mixer"
    payload: dict[str, Any] = {
        "benchmark": "encoder_profile" if args.encoder else "mixer_profile",
        "config": {
            k: v
            for k, v in vars(args).items()
            if k not in ("single", "mixer", "plan", "length", "pass_", "out_dir", "no_plot")
        },
        "environment": environment(pick_device(args.device)),
        "results": results,
        "failures": failures,
        "summary": summarize(results, key),
    }
    stem = "encoder_profile" if args.encoder else "mixer_profile"
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload["json_path"] = str(out_dir / f"{stem}.json")
    if not args.no_plot and results:
        payload["plot_path"] = str(plot(results, key, out_dir / f"{stem}.png", payload["environment"], args))
    return payload


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def summarize(results: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Per pass and length: every candidate's memory and time relative to ``pom``.

    Keys: ``"<pass>"`` -> ``"<seconds>"`` -> ``"<name>"`` -> ratios ``name / pom`` of
    ``peak_total_bytes`` (weights + inputs + the call's peak), ``peak_alloc_bytes`` (the call's
    peak only), ``peak_rss_bytes``, ``time_rel`` (the calibrated time) and ``time_s`` (the raw
    median by the main clock: with CPU time on CPU, the better of the two when few calls were
    timed, since the short calibration product is itself noisy under load).
    """
    by: dict[tuple[str, float], dict[str, dict[str, Any]]] = {}
    for r in results:
        by.setdefault((r["pass"], r["seconds"]), {})[r[key]] = r
    summary: dict[str, Any] = {"reference": "pom"}
    for (pass_, seconds), group in sorted(by.items()):
        ref = group.get("pom")
        if ref is None:
            continue
        summary.setdefault(pass_, {})[f"{seconds:g}"] = {
            name: {
                "memory_total_vs_pom": _ratio(r["peak_total_bytes"], ref["peak_total_bytes"]),
                "memory_peak_vs_pom": _ratio(r["peak_alloc_bytes"], ref["peak_alloc_bytes"]),
                "memory_rss_vs_pom": _ratio(r["peak_rss_bytes"], ref["peak_rss_bytes"]),
                "time_vs_pom": _ratio(r["time_rel"], ref["time_rel"]),
                "time_s_vs_pom": _ratio(r["time_s"], ref["time_s"]),
            }
            for name, r in sorted(group.items())
        }
    return summary


def plot(results: list[dict[str, Any]], key: str, path: Path, env: dict[str, Any], args: argparse.Namespace) -> Path:
    """Time and peak memory versus audio length, log-log, one line per mixer/plan, one column per pass."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    passes = [p for p in PASSES if any(r["pass"] == p for r in results)]
    names = sorted({r[key] for r in results})
    clock = results[0].get("clock", "wall")
    fig, axes = plt.subplots(2, len(passes), figsize=(max(8, 6 * len(passes)), 8), squeeze=False)
    titles = {"fwd": "forward (inference)", "fwdbwd": "forward + backward"}
    for col, pass_ in enumerate(passes):
        for name in names:
            rows = sorted((r for r in results if r["pass"] == pass_ and r[key] == name), key=lambda r: r["seconds"])
            if not rows:
                continue
            xs = [r["seconds"] for r in rows]
            axes[0][col].plot(xs, [r["time_s"] for r in rows], marker="o", label=name)
            mem = [(r["seconds"], r["peak_total_bytes"]) for r in rows if r["peak_total_bytes"]]
            if mem:
                axes[1][col].plot([m[0] for m in mem], [m[1] / 2**20 for m in mem], marker="o", label=name)
        time_label = "median process CPU time (s)" if clock == "cpu" else "median wall time (s)"
        for row, ylabel in enumerate((time_label, "peak memory (MiB, weights + inputs + call peak)")):
            ax = axes[row][col]
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("audio (s); 40 ms frames")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        axes[0][col].set_title(titles[pass_])
    what = (
        f"encoder {args.preset}, scope {args.scope}" if args.encoder else f"mixers, d {args.model_dim}"
    )
    threads = results[0].get("threads")
    fig.suptitle(f"{what}, batch {args.batch}, {args.dtype}\n{env['device']} ({env.get('gpu', env['cpu'])}, "
                 f"{threads} thread(s) per measurement)", fontsize=10)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from models.mixers import MIXERS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", action="store_true", help="profile whole encoders (--scope) instead of mixers")
    p.add_argument("--mixers", nargs="+", default=None, choices=sorted(MIXERS), metavar="MIXER",
                   help=f"mixers to profile (default: all: {', '.join(sorted(MIXERS))})")
    p.add_argument("--plans", nargs="+", default=None, choices=sorted(MIXERS), metavar="MIXER",
                   help=f"--encoder: uniform layer plans (default: {' '.join(ENCODER_PLANS)})")
    p.add_argument("--lengths", nargs="+", type=float, default=None,
                   help="seconds of audio (default: 10 20 40 80 160; --encoder: 10 20 40 80)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 1; --encoder: 6)")
    p.add_argument("--model-dim", type=int, default=512, help="mixer width d (mixer mode; default 512)")
    p.add_argument("--num-heads", type=int, default=8, help="heads of the attention mixers (default 8)")
    p.add_argument("--preset", default="base", help="--encoder: model preset (default base)")
    p.add_argument("--scope", choices=SCOPES, default="frontend+encoder",
                   help="--encoder: what is measured: the conv front-end on 10 ms fbank frames + the "
                        "Conformer encoder (default), the encoder alone on 40 ms frames, or paper: front-end + "
                        "encoder + CTC head (the paper's protocol with --dtype float16 on a GPU)")
    p.add_argument("--passes", nargs="+", choices=PASSES, default=None,
                   help="fwd and/or fwdbwd (default: both; --encoder: fwd)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per measurement, at least (default 5)")
    p.add_argument("--min-seconds", type=float, default=5.0,
                   help="keep timing (up to 200 calls) until a measurement's timing took this long (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before measuring (default 1)")
    p.add_argument("--max-seconds", type=float, default=60.0,
                   help="stop repeating (after 3 rounds) once a measurement's timing took this long (default 60)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="autocast dtype (default float32 = no autocast; the paper used fp16 on GPU)")
    p.add_argument("--no-rss", action="store_true", help="skip the resident-set cross-check (CPU)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads per measurement (default 1: on a shared machine one thread "
                        "gives stable ratios; 0 = torch's default)")
    p.add_argument("--jobs", type=int, default=None,
                   help="measurement processes run at once (default 1; more spoils timings, not memory; --quick: 4)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed per measurement process")
    p.add_argument("--out-dir", default=str(RESULTS_DIR), help="where the JSON and PNG go (default benchmarks/results)")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    p.add_argument("--quick", action="store_true",
                   help="smoke mode: 2 mixers/plans, 1 s, tiny sizes, 2 repeats (seconds, numbers meaningless)")
    # one measurement, in a fresh process (used by the sweep)
    p.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mixer", help=argparse.SUPPRESS)
    p.add_argument("--plan", help=argparse.SUPPRESS)
    p.add_argument("--length", type=float, help=argparse.SUPPRESS)
    p.add_argument("--pass", dest="pass_", choices=PASSES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.quick:
        args.mixers = args.mixers or list(QUICK_MIXERS)
        args.plans = args.plans or list(QUICK_MIXERS)
        args.lengths = args.lengths or [1.0]
        args.model_dim = 32
        args.num_heads = 4
        args.repeats = 2
        args.min_seconds = 0.0
        args.jobs = args.jobs or 4
        if args.encoder:
            args.preset = "tiny"
            args.batch = args.batch or 1
    args.mixers = args.mixers or sorted(MIXERS)
    args.plans = args.plans or list(ENCODER_PLANS)
    args.lengths = args.lengths or list(ENCODER_LENGTHS if args.encoder else MIXER_LENGTHS)
    args.batch = args.batch or (6 if args.encoder else 1)
    args.jobs = args.jobs or 1
    args.passes = args.passes or (["fwd"] if args.encoder else list(PASSES))
    for name in ("batch", "model_dim", "num_heads", "repeats", "jobs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if any(length <= 0 for length in args.lengths):
        p.error(f"--lengths must be positive seconds, got {args.lengths}")
    if args.single:
        missing = [flag for flag, value in (("--length", args.length), ("--pass", args.pass_)) if value is None]
        missing += ["--plan"] if args.encoder and not args.plan else []
        missing += ["--mixer"] if not args.encoder and not args.mixer else []
        if missing:
            p.error(f"--single needs {', '.join(missing)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return cli(lambda: _single(args) if args.single else _sweep(args))


def _single(args: argparse.Namespace) -> int:
    emit(run_single(args))
    return 0


def _sweep(args: argparse.Namespace) -> int:
    payload = run_sweep(args)
    emit(payload, payload["json_path"])
    return 0 if payload["results"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Our Conformer encoder (every layer ``mha``) versus ``torchaudio.models.Conformer`` of the same size.

Usage:
    # base size (12 layers, d 576, 8 heads, ffn 2048, kernel 31, dropout 0.1), batch 2 x 10 s
    # (T = 250 frames of 40 ms), forward+backward and forward; JSON on stdout and in benchmarks/results/
    .venv/bin/python benchmarks/vs_torchaudio.py

    # other sizes and inputs
    .venv/bin/python benchmarks/vs_torchaudio.py --preset base --batch 4 --seconds 20 --dropout 0.0
    .venv/bin/python benchmarks/vs_torchaudio.py --model-dim 256 --num-layers 6 --ffn-dim 1024 --conv-kernel 15

    # smoke mode (tiny sizes, seconds)
    .venv/bin/python benchmarks/vs_torchaudio.py --quick

Both encoders are built in one process with the same width, depth, heads, feed-forward width,
depthwise kernel and dropout, both in train mode, on the same ``(b, t, d)`` input with the same
lengths (all frames real unless ``--pad-fraction``; both get their padding masks). One round
runs, in rotating order, forward+backward of each (``output.sum()`` backpropagated into the
weights and the input, gradients cleared with ``set_to_none`` first) and forward of each in
``torch.inference_mode()`` (eval mode). The ratio reported is the median over rounds of
``ours / torchaudio`` measured in the same round, by process CPU time on CPU (robust to other
processes' load; ``wall_ratio`` has the wall-clock ratios) and synchronised wall time on CUDA. Target: ``fwdbwd`` ratio <= 1.0.

The two are the same size, not the same architecture: ours is the paper's Conformer
(GELU feed-forward, sinusoidal absolute positions for ``mha``, SDPA attention with its own q/k/v
projection, LayerNorm + GELU + Linear after the depthwise convolution, biases on the
convolutions); torchaudio's uses SiLU, no positions, ``nn.MultiheadAttention``, BatchNorm + SiLU
+ pointwise Conv1d, no convolution biases. Parameter counts of both are reported.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import (
    RESULTS_DIR,
    cli,
    emit,
    environment,
    log,
    median,
    op_table,
    pick_device,
    ratio_stats,
    seconds_to_frames,
    set_threads,
    time_interleaved,
)

TARGET = 1.0


def build_ours(args: argparse.Namespace):
    from models.builder import build_encoder
    from models.config import make_config

    encoder = {}
    for key, value in (("num_layers", args.num_layers), ("ffn_dim", args.ffn_dim),
                       ("conv_kernel", args.conv_kernel), ("dropout_p", args.dropout)):
        if value is not None:
            encoder[key] = value
    config = make_config(args.preset, plan="mha", model_dim=args.model_dim, num_heads=args.num_heads, encoder=encoder)
    enc = config.encoder
    heads = enc.layers[0].resolved_options()["num_heads"]
    torch.manual_seed(0)
    return build_encoder(config), {
        "model_dim": enc.model_dim,
        "num_heads": heads,
        "ffn_dim": enc.ffn_dim,
        "num_layers": enc.num_layers,
        "conv_kernel": enc.conv_kernel,
        "dropout_p": enc.dropout_p,
    }


def build_torchaudio(size: dict[str, Any]):
    from torchaudio.models import Conformer

    torch.manual_seed(0)
    return Conformer(
        input_dim=size["model_dim"],
        num_heads=size["num_heads"],
        ffn_dim=size["ffn_dim"],
        num_layers=size["num_layers"],
        depthwise_conv_kernel_size=size["conv_kernel"],
        dropout=size["dropout_p"],
    )


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def workloads(ours, theirs, x: torch.Tensor, lengths: torch.Tensor) -> dict[str, Callable[[], Any]]:
    padding_mask = torch.arange(x.shape[1], device=x.device)[None, :] >= lengths[:, None]  # (b, t), True = pad
    x_ours = x.clone().requires_grad_(True)
    x_theirs = x.clone().requires_grad_(True)

    def ours_fwdbwd() -> None:
        ours.train()
        ours.zero_grad(set_to_none=True)
        x_ours.grad = None
        ours(x_ours, padding_mask).sum().backward()

    def theirs_fwdbwd() -> None:
        theirs.train()
        theirs.zero_grad(set_to_none=True)
        x_theirs.grad = None
        theirs(x_theirs, lengths)[0].sum().backward()

    def ours_fwd() -> None:
        ours.eval()
        with torch.inference_mode():
            ours(x, padding_mask)

    def theirs_fwd() -> None:
        theirs.eval()
        with torch.inference_mode():
            theirs(x, lengths)

    return {"ours_fwdbwd": ours_fwdbwd, "torchaudio_fwdbwd": theirs_fwdbwd, "ours_fwd": ours_fwd, "torchaudio_fwd": theirs_fwd}


def run(args: argparse.Namespace) -> dict[str, Any]:
    set_threads(args.threads)
    device = pick_device(args.device)
    ours, size = build_ours(args)
    theirs = build_torchaudio(size)
    ours, theirs = ours.to(device), theirs.to(device)
    frames = seconds_to_frames(args.seconds)
    torch.manual_seed(1)
    x = torch.randn(args.batch, frames, size["model_dim"], device=device)
    lengths = torch.full((args.batch,), frames, dtype=torch.long, device=device)
    if args.pad_fraction > 0:  # a realistic batch: lengths spread down to (1 - pad_fraction) * t
        low = max(1, int(round(frames * (1 - args.pad_fraction))))
        lengths = torch.linspace(frames, low, args.batch, device=device).round().long()
    fns = workloads(ours, theirs, x, lengths)
    log(f"[vs_torchaudio] {size}, batch {args.batch} x {frames} frames ...")
    timings = time_interleaved(fns, device, repeats=args.repeats, warmup=args.warmup,
                               min_seconds=args.min_seconds, max_seconds=args.max_seconds)
    times = timings.main
    result: dict[str, Any] = {}
    for pass_ in ("fwdbwd", "fwd"):
        ours_t, theirs_t = times[f"ours_{pass_}"], times[f"torchaudio_{pass_}"]
        result[pass_] = {
            "ours_s": median(ours_t),
            "torchaudio_s": median(theirs_t),
            "ratio": ratio_stats(ours_t, theirs_t),
            "wall_ratio": ratio_stats(timings.wall[f"ours_{pass_}"], timings.wall[f"torchaudio_{pass_}"]),
        }
        log(f"[vs_torchaudio]   {pass_}: ours/torchaudio = {result[pass_]['ratio']['median']:.3f}")
    ratio = result["fwdbwd"]["ratio"]["median"]
    payload: dict[str, Any] = {
        "benchmark": "vs_torchaudio",
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "environment": environment(device),
        "size": size,
        "input": {"batch": args.batch, "frames": frames, "seconds": args.seconds, "lengths": lengths.tolist()},
        "parameters": {"ours": count(ours), "torchaudio": count(theirs)},
        "repeats": len(times["ours_fwdbwd"]),
        "clock": timings.clock,
        "results": result,
        "target": {
            "ratio_max": TARGET,
            "ratio": ratio,
            "met": ratio <= TARGET,
            "slower_by": max(0.0, ratio - 1.0),
        },
    }
    if args.profile or ratio > TARGET:
        log("[vs_torchaudio] profiling one forward+backward of each ...")
        payload["profile"] = {
            "ours_fwdbwd": op_table(fns["ours_fwdbwd"], device),
            "torchaudio_fwdbwd": op_table(fns["torchaudio_fwdbwd"], device),
        }
    return payload


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="base", help="size preset of models.config (default base)")
    p.add_argument("--model-dim", type=int, default=None, help="d (default: the preset's attention width)")
    p.add_argument("--num-heads", type=int, default=None, help="heads (default: the preset's)")
    p.add_argument("--ffn-dim", type=int, default=None, help="feed-forward width (default: the preset's)")
    p.add_argument("--num-layers", type=int, default=None, help="layers (default: the preset's)")
    p.add_argument("--conv-kernel", type=int, default=None, help="depthwise kernel (default: the preset's)")
    p.add_argument("--dropout", type=float, default=None, help="dropout of both encoders (default: the preset's)")
    p.add_argument("--batch", type=int, default=2, help="batch size (default 2)")
    p.add_argument("--seconds", type=float, default=10.0, help="seconds of audio per utterance, 40 ms frames (default 10)")
    p.add_argument("--pad-fraction", type=float, default=0.0,
                   help="shortest utterance is this fraction shorter than the longest (default 0: no padding)")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds, at least (default 7)")
    p.add_argument("--min-seconds", type=float, default=60.0, help="keep adding rounds until they took this long (default 60)")
    p.add_argument("--max-seconds", type=float, default=600.0, help="stop adding rounds (after 3) past this (default 600)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds (default 1)")
    p.add_argument("--profile", action="store_true", help="add per-operator profiles (always when the target is missed)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, ...")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: stable ratios on a shared machine; 0 = torch's default)")
    p.add_argument("--out", default=str(RESULTS_DIR / "vs_torchaudio.json"), help="JSON copy (default benchmarks/results/vs_torchaudio.json)")
    p.add_argument("--quick", action="store_true", help="smoke mode: tiny preset, 1 x 1 s, 2 rounds (numbers meaningless)")
    args = p.parse_args(argv)
    if args.quick:
        args.preset = "tiny"
        args.batch = 1
        args.seconds = 1.0
        args.repeats = 2
        args.min_seconds = 0.0
    for name in ("batch", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not 0.0 <= args.pad_fraction < 1.0:
        p.error(f"--pad-fraction must be in [0, 1), got {args.pad_fraction}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return cli(lambda: emit(run(args), args.out))


if __name__ == "__main__":
    raise SystemExit(main())

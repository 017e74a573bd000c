"""PoM roofline: PoM forward time divided by the time of its three matrix products alone.

Usage:
    # T = 500 .. 8000 frames, batch 1, d 512, PoM k2 D2; JSON on stdout and in benchmarks/results/
    .venv/bin/python benchmarks/pom_roofline.py

    # other shapes; a profile of where the time goes at T = 4000
    .venv/bin/python benchmarks/pom_roofline.py --frames 1000 2000 4000 --batch 4 --model-dim 488 --profile-frames 4000

    # smoke mode (tiny sizes, seconds)
    .venv/bin/python benchmarks/pom_roofline.py --quick

What is timed, in one process, round-robin over ``--repeats`` rounds (the order rotating each
round), all in ``torch.inference_mode()``:

- ``pom``: ``models.mixers.pom.PolynomialMixer.forward`` (no padding in the batch, mask given).
- ``matmuls``: its three products alone with its own weights and biases on the same shapes:
  ``x @ W_po``, ``x @ W_se`` (each ``(b, t, d) -> (b, t, k*D*d)``) and ``g @ W_out`` with ``g`` a
  ready ``(b, t, k*D*d)`` tensor: the floor any implementation of the same maths must pay.
- the prototypes that led to the current ``pom.py`` (``pom`` itself now runs the ``chunked`` path
  in inference mode and the ``state_mm+fold`` one with autograd; kept as references, each checked
  equal to ``pom`` before it is timed: outputs, and gradients for the training-safe ones):
  ``fused``          one ``Linear(d, 2w)`` for ``po`` and ``se`` (one GEMM, ``x`` read once);
  ``state_mm``       the masked time mean as a matrix product of the per-frame weights
                     ``valid / count`` with each cumulative product: no ``torch.cat`` of the
                     ``(b, t, w)`` features and no masked ``(b, t, w)`` copy;
  ``state_mm+fold``  and ``out(sigmoid(se) * state) = sigmoid(se) @ (W_out * state)^T + b``: the
                     state folded into a per-utterance copy of ``W_out`` (``b x d x w``, smaller
                     than the ``b x t x w`` gating product when ``t > d``);
  ``inplace``        and (inference only) GELU, the products and the sigmoid written into the
                     projections' own buffers;
  ``chunked``        (inference only) all of the above, in two passes over time chunks of
                     ``--chunk`` frames (the state, then the output): no ``(t, w)`` tensor at
                     all, and each chunk's elementwise work runs on cache-resident data.

The ratio reported for each is the median over rounds of ``variant / matmuls`` measured in the
same round, by process CPU time on CPU (robust to other processes' load; ``wall_ratio`` gives the
wall-clock ratios too) and synchronised wall time on CUDA; ``peak_alloc_bytes`` is each one's peak extra memory for one call. ``training``
compares forward+backward of ``pom`` and the training-safe prototypes at ``--train-frames``
(speed-up over ``pom`` and peak memory). Target: ``pom / matmuls <= 1.25`` for ``t >= 2000``. When it is missed, the
``profile`` section lists the operators of one ``pom`` forward by self CPU (or CUDA) time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from benchmarks.common import (
    RESULTS_DIR,
    cli,
    emit,
    environment,
    log,
    measure_peak_memory,
    median,
    op_table,
    pick_device,
    ratio_stats,
    set_threads,
    time_interleaved,
)
from models.mixers.pom import PolynomialMixer

FRAMES = (500, 1000, 2000, 4000, 8000)
TARGET = 1.25
TARGET_FROM = 2000
# name -> implementation flags (see PoMPrototype); "training" variants keep autograd working.
VARIANTS: dict[str, dict[str, Any]] = {
    "fused": {"fused": True},
    "state_mm": {"state_mm": True},
    "state_mm+fold": {"state_mm": True, "fold": True},
    "inplace": {"state_mm": True, "fold": True, "inplace": True},
    "chunked": {"chunk": 1024},
}
TRAINING_VARIANTS = ("fused", "state_mm", "state_mm+fold")


# --------------------------------------------------------------------------------------------
# prototypes (written here to measure them; the mixer itself lives in models/mixers/pom.py)
# --------------------------------------------------------------------------------------------


class PoMPrototype(torch.nn.Module):
    """``PolynomialMixer`` maths with proposed implementation changes; shares the mixer's weights.

    Args:
        mixer: the reference mixer (weights, degree, pad_mean).
        fused: one ``Linear(d, 2w)`` for ``po`` and ``se`` (a concatenated copy of their weights).
        state_mm: the time mean as ``(b, 1, t) @ (b, t, c)`` per cumulative product, with weights
            ``valid / count``: no ``torch.cat`` and no masked ``(b, t, w)`` copy.
        fold: ``out(sigmoid(se) * state) = sigmoid(se) @ (W_out * state)^T + b``: no gating
            product (a ``b x d x w`` weight instead of a ``b x t x w`` tensor).
        inplace: inference only: GELU, the products and the sigmoid written into the projections'
            own buffers.
        chunk: inference only: process time in chunks of this many frames, in two passes (state,
            then output); nothing of size ``(t, w)`` is ever allocated and each chunk's
            elementwise work runs on cache-resident data. Implies state_mm, fold and inplace.
    """

    def __init__(self, mixer: PolynomialMixer, *, fused: bool = False, state_mm: bool = False,
                 fold: bool = False, inplace: bool = False, chunk: int = 0) -> None:
        super().__init__()
        self.mixer = mixer
        if chunk:
            state_mm = fold = inplace = True
        self.fused, self.state_mm, self.fold, self.inplace, self.chunk = fused, state_mm, fold, inplace, chunk
        self.w = mixer.po.out_features
        self.proj = None
        if fused:
            self.proj = torch.nn.Linear(mixer.model_dim, 2 * self.w, bias=mixer.bias)
            self.proj.to(mixer.po.weight.device, mixer.po.weight.dtype)
            with torch.no_grad():
                self.proj.weight.copy_(torch.cat([mixer.po.weight, mixer.se.weight], dim=0))
                if mixer.bias:
                    self.proj.bias.copy_(torch.cat([mixer.po.bias, mixer.se.bias]))

    def _features(self, p: torch.Tensor) -> list[torch.Tensor]:
        """GELU then cumulative products of the k chunks: (b, t, w) -> k tensors (b, t, w/k)."""
        k = self.mixer.degree
        if self.inplace:
            chunks = torch._C._nn.gelu_(p).chunk(k, dim=-1)
            for i in range(1, k):
                chunks[i].mul_(chunks[i - 1])  # g_1 * ... * g_i in place
            return list(chunks)
        g = F.gelu(p).chunk(k, dim=-1)
        out = [g[0]]
        for i in range(1, k):
            out.append(out[-1] * g[i])
        return out

    def _mean_weights(self, valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(b, 1, t) weights whose product with (b, t, c) features is the time mean."""
        if self.mixer.pad_mean == "all":
            return torch.full((valid.shape[0], 1, valid.shape[1]), 1.0 / valid.shape[1], dtype=dtype, device=valid.device)
        count = valid.sum(dim=1, keepdim=True).clamp_min(1)  # (b, 1)
        return (valid.to(dtype) / count.to(dtype)).unsqueeze(1)  # terms stay bounded (fp16-safe)

    def _output(self, s: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """out(sigmoid(s) * state), (b, t, w) -> (b, t, d)."""
        m = self.mixer
        if not self.fold:
            return m.out(torch.sigmoid(s) * state)
        gate = torch.sigmoid_(s) if self.inplace else torch.sigmoid(s)
        weight = (m.out.weight.unsqueeze(0) * state).transpose(1, 2)  # (b, w, d): W_out scaled per utterance
        if m.out.bias is None:
            return torch.bmm(gate, weight)
        return torch.baddbmm(m.out.bias, gate, weight)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        m = self.mixer
        valid = ~padding_mask  # (b, t)
        x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        if self.chunk:
            return self._forward_chunked(x, valid)
        if self.fused:
            ps = self.proj(x)  # (b, t, 2w): [po | se]
            p, s = ps[..., : self.w], ps[..., self.w :]
        else:
            p, s = m.po(x), None
        feats = self._features(p)  # k x (b, t, w/k)
        if self.state_mm:
            weights = self._mean_weights(valid, x.dtype)
            state = torch.cat([torch.matmul(weights, f) for f in feats], dim=-1)  # (b, 1, w)
        else:
            from models.mixers.pom import masked_time_mean

            state = masked_time_mean(torch.cat(feats, dim=-1), valid, m.pad_mean)
        del feats, p
        if s is None:
            s = m.se(x)
        return m.norm(self._output(s, state))  # (b, t, d)

    def _forward_chunked(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        m = self.mixer
        weights = self._mean_weights(valid, x.dtype)  # (b, 1, t)
        state = x.new_zeros(x.shape[0], 1, self.w)
        c = self.w // m.degree
        for start in range(0, x.shape[1], self.chunk):  # pass 1: the state, chunk by chunk
            sl = slice(start, start + self.chunk)
            feats = self._features(m.po(x[:, sl]))
            for i, f in enumerate(feats):
                state[..., i * c : (i + 1) * c].baddbmm_(weights[..., sl], f)
        y = x.new_empty(x.shape[0], x.shape[1], m.model_dim)
        for start in range(0, x.shape[1], self.chunk):  # pass 2: the output, chunk by chunk
            sl = slice(start, start + self.chunk)
            y[:, sl] = self._output(m.se(x[:, sl]), state)
        return m.norm(y)  # (b, t, d)


def check_prototypes(mixer: PolynomialMixer, device: torch.device) -> dict[str, dict[str, float]]:
    """Max abs difference of every prototype to the mixer, outputs and (training variants) gradients."""
    torch.manual_seed(1)
    b, t, d = 3, 37, mixer.model_dim
    x = torch.randn(b, t, d, device=device)
    padding_mask = torch.arange(t, device=device)[None, :] >= torch.tensor([t, 20, 5], device=device)[:, None]
    real = ~padding_mask.unsqueeze(-1)
    x_ref = x.clone().requires_grad_(True)
    y_ref = mixer(x_ref, padding_mask)
    (y_ref * real).square().sum().backward()
    y_ref = y_ref.detach()
    report: dict[str, dict[str, float]] = {}
    for name, flags in VARIANTS.items():
        proto = PoMPrototype(mixer, **{**flags, **({"chunk": 8} if "chunk" in flags else {})})
        if name not in TRAINING_VARIANTS:
            with torch.inference_mode():
                y = proto(x, padding_mask)
            diff = {"output": float(((y - y_ref) * real).abs().max())}
        else:
            x_p = x.clone().requires_grad_(True)
            y = proto(x_p, padding_mask)
            (y * real).square().sum().backward()
            diff = {
                "output": float(((y.detach() - y_ref) * real).abs().max()),
                "grad_input": float((x_p.grad - x_ref.grad).abs().max()),
            }
        if max(diff.values()) > 1e-4:
            raise AssertionError(f"prototype {name} differs from PolynomialMixer: {diff}")
        report[name] = diff
    mixer.zero_grad(set_to_none=True)
    return report


# --------------------------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------------------------


def workloads(
    mixer: PolynomialMixer, batch: int, frames: int, device: torch.device, variants: bool, chunk: int
) -> dict[str, Callable[[], Any]]:
    d, w = mixer.model_dim, mixer.po.out_features
    x = torch.randn(batch, frames, d, device=device)
    g = torch.randn(batch, frames, w, device=device)
    padding_mask = torch.zeros(batch, frames, dtype=torch.bool, device=device)
    po, se, out = mixer.po, mixer.se, mixer.out

    def pom() -> None:
        with torch.inference_mode():
            mixer(x, padding_mask)

    def matmuls() -> None:
        with torch.inference_mode():
            F.linear(x, po.weight, po.bias)
            F.linear(x, se.weight, se.bias)
            F.linear(g, out.weight, out.bias)

    fns: dict[str, Callable[[], Any]] = {"matmuls": matmuls, "pom": pom}
    if variants:
        for name, flags in VARIANTS.items():
            proto = PoMPrototype(mixer, **{**flags, **({"chunk": chunk} if "chunk" in flags else {})})

            def run_variant(proto: PoMPrototype = proto) -> None:
                with torch.inference_mode():
                    proto(x, padding_mask)

            fns[name] = run_variant
    return fns


def profile_forward(mixer: PolynomialMixer, batch: int, frames: int, device: torch.device) -> dict[str, Any]:
    """Operators of one PoM forward by self time."""
    x = torch.randn(batch, frames, mixer.model_dim, device=device)
    padding_mask = torch.zeros(batch, frames, dtype=torch.bool, device=device)

    def forward() -> None:
        with torch.inference_mode():
            mixer(x, padding_mask)

    for _ in range(2):
        forward()
    return {"frames": frames, **op_table(forward, device, calls=3, top=12)}


def train_step_comparison(mixer: PolynomialMixer, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Forward+backward of ``pom`` and the training-safe prototypes, interleaved: time and peak memory."""
    frames = args.train_frames
    x = torch.randn(args.batch, frames, mixer.model_dim, device=device, requires_grad=True)
    padding_mask = torch.zeros(args.batch, frames, dtype=torch.bool, device=device)
    modules: dict[str, torch.nn.Module] = {"pom": mixer}
    modules.update({name: PoMPrototype(mixer, **VARIANTS[name]) for name in TRAINING_VARIANTS})

    def reset() -> None:
        mixer.zero_grad(set_to_none=True)
        for module in modules.values():
            module.zero_grad(set_to_none=True)
        x.grad = None

    def step(module: torch.nn.Module) -> Callable[[], None]:
        def run_step() -> None:
            reset()
            module(x, padding_mask).sum().backward()

        return run_step

    fns = {name: step(module) for name, module in modules.items()}
    timings = time_interleaved(fns, device, repeats=args.repeats, warmup=args.warmup,
                               min_seconds=args.min_seconds, max_seconds=args.max_seconds)
    times = timings.main
    return {
        "clock": timings.clock,
        "frames": frames,
        "batch": args.batch,
        "repeats": len(times["pom"]),
        "time_s": {name: median(t) for name, t in times.items()},
        "speedup_vs_pom": {name: ratio_stats(times["pom"], t)["median"] for name, t in times.items()},
        "peak_alloc_bytes": {
            name: measure_peak_memory(fn, device, rss=False, setup=reset)["peak_alloc_bytes"] for name, fn in fns.items()
        },
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    set_threads(args.threads)
    device = pick_device(args.device)
    torch.manual_seed(0)
    mixer = PolynomialMixer(args.model_dim, degree=args.degree, expand=args.expand).to(device).eval()
    checks = check_prototypes(mixer, device) if not args.no_variants else {}
    rows: list[dict[str, Any]] = []
    for frames in args.frames:
        log(f"[pom_roofline] t={frames} ...")
        fns = workloads(mixer, args.batch, frames, device, not args.no_variants, args.chunk)
        timings = time_interleaved(fns, device, repeats=args.repeats, warmup=args.warmup,
                                   min_seconds=args.min_seconds, max_seconds=args.max_seconds)
        times = timings.main
        row: dict[str, Any] = {
            "frames": frames,
            "clock": timings.clock,
            "batch": args.batch,
            "matmuls_s": median(times["matmuls"]),
            "pom_s": median(times["pom"]),
            "ratio": ratio_stats(times["pom"], times["matmuls"]),
            "wall_ratio": ratio_stats(timings.wall["pom"], timings.wall["matmuls"]),
            "repeats": len(times["pom"]),
        }
        if not args.no_variants:
            row["variants"] = {
                name: {
                    "time_s": median(times[name]),
                    "ratio": ratio_stats(times[name], times["matmuls"])["median"],
                    "ratio_q1_q3": [ratio_stats(times[name], times["matmuls"])[q] for q in ("q1", "q3")],
                    "speedup_vs_pom": ratio_stats(times["pom"], times[name])["median"],
                }
                for name in VARIANTS
            }
        row["peak_alloc_bytes"] = {
            name: measure_peak_memory(fn, device, rss=False)["peak_alloc_bytes"] for name, fn in fns.items()
        }
        log(f"[pom_roofline]   pom/matmuls = {row['ratio']['median']:.3f}"
            + ("".join(f", {k} {v['ratio']:.3f}" for k, v in row.get("variants", {}).items())))
        rows.append(row)
        del fns
    training = None
    if args.train_frames and not args.no_variants:
        log(f"[pom_roofline] training step (forward+backward) at t={args.train_frames} ...")
        training = train_step_comparison(mixer, args, device)
    judged = [r for r in rows if r["frames"] >= TARGET_FROM]
    worst = max((r["ratio"]["median"] for r in judged), default=None)
    payload: dict[str, Any] = {
        "benchmark": "pom_roofline",
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "environment": environment(device),
        "mixer": {"model_dim": args.model_dim, "degree": args.degree, "expand": args.expand,
                  "width": mixer.po.out_features},
        "results": rows,
        "target": {
            "ratio_max": TARGET,
            "from_frames": TARGET_FROM,
            "worst_ratio": worst,
            "met": None if worst is None else worst <= TARGET,
        },
        "prototype_check_max_abs_diff": checks,
        "training": training,
    }
    profile_at = args.profile_frames
    if profile_at is None and worst is not None and worst > TARGET:
        profile_at = max(judged, key=lambda r: r["ratio"]["median"])["frames"]
    if profile_at is not None:
        log(f"[pom_roofline] profiling t={profile_at} ...")
        payload["profile"] = profile_forward(mixer, args.batch, profile_at, device)
    return payload


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", nargs="+", type=int, default=None, help="sequence lengths T (default 500 1000 2000 4000 8000)")
    p.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    p.add_argument("--model-dim", type=int, default=512, help="d (default 512)")
    p.add_argument("--degree", type=int, default=2, help="PoM degree k (default 2)")
    p.add_argument("--expand", type=int, default=2, help="PoM expansion D (default 2)")
    p.add_argument("--repeats", type=int, default=9, help="timed rounds per length (default 9)")
    p.add_argument("--min-seconds", type=float, default=20.0,
                   help="keep adding rounds (up to 200) until a length's rounds took this long (default 20)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds per length (default 2)")
    p.add_argument("--max-seconds", type=float, default=90.0,
                   help="stop a length's rounds (after 3) once they took this long (default 90)")
    p.add_argument("--train-frames", type=int, default=2000,
                   help="also compare forward+backward of pom and the training-safe prototypes at this T "
                        "(default 2000; 0 = skip)")
    p.add_argument("--chunk", type=int, default=1024, help="frames per chunk of the 'chunked' prototype (default 1024)")
    p.add_argument("--no-variants", action="store_true", help="time pom and matmuls only, no prototypes")
    p.add_argument("--profile-frames", type=int, default=None,
                   help="profile one forward at this T (default: at the worst T >= 2000 when the target is missed)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, ...")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: stable ratios on a shared machine; 0 = torch's default)")
    p.add_argument("--out", default=str(RESULTS_DIR / "pom_roofline.json"), help="JSON copy (default benchmarks/results/pom_roofline.json)")
    p.add_argument("--quick", action="store_true", help="smoke mode: T 64 128, d 32, 3 rounds (numbers meaningless)")
    args = p.parse_args(argv)
    if args.quick:
        args.frames = args.frames or [64, 128]
        args.model_dim = 32
        args.repeats = 3
        args.min_seconds = 0.0
        args.warmup = 1
        args.profile_frames = args.profile_frames or 128
        args.train_frames = 64 if args.train_frames else 0
    args.frames = args.frames or list(FRAMES)
    for name in ("batch", "model_dim", "degree", "expand", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return cli(lambda: emit(run(args), args.out))


if __name__ == "__main__":
    raise SystemExit(main())

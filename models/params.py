"""Parameter counts per component, and matching ``model_dim`` to a parameter budget.

Usage:
    python -m models.params --preset base                        # the paper's two base encoders
    python -m models.params --preset base --plan mha_relpos
    python -m models.params --preset base --plan pom --attention-layers 4
    python -m models.params --preset base --plan summary_mixing --target 95e6
    python -m models.params --preset large --plan pom --json

Dimensions: d model dim. Models are built on the meta device: counting allocates no memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Sequence

import torch
from torch import nn

from models.config import MixerSpec, ModelConfig, _plan_multiple, make_config, plan_label

PRETRAIN_COMPONENTS: tuple[str, ...] = ("frontend", "encoder", "best_rq_head")
"""What the paper's "about 95M" counts: front-end + encoder + BEST-RQ head."""

FINETUNE_COMPONENTS: tuple[str, ...] = ("frontend", "encoder", "ctc_head")

_COMPONENT_OF_CHILD = {
    "features": "frontend",
    "normalizer": "frontend",
    "frontend": "frontend",
    "encoder": "encoder",
    "heads": "best_rq_head",
    "quantizer": "best_rq_head",
    "head": "ctc_head",
}


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable-parameter counts of a :class:`BestRQModel` or :class:`CTCModel` per component.

    Keys: ``frontend``, ``encoder``, then the encoder's parts ``encoder.mixer.<name>`` (one per
    mixer family), ``encoder.ffn``, ``encoder.conv``, ``encoder.norm`` (layer norms), then
    ``best_rq_head`` and/or ``ctc_head`` when present, ``other`` for anything else, ``total``.
    Buffers (normalisation statistics, the frozen quantizer) are not parameters.
    """
    counts: dict[str, int] = {}
    for name, child in model.named_children():
        component = _COMPONENT_OF_CHILD.get(name, "other")
        counts[component] = counts.get(component, 0) + _numel(child)
    encoder = getattr(model, "encoder", None)
    if encoder is not None and hasattr(encoder, "blocks"):
        parts: dict[str, int] = {}
        for block in encoder.blocks:
            key = f"encoder.mixer.{block.mixer_name}"
            parts[key] = parts.get(key, 0) + _numel(block.mixer)
            parts["encoder.ffn"] = parts.get("encoder.ffn", 0) + _numel(block.ffn1) + _numel(block.ffn2)
            parts["encoder.conv"] = parts.get("encoder.conv", 0) + _numel(block.conv)
        parts["encoder.norm"] = counts.get("encoder", 0) - sum(parts.values())
        counts.update(parts)
    order = ["frontend", "encoder", *sorted(k for k in counts if k.startswith("encoder.mixer.")),
             "encoder.ffn", "encoder.conv", "encoder.norm", "best_rq_head", "ctc_head", "other"]
    result = {key: counts[key] for key in order if key in counts and (key != "other" or counts[key])}
    result["total"] = _numel(model)
    return result


def config_parameters(config: ModelConfig) -> dict[str, int]:
    """Counts of both models of ``config`` (built on the meta device): ``count_parameters`` keys plus
    ``pretrain`` (front-end + encoder + BEST-RQ head) and ``finetune`` (front-end + encoder + CTC head)."""
    from models.builder import build_best_rq, build_ctc_head

    with torch.device("meta"):
        counts = count_parameters(build_best_rq(config))
        counts["ctc_head"] = _numel(build_ctc_head(config))
    counts.pop("total")
    counts["pretrain"] = sum(counts[k] for k in PRETRAIN_COMPONENTS)
    counts["finetune"] = sum(counts[k] for k in FINETUNE_COMPONENTS)
    return counts


def count_budget(config: ModelConfig) -> int:
    """Front-end + encoder + BEST-RQ head parameters of ``config`` (what budgets are matched on)."""
    return config_parameters(config)["pretrain"]


def _with_model_dim(config: ModelConfig, model_dim: int) -> ModelConfig:
    return dataclasses.replace(config, encoder=dataclasses.replace(config.encoder, model_dim=model_dim))


def match_model_dim(
    config: ModelConfig | str | Sequence[str | MixerSpec],
    target_params: float,
    *,
    preset: str = "base",
    multiple: int | None = None,
    max_dim: int = 8192,
) -> int:
    """The ``model_dim`` whose front-end + encoder + BEST-RQ head is closest to ``target_params``.

    Candidates are multiples of ``multiple`` (default: 8, the attention heads of the plan (twice
    for rotary attention) and the parts of ``pom_split``), so every layer accepts them. Every
    parameter tensor is linear or bilinear in ``d``, so the count is a quadratic in ``d``: three
    counts fit it, its root gives the candidate, and exact counts of the neighbours settle it.

    Args:
        config: a config (its ``model_dim`` is replaced) or a plan for :func:`make_config` with ``preset``.
        target_params: e.g. ``95e6``.
        preset: used when ``config`` is a plan.
        multiple: step of the candidates.
        max_dim: largest candidate.
    """
    if not isinstance(config, ModelConfig):
        # 4608 = 2^9 * 9 is accepted by every head count, rotary and pom_split; only d changes below.
        config = make_config(preset, plan=config, model_dim=4608)
    step = multiple or _plan_multiple(config.encoder.layers)
    if target_params <= 0:
        raise ValueError(f"target_params must be positive, got {target_params}")
    top = max(1, max_dim // step)
    cache: dict[int, int] = {}

    def count(k: int) -> int:
        if k not in cache:
            cache[k] = count_budget(_with_model_dim(config, k * step))
        return cache[k]

    # Exact quadratic through k = 1, 2, 3 (Newton form), then its positive root.
    c1, c2, c3 = count(1), count(2), count(3)
    a = (c3 - 2 * c2 + c1) / 2
    b = (c2 - c1) - 3 * a
    c = c1 - a - b
    if a > 0:
        root = (-b + math.sqrt(max(b * b - 4 * a * (c - target_params), 0.0))) / (2 * a)
    else:
        root = (target_params - c) / b if b > 0 else 1.0
    k = min(max(1, int(root)), top)
    # Walk to the bracket count(k) < target <= count(k + 1) (one or two exact counts when the fit holds).
    while k > 1 and count(k) >= target_params:
        k -= 1
    while k < top and count(k + 1) < target_params:
        k += 1
    if k == top and count(k) < target_params:
        raise ValueError(f"target_params={target_params:.4g} needs model_dim > max_dim={max_dim}")
    candidates = [k] + ([k + 1] if k < top else [])
    return min(candidates, key=lambda j: abs(count(j) - target_params)) * step


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def format_table(columns: list[tuple[str, dict[str, int]]]) -> str:
    """A plain-text table: one row per component, one column per configuration."""
    fixed = ["frontend", "encoder", "encoder.ffn", "encoder.conv", "encoder.norm", "best_rq_head", "ctc_head",
             "other", "total", "pretrain", "finetune"]
    present = {k for _, counts in columns for k in counts}
    mixers = sorted(k for k in present if k.startswith("encoder.mixer."))
    keys = [k for k in fixed[:2] + mixers + fixed[2:] if k in present]
    keys += sorted(present - set(keys))
    head = ["component"] + [label for label, _ in columns]
    body = [[key] + [f"{counts[key] / 1e6:,.3f}M" if key in counts else "-" for _, counts in columns] for key in keys]
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    line = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.params", description="Parameter counts per component.")
    parser.add_argument("--preset", default="base", help="tiny, base or large (default: base)")
    parser.add_argument("--plan", default=None, help="mixer of every layer (of the upper layers with --attention-layers); "
                        "default: the paper's relpos-MHA and PoM k2 D2 encoders")
    parser.add_argument("--attention-layers", type=int, default=None, help="lower layers using mha_relpos")
    parser.add_argument("--model-dim", type=int, default=None, help="d_model (default: the preset's choice)")
    parser.add_argument("--target", type=float, default=None, help="match d_model to this many pre-training parameters")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    try:
        plans = [args.plan] if args.plan is not None else ["mha_relpos", "pom"]
        results = []
        for plan in plans:
            model_dim = args.model_dim
            if args.target is not None:
                probe = make_config(args.preset, plan=plan, attention_layers=args.attention_layers, model_dim=args.model_dim)
                model_dim = match_model_dim(probe, args.target)
            config = make_config(args.preset, plan=plan, attention_layers=args.attention_layers, model_dim=model_dim)
            results.append(
                {
                    "preset": args.preset,
                    "plan": plan_label(config.encoder.layers),
                    "model_dim": config.encoder.model_dim,
                    "counts": config_parameters(config),
                }
            )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        columns = [(f"{r['plan']} d{r['model_dim']}", r["counts"]) for r in results]
        print(f"preset {args.preset}: parameters per component (pretrain = front-end + encoder + BEST-RQ head)")
        print(format_table(columns))
    return 0


__all__ = [
    "FINETUNE_COMPONENTS",
    "PRETRAIN_COMPONENTS",
    "config_parameters",
    "count_budget",
    "count_parameters",
    "format_table",
    "match_model_dim",
]

if __name__ == "__main__":
    raise SystemExit(main())

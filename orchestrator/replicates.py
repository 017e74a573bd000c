"""Replicate seeds (``sweep.seeds``): the seed of each replicate run, and its configuration's mean in the report.

With ``sweep.seeds: [0, 1, 2]`` every configuration the sampler proposes runs three times. Ray
Tune's ``Repeater`` (:mod:`orchestrator.replicate_search`; a grid gets a second grid axis) puts
the replicate's index into the trial config as :data:`TRIAL_INDEX`; the trial driver turns it
into the run's seed (:func:`replicate_seed`), which sets ``pretrain.seed`` and ``finetune.seed``
(so replicates never share a pre-training: the seed is part of the pre-training key) and is
logged as the MLflow param and tag ``replicate_seed``.

The report groups the finished trials by configuration, everything sampled but the seed
(:func:`config_key`), and merges each replicated one into one row (:func:`by_configuration`):
its metrics are the replicates' means, ``spread`` holds std and count, and its per-utterance
records are the replicates' mean errors, so a configuration is compared with the best one by the
same paired bootstrap as a single trial. This module imports neither Ray nor MLflow.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from orchestrator.stats import Record, mean_std

TRIAL_INDEX = "__trial_index__"
"""The replicate's index in the trial config (``ray.tune.search.repeater.TRIAL_INDEX``)."""
REPLICATE_SEED = "replicate_seed"
"""MLflow param and tag: the seed of a replicate run."""
SEED_PARAMS = ("seed", "pretrain.seed", "finetune.seed")
"""Sampled keys that change only a seed: trials differing in them alone are replicates."""
SECTION_METRICS = ("dev_wer", "dev_cer", "test_wer", "test_cer")
_NOT_AVERAGED = ("_ci_low", "_ci_high")  # a mean of interval ends is no interval


# --------------------------------------------------------------------------------------------
# the trial side
# --------------------------------------------------------------------------------------------


def replicate_seed(seeds: Sequence[int], config: dict[str, Any]) -> int | None:
    """Pop the replicate index from a trial ``config``; the seed it stands for (``None``: no replicates).

    Raises:
        ValueError: an index outside ``seeds`` (the spec changed under a resumed sweep).
    """
    index = config.pop(TRIAL_INDEX, None)
    if not seeds:
        return None
    index = int(index or 0)
    if not 0 <= index < len(seeds):
        raise ValueError(f"replicate index {index} is outside sweep.seeds {list(seeds)}")
    return int(seeds[index])


def seed_params(seed: int | None) -> dict[str, int]:
    """The run-config values a replicate's seed sets (nothing without one)."""
    from orchestrator.spec import SEED_PATHS

    return {} if seed is None else {path: seed for path in SEED_PATHS}


# --------------------------------------------------------------------------------------------
# the report side
# --------------------------------------------------------------------------------------------


def row_seed(params: Mapping[str, str], sampled: Mapping[str, Any]) -> str:
    """A trial row's seed: its replicate seed, a sampled seed, or its configured fine-tuning seed."""
    if REPLICATE_SEED in params:
        return str(params[REPLICATE_SEED])
    for key in SEED_PARAMS:
        if key in sampled:
            return str(sampled[key])
    return str(params.get("config.finetune.seed", ""))


def config_key(row: Mapping[str, Any]) -> tuple:
    """The configuration of a trial row without its seed: layer plan and the other sampled values."""
    return row["plan"], tuple(sorted((k, str(v)) for k, v in row["sampled"].items() if k not in SEED_PARAMS))


def groups(rows: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The finished trials grouped by :func:`config_key`, in the order of ``rows``."""
    out: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        if row["status"] == "FINISHED":
            out.setdefault(config_key(row), []).append(row)
    return list(out.values())


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else math.nan


def mean_records(members: Sequence[dict[str, Any]]) -> dict[str, dict[str, Record]]:
    """Per split, each utterance's errors averaged over the replicates (splits all scored on the same utterances)."""
    out = {}
    for split in members[0].get("records") or {}:
        sets = [m.get("records", {}).get(split) for m in members]
        if any(s is None or s.keys() != sets[0].keys() for s in sets):
            continue
        n = len(sets)
        out[split] = {uid: Record(word_errors=sum(s[uid].word_errors for s in sets) / n, words=rec.words,
                                  char_errors=sum(s[uid].char_errors for s in sets) / n, chars=rec.chars)
                      for uid, rec in sets[0].items()}
    return out


def merge(members: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One row for a configuration's finished replicates: metric means, ``spread`` = {metric: (std, n)}."""
    members = sorted(members, key=lambda m: (not str(m["seed"]).isdigit(), int(m["seed"]) if str(m["seed"]).isdigit() else 0))
    first = members[0]
    names = sorted({k for m in members for k in m["metrics"] if not k.endswith(_NOT_AVERAGED)})
    stats = {k: mean_std([_num(m["metrics"].get(k)) for m in members]) for k in names}
    seeds = [str(m["seed"]) for m in members]
    row = {**first, "run_id": None, "name": f"{first['plan']} · {len(members)} seeds", "trial": None,
           "sampled": {k: v for k, v in first["sampled"].items() if k not in SEED_PARAMS},
           "seed": ", ".join(seeds), "members": list(members), "reason": "",
           "metrics": {k: mean for k, (mean, _, n) in stats.items() if n},
           "spread": {k: (std, n) for k, (_, std, n) in stats.items() if n},
           "records": mean_records(members)}
    if first.get("records") and not row["records"]:
        row["records_error"] = "its seeds were not scored on the same utterances"
    for key in ("vs_best", "vs_best_error", "is_best"):
        row.pop(key, None)
    return row


def by_configuration(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """One row per configuration, replicated ones merged (:func:`merge`), the others copied;
    ``None`` when no configuration has two finished trials."""
    grouped = groups(rows)
    if all(len(g) == 1 for g in grouped):
        return None
    merged = {id(g[0]): merge(g) for g in grouped if len(g) > 1}
    later = {id(m) for g in grouped if len(g) > 1 for m in g[1:]}
    return [merged[id(r)] if id(r) in merged else _copy(r) for r in rows if id(r) not in later]


def _copy(row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    for key in ("vs_best", "vs_best_error", "is_best"):
        out.pop(key, None)
    return out


def spread_text(row: Mapping[str, Any], metric: str, spec: str = ".3f") -> str:
    """`` ± 0.012 over 3 seeds`` for a merged row's metric; empty for a single trial."""
    std, n = row.get("spread", {}).get(metric, (math.nan, 0))
    if n < 2:
        return ""
    return f" ± {'-' if math.isnan(std) else format(std, spec)} over {n} seeds"


def section(configs: Sequence[dict[str, Any]] | None, metric: str) -> list[str]:
    """Markdown lines: each replicated configuration (``configs`` sorted best first), mean ± std (n)."""
    merged = [r for r in configs or () if r.get("members")]
    if not merged:
        return []
    metrics = tuple(dict.fromkeys((metric, *SECTION_METRICS)))
    lines = ["## Replicates (same configuration, other seeds)", "",
             "Each configuration's seeds, their metrics as mean ± std (n); the tables above and the headline "
             "use the means, and compare a configuration by its seeds' mean errors per utterance.", "",
             "| mixer plan | sampled | seeds | runs | " + " | ".join(metrics) + " |", "|" + "---|" * (4 + len(metrics))]
    for row in merged:
        cells = [row["plan"], ", ".join(f"{k}={v}" for k, v in row["sampled"].items()).replace("|", "/") or "-",
                 row["seed"], ", ".join(m["name"] for m in row["members"]).replace("|", "/")]
        for name in metrics:
            std, n = row["spread"].get(name, (math.nan, 0))
            mean = row["metrics"].get(name, math.nan)
            cells.append("-" if n == 0 else f"{mean:.4f} ± {'-' if math.isnan(std) else format(std, '.4f')} (n={n})")
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]

"""The search space of a sweep: the ``search:`` section, its Optuna define-by-run function, samplers.

``search:`` maps dotted run-config paths to a parameter::

    model.attention_layers: {values: [0, 1, 2, 3, 4]}                       # categorical
    pretrain.lr: {min: 1e-4, max: 3e-3, distribution: log_uniform}          # a range
    model.plan_options.degree: {values: [1, 2, 3], when: {model.plan: pom}} # conditional

A ``when:`` condition names another search parameter (the parameter is sampled only in the
trials where that one took an allowed value) or a fixed value of the spec's run sections (the
condition is decided once, when the spec is loaded: the parameter is then always or never
sampled).
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from models.typed_config import describe, fail, get_path, is_number

RUN_SECTIONS = ("preset", "model", "data", "pretrain", "finetune", "eval", "device")
DISTRIBUTIONS = ("uniform", "log_uniform", "int", "int_log_uniform")
PARAM_KEYS = ("values", "min", "max", "distribution", "step", "when")
_CATEGORICAL_TYPES = (str, int, float, bool, type(None))
_MISSING = object()


@dataclass(frozen=True, kw_only=True)
class Param:
    """One search parameter."""

    path: str
    """Dotted path of the run-config field the parameter sets, e.g. ``model.plan_options.degree``."""
    values: tuple | None = None
    """Categorical values."""
    low: float | None = None
    high: float | None = None
    distribution: str = "uniform"
    step: float | None = None
    when: tuple[tuple[str, tuple], ...] = ()
    """Conditions ``(other_path, allowed_values)`` on other search parameters: sampled only when all hold."""

    def is_active(self, sampled: Mapping[str, Any]) -> bool:
        return all(other in sampled and sampled[other] in allowed for other, allowed in self.when)

    def grid_values(self) -> tuple:
        if self.values is not None:
            return self.values
        if self.distribution in ("int", "int_log_uniform"):
            return tuple(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        raise ValueError(f"search.{self.path}: a grid needs values (or an int range)")

    def candidates(self) -> tuple:
        """Values worth validating before the sweep: every categorical value, or both ends of a range."""
        if self.values is not None:
            return self.values
        if self.distribution.startswith("int"):
            return (int(self.low), int(self.high))
        return (float(self.low), float(self.high))


def _param(path: Any, value: Any, source: str) -> Param:
    key = f"search.{path}"
    if not isinstance(path, str) or not path or any(not part for part in path.split(".")):
        raise fail(source, key, "a search key must be a dotted config path such as pretrain.lr")
    if path.split(".")[0] not in RUN_SECTIONS:
        raise fail(source, key, f"the path must start with a run section: {', '.join(RUN_SECTIONS)}")
    if not isinstance(value, Mapping) or not value:
        raise fail(source, key, f"expected {{values: [...]}} or {{min, max}}, got {describe(value)}")
    for name in value:
        if name not in PARAM_KEYS:
            raise fail(source, f"{key}.{name}", f"unknown key; allowed keys: {', '.join(PARAM_KEYS)}")
    when_raw = value.get("when") or {}
    if not isinstance(when_raw, Mapping):
        raise fail(source, f"{key}.when", f"expected a mapping {{other.path: value or [values]}}, got {describe(when_raw)}")
    when = tuple((str(o), tuple(a) if isinstance(a, list) else (a,)) for o, a in when_raw.items())
    if "values" in value:
        if any(k in value for k in ("min", "max", "distribution", "step")):
            raise fail(source, key, "give either values or min/max, not both")
        values = value["values"]
        if not isinstance(values, list) or not values:
            raise fail(source, f"{key}.values", f"must be a non-empty list, got {values!r}")
        for i, item in enumerate(values):
            if not isinstance(item, _CATEGORICAL_TYPES):
                raise fail(source, f"{key}.values[{i}]", f"must be a string, number, bool or null, got {item!r}")
        if len(set(map(repr, values))) != len(values):
            raise fail(source, f"{key}.values", "values repeat")
        return Param(path=path, values=tuple(values), when=when)
    if "min" not in value or "max" not in value:
        raise fail(source, key, "a range needs both min and max (or give values: [...])")
    low, high = value["min"], value["max"]
    for name, bound in (("min", low), ("max", high)):
        if not is_number(bound):
            raise fail(source, f"{key}.{name}", f"must be a number, got {bound!r}")
    if low >= high:
        raise fail(source, key, f"min ({low}) must be below max ({high})")
    distribution = value.get("distribution", "uniform")
    if distribution not in DISTRIBUTIONS:
        raise fail(source, f"{key}.distribution", f"{distribution!r} is not allowed; allowed values: {', '.join(DISTRIBUTIONS)}")
    if distribution in ("log_uniform", "int_log_uniform") and low <= 0:
        raise fail(source, f"{key}.min", f"a {distribution} range needs min > 0, got {low}")
    if distribution.startswith("int") and (low != int(low) or high != int(high)):
        raise fail(source, key, f"an {distribution} range needs integer min and max, got {low}, {high}")
    step = value.get("step")
    if step is not None and (not is_number(step) or step <= 0):
        raise fail(source, f"{key}.step", f"must be a positive number, got {step!r}")
    return Param(path=path, low=low, high=high, distribution=distribution, step=step, when=when)


def parse_search(value: Any, source: str, run: Mapping[str, Any]) -> tuple[Param, ...]:
    """The ``search:`` section as parameters, conditions sampled before what depends on them.

    Args:
        value: the section as parsed.
        source: the spec file, for errors.
        run: the spec's run sections merged onto their run preset; a ``when:`` on a path that is
            not a search parameter is decided against this.

    Raises:
        ConfigError: one line naming the file and ``search.<path>``.
    """
    if value is None or (isinstance(value, Mapping) and not value):
        raise fail(source, "search", "the search space is empty; add at least one parameter, e.g. pretrain.lr: {values: [1e-3]}")
    if not isinstance(value, Mapping):
        raise fail(source, "search", f"expected a mapping of parameters, got {describe(value)}")
    params = [_param(path, item, source) for path, item in value.items()]
    names = {p.path for p in params}
    kept = []
    for p in params:
        conditions, active = [], True
        for other, allowed in p.when:
            at = f"search.{p.path}.when.{other}"
            if other == p.path:
                raise fail(source, f"search.{p.path}.when", "a parameter cannot depend on itself")
            if other in names:
                target = next(q for q in params if q.path == other)
                for a in allowed:
                    if target.values is not None and a not in target.values:
                        raise fail(source, at, f"{a!r} is not one of its values {list(target.values)}")
                conditions.append((other, allowed))
                continue
            fixed = get_path(run, other, _MISSING)
            if fixed is _MISSING:
                raise fail(source, at, f"no search parameter and no run value named {other!r}; "
                                       f"parameters: {', '.join(sorted(names))}")
            active = active and fixed in allowed
        if active:
            kept.append(dataclasses.replace(p, when=tuple(conditions)))
    if not kept:
        raise fail(source, "search", "no parameter is active: every one has a when: condition the run values never meet")
    return tuple(_order(kept, source))


def _order(params: Sequence[Param], source: str) -> list[Param]:
    """Topological order so every ``when`` condition is sampled before the parameter."""
    ordered: list[Param] = []
    done: set[str] = set()
    pending = list(params)
    while pending:
        ready = [p for p in pending if all(o in done for o, _ in p.when)]
        if not ready:
            raise fail(source, f"search.{pending[0].path}.when", "conditions form a cycle (or name an inactive parameter)")
        for p in ready:
            ordered.append(p)
            done.add(p.path)
            pending.remove(p)
    return ordered


# --------------------------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------------------------


def grid(spec) -> list[dict[str, Any]]:
    """Every combination of the parameters' values, conditional parameters only where active."""
    combos: list[dict[str, Any]] = [{}]
    for p in spec.search:
        nxt = []
        for combo in combos:
            if p.is_active(combo):
                nxt.extend({**combo, p.path: v} for v in p.grid_values())
            else:
                nxt.append(combo)
        combos = nxt
    unique: dict[str, dict[str, Any]] = {}
    for combo in combos:
        unique.setdefault(json.dumps(combo, sort_keys=True, default=str), combo)
    return list(unique.values())


class DefineByRun:
    """An Optuna define-by-run function: samples each active parameter, nothing else.

    A class (not a closure) so Ray Tune can pickle the searcher into its experiment state.
    """

    def __init__(self, params: Sequence[Param]) -> None:
        self.params = tuple(params)

    def __call__(self, trial) -> None:
        sampled: dict[str, Any] = {}
        for p in self.params:
            if not p.is_active(sampled):
                continue
            if p.values is not None:
                sampled[p.path] = trial.suggest_categorical(p.path, list(p.values))
            elif p.distribution == "int":
                sampled[p.path] = trial.suggest_int(p.path, int(p.low), int(p.high), step=int(p.step or 1))
            elif p.distribution == "int_log_uniform":
                sampled[p.path] = trial.suggest_int(p.path, int(p.low), int(p.high), log=True)
            elif p.distribution == "log_uniform":
                sampled[p.path] = trial.suggest_float(p.path, float(p.low), float(p.high), log=True)
            else:
                sampled[p.path] = trial.suggest_float(p.path, float(p.low), float(p.high), step=p.step)
        return None


def define_by_run(spec) -> DefineByRun:
    """The spec's search space as an Optuna define-by-run function."""
    return DefineByRun(spec.search)


def sample_preview(spec, n: int) -> list[dict[str, Any]]:
    """The first ``n`` parameter sets the configured sampler proposes (grid: the grid)."""
    if spec.sweep.sampler == "grid":
        return grid(spec)[:n]
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=make_sampler(spec), directions=[o.mode + "imize" for o in spec.objectives])
    space = define_by_run(spec)
    out = []
    for _ in range(n):
        trial = study.ask()
        space(trial)
        out.append(dict(trial.params))
    return out


def make_sampler(spec):
    """The Optuna sampler ``sweep.sampler`` names, seeded with ``sweep.seed``."""
    import optuna

    seed = spec.sweep.seed
    kind = spec.sweep.sampler
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if kind == "qmc":
        return optuna.samplers.QMCSampler(seed=seed)
    if kind == "grid":
        return optuna.samplers.GridSampler({p.path: list(p.grid_values()) for p in spec.search}, seed=seed)
    with warnings.catch_warnings():
        # group=True (conditional parameters sampled jointly) is marked experimental; we want it.
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True)


def count_trials(spec) -> int:
    """Trials the sweep runs: ``sweep.num_trials``; for a grid, the grid size unless fewer are asked."""
    if spec.sweep.sampler == "grid":
        size = len(grid(spec))
        return min(spec.sweep.num_trials, size) if "num_trials" in (spec.raw.get("sweep") or {}) else size
    return spec.sweep.num_trials

"""Sweep specifications: parse and validate a ``search_spaces/*.yaml`` file before Ray starts.

A spec is a run configuration (the sections ``preset``, ``model``, ``data``, ``pretrain``,
``finetune``, ``eval`` of :mod:`orchestrator.train.config`) plus the sweep's own sections::

    sweep:      name, objective, extra objectives, trials, concurrency, seed, sampler, scheduler
    search:     dotted.config.path: {values: [...]} | {min, max, distribution} [+ when: {...}]
    resources:  workers per trial, CPUs / GPUs per worker
    profile:    encoder profile lengths and batch
    tracking:   MLflow URI and experiment
    storage:    local folder or s3://bucket/prefix for checkpoints and results

Every problem is reported as one line that names the file, the dotted key and what is allowed
(:class:`SpecError`); the CLI prints it and exits with code 2.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from orchestrator.yamlio import load_yaml

RUN_SECTIONS = ("preset", "model", "data", "pretrain", "finetune", "eval", "device")
SWEEP_SECTIONS = ("sweep", "search", "resources", "profile", "tracking", "storage")
TOP_KEYS = (*SWEEP_SECTIONS, *RUN_SECTIONS)
SAMPLERS = ("tpe", "random", "grid", "nsga2", "qmc")
SCHEDULERS = ("asha", "fifo")
MODES = ("min", "max")
DISTRIBUTIONS = ("uniform", "log_uniform", "int", "int_log_uniform")
PARAM_KEYS = ("values", "min", "max", "distribution", "step", "when")
# Metrics a trial reports that can be objectives.
OBJECTIVE_METRICS = (
    "dev_wer", "dev_cer", "test_wer", "test_cer", "encoder_peak_mem_mb", "encoder_time_s",
    "params", "pretrain_loss", "pretrain_accuracy", "finetune_loss", "wall_time_s",
)


class SpecError(ValueError):
    """A sweep spec is invalid. The message is one line: file, key path, what is allowed."""


def _where(source: str, key: str) -> str:
    return f"{source}: {key}" if key else source


def _fail(source: str, key: str, message: str) -> SpecError:
    return SpecError(f"{_where(source, key)}: {message}")


# --------------------------------------------------------------------------------------------
# small typed readers
# --------------------------------------------------------------------------------------------


def _mapping(value: Any, source: str, key: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _fail(source, key, f"expected a mapping of keys, got {type(value).__name__} {value!r}")
    return dict(value)


def _unknown(data: Mapping[str, Any], allowed: Sequence[str], source: str, prefix: str) -> None:
    for key in data:
        if key not in allowed:
            raise _fail(source, f"{prefix}.{key}" if prefix else str(key),
                        f"unknown key; allowed keys: {', '.join(allowed)}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int(data: Mapping[str, Any], name: str, default: Any, source: str, prefix: str, minimum: int = 0) -> Any:
    value = data.get(name, default)
    if value is None and default is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise _fail(source, f"{prefix}.{name}", f"must be an integer >= {minimum}, got {value!r}")
    return value


def _choice(data: Mapping[str, Any], name: str, default: str, allowed: Sequence[str], source: str, prefix: str) -> str:
    value = data.get(name, default)
    if value not in allowed:
        raise _fail(source, f"{prefix}.{name}", f"{value!r} is not allowed; allowed values: {', '.join(allowed)}")
    return value


def _str(data: Mapping[str, Any], name: str, default: Any, source: str, prefix: str) -> Any:
    value = data.get(name, default)
    if value is None and default is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise _fail(source, f"{prefix}.{name}", f"must be a non-empty string, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Objective:
    metric: str
    """A metric every trial reports (see OBJECTIVE_METRICS)."""
    mode: str = "min"
    """``min`` or ``max``."""


@dataclass(frozen=True, kw_only=True)
class SchedulerSpec:
    type: str = "asha"
    """``asha`` (early stopping at step-budget rungs) or ``fifo`` (every trial runs to its budget)."""
    grace_period: int = 1
    """ASHA: reports a trial makes before it can be stopped."""
    reduction_factor: int = 2
    """ASHA: 1/reduction_factor of the trials continue at each rung."""


@dataclass(frozen=True, kw_only=True)
class SweepSection:
    name: str
    """Sweep name: names the MLflow parent run and the storage folder."""
    objective: Objective
    """The metric the sweep optimises."""
    extra_objectives: tuple[Objective, ...] = ()
    """More metrics for multi-objective search (e.g. encoder_peak_mem_mb, min)."""
    num_trials: int = 4
    """Trials to run (for the grid sampler: the grid size when left out)."""
    max_concurrent: int = 1
    """Trials running at once."""
    seed: int = 0
    """Seeds the Optuna sampler."""
    sampler: str = "tpe"
    """Optuna sampler: tpe, random, grid, nsga2 (multi-objective), qmc."""
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    """Trial scheduler."""
    max_failures: int = 0
    """Times Ray retries a failed trial (worker death) from its last checkpoint."""
    seeds: tuple[int, ...] = ()
    """Replicate seeds: each configuration runs once per seed (the trial gets it as ``seed``);
    the report averages the replicates and shows their spread. Empty: one run per configuration."""


@dataclass(frozen=True, kw_only=True)
class Param:
    path: str
    """Dotted path of the config field the parameter sets, e.g. ``model.plan.upper_options.degree``."""
    values: tuple | None = None
    """Categorical values."""
    low: float | None = None
    high: float | None = None
    distribution: str = "uniform"
    step: float | None = None
    when: tuple[tuple[str, tuple], ...] = ()
    """Conditions ``(other_path, allowed_values)``: the parameter is sampled only when all hold."""

    def is_active(self, sampled: Mapping[str, Any]) -> bool:
        return all(other in sampled and sampled[other] in allowed for other, allowed in self.when)

    def grid_values(self) -> tuple:
        if self.values is not None:
            return self.values
        if self.distribution in ("int", "int_log_uniform"):
            step = int(self.step or 1)
            return tuple(range(int(self.low), int(self.high) + 1, step))
        raise ValueError(f"search.{self.path}: a grid needs values (or an int range)")

    def representative(self) -> Any:
        if self.values is not None:
            return self.values[0]
        if self.distribution in ("int", "int_log_uniform"):
            return int(self.low)
        return float(self.low)


@dataclass(frozen=True, kw_only=True)
class Resources:
    workers: int = 1
    """DDP workers (Ray Train) per trial."""
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0


@dataclass(frozen=True, kw_only=True)
class ProfileSpec:
    lengths_s: tuple[float, ...] = (10.0, 20.0)
    """Audio lengths (seconds) at which the encoder's forward time and peak memory are measured."""
    batch_size: int = 2
    repeats: int = 2
    enabled: bool = True


@dataclass(frozen=True, kw_only=True)
class Tracking:
    uri: str | None = None
    """MLflow tracking URI; ``None``: ``MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db`` here."""
    experiment: str = "pom-ablations"


@dataclass(frozen=True, kw_only=True)
class Storage:
    path: str = "runs"
    """Local folder or ``s3://bucket/prefix`` for checkpoints, pre-training cache and results."""


@dataclass(frozen=True, kw_only=True)
class Spec:
    """A validated sweep spec."""

    source: str
    sweep: SweepSection
    search: tuple[Param, ...]
    resources: Resources
    profile: ProfileSpec
    tracking: Tracking
    storage: Storage
    run: dict[str, Any]
    """The run-config part (preset/model/data/pretrain/finetune/eval) as plain data."""
    raw: dict[str, Any]
    """The whole spec after ``--set`` overrides, as plain data (logged as an artifact)."""

    @property
    def objectives(self) -> tuple[Objective, ...]:
        return (self.sweep.objective, *self.sweep.extra_objectives)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.raw, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _objective(value: Any, source: str, key: str) -> Objective:
    if isinstance(value, str):
        value = {"metric": value}
    data = _mapping(value, source, key)
    _unknown(data, ("metric", "mode"), source, key)
    metric = data.get("metric")
    if metric not in OBJECTIVE_METRICS:
        raise _fail(source, f"{key}.metric", f"{metric!r} is not a metric trials report; allowed: {', '.join(OBJECTIVE_METRICS)}")
    return Objective(metric=metric, mode=_choice(data, "mode", "min", MODES, source, key))


def _sweep(value: Any, source: str) -> SweepSection:
    data = _mapping(value, source, "sweep")
    allowed = ("name", "objective", "extra_objectives", "num_trials", "max_concurrent", "seed", "sampler", "scheduler", "max_failures", "seeds")
    _unknown(data, allowed, source, "sweep")
    seeds = data.get("seeds", []) or []
    if not isinstance(seeds, list) or any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in seeds) \
            or len(set(seeds)) != len(seeds):
        raise _fail(source, "sweep.seeds", f"must be a list of distinct integers >= 0 (e.g. [0, 1, 2]), got {seeds!r}")
    name = _str(data, "name", Path(source).stem if source else "sweep", source, "sweep")
    if any(c in name for c in "/\\ '\""):
        raise _fail(source, "sweep.name", f"{name!r} may not contain slashes, spaces or quotes")
    objective = _objective(data.get("objective", {"metric": "dev_wer"}), source, "sweep.objective")
    extras_raw = data.get("extra_objectives", []) or []
    if not isinstance(extras_raw, list):
        raise _fail(source, "sweep.extra_objectives", "must be a list of {metric, mode}")
    extras = tuple(_objective(v, source, f"sweep.extra_objectives[{i}]") for i, v in enumerate(extras_raw))
    sampler = _choice(data, "sampler", "tpe" if not extras else "nsga2", SAMPLERS, source, "sweep")
    sched = _mapping(data.get("scheduler", {}), source, "sweep.scheduler")
    _unknown(sched, ("type", "grace_period", "reduction_factor"), source, "sweep.scheduler")
    scheduler = SchedulerSpec(
        type=_choice(sched, "type", "fifo" if extras else "asha", SCHEDULERS, source, "sweep.scheduler"),
        grace_period=_int(sched, "grace_period", 1, source, "sweep.scheduler", 1),
        reduction_factor=_int(sched, "reduction_factor", 2, source, "sweep.scheduler", 2),
    )
    if extras and scheduler.type == "asha":
        raise _fail(source, "sweep.scheduler.type", "asha stops trials on one metric; use fifo with extra_objectives")
    return SweepSection(
        name=name,
        objective=objective,
        extra_objectives=extras,
        num_trials=_int(data, "num_trials", 4, source, "sweep", 1),
        max_concurrent=_int(data, "max_concurrent", 1, source, "sweep", 1),
        seed=_int(data, "seed", 0, source, "sweep", 0),
        sampler=sampler,
        scheduler=scheduler,
        max_failures=_int(data, "max_failures", 0, source, "sweep", 0),
        seeds=tuple(seeds),
    )


_CATEGORICAL_TYPES = (str, int, float, bool, type(None))


def _param(path: str, value: Any, source: str) -> Param:
    key = f"search.{path}"
    if not isinstance(path, str) or not path or any(not part for part in path.split(".")):
        raise _fail(source, key, "a search key must be a dotted config path such as pretrain.lr")
    if path.split(".")[0] not in RUN_SECTIONS:
        raise _fail(source, key, f"the path must start with a run section: {', '.join(RUN_SECTIONS)}")
    data = _mapping(value, source, key)
    if not data:
        raise _fail(source, key, "empty parameter; give values: [...] or min/max")
    _unknown(data, PARAM_KEYS, source, key)
    when_raw = _mapping(data.get("when"), source, f"{key}.when")
    when = []
    for other, allowed in when_raw.items():
        allowed_t = tuple(allowed) if isinstance(allowed, list) else (allowed,)
        when.append((str(other), allowed_t))
    if "values" in data:
        if any(k in data for k in ("min", "max", "distribution", "step")):
            raise _fail(source, key, "give either values or min/max, not both")
        values = data["values"]
        if not isinstance(values, list) or not values:
            raise _fail(source, f"{key}.values", f"must be a non-empty list, got {values!r}")
        for i, item in enumerate(values):
            if not isinstance(item, _CATEGORICAL_TYPES):
                raise _fail(source, f"{key}.values[{i}]", f"must be a string, number, bool or null, got {item!r}")
        if len(set(map(repr, values))) != len(values):
            raise _fail(source, f"{key}.values", "values repeat")
        return Param(path=path, values=tuple(values), when=tuple(when))
    if "min" not in data or "max" not in data:
        raise _fail(source, key, "a range needs both min and max (or give values: [...])")
    low, high = data["min"], data["max"]
    for name, bound in (("min", low), ("max", high)):
        if not _is_number(bound):
            raise _fail(source, f"{key}.{name}", f"must be a number, got {bound!r}")
    if low >= high:
        raise _fail(source, key, f"min ({low}) must be below max ({high})")
    distribution = _choice(data, "distribution", "uniform", DISTRIBUTIONS, source, key)
    if distribution in ("log_uniform", "int_log_uniform") and low <= 0:
        raise _fail(source, f"{key}.min", f"a {distribution} range needs min > 0, got {low}")
    if distribution.startswith("int") and (low != int(low) or high != int(high)):
        raise _fail(source, key, f"an {distribution} range needs integer min and max, got {low}, {high}")
    step = data.get("step")
    if step is not None and (not _is_number(step) or step <= 0):
        raise _fail(source, f"{key}.step", f"must be a positive number, got {step!r}")
    return Param(path=path, low=low, high=high, distribution=distribution, step=step, when=tuple(when))


def _search(value: Any, source: str) -> tuple[Param, ...]:
    data = _mapping(value, source, "search")
    if not data:
        raise _fail(source, "search", "the search space is empty; add at least one parameter, e.g. pretrain.lr: {values: [1e-3]}")
    params = tuple(_param(path, item, source) for path, item in data.items())
    names = {p.path for p in params}
    for p in params:
        for other, allowed in p.when:
            if other not in names:
                raise _fail(source, f"search.{p.path}.when.{other}", f"no search parameter named {other!r}; parameters: {', '.join(sorted(names))}")
            if other == p.path:
                raise _fail(source, f"search.{p.path}.when", "a parameter cannot depend on itself")
            target = next(q for q in params if q.path == other)
            if target.values is not None:
                for a in allowed:
                    if a not in target.values:
                        raise _fail(source, f"search.{p.path}.when.{other}", f"{a!r} is not one of its values {list(target.values)}")
    return tuple(_order(params, source))


def _order(params: Sequence[Param], source: str) -> list[Param]:
    """Topological order so every ``when`` condition is sampled before the parameter."""
    ordered: list[Param] = []
    done: set[str] = set()
    pending = list(params)
    while pending:
        ready = [p for p in pending if all(o in done for o, _ in p.when)]
        if not ready:
            raise _fail(source, f"search.{pending[0].path}.when", "conditions form a cycle")
        for p in ready:
            ordered.append(p)
            done.add(p.path)
            pending.remove(p)
    return ordered


def _resources(value: Any, source: str) -> Resources:
    data = _mapping(value, source, "resources")
    _unknown(data, ("workers", "cpus_per_worker", "gpus_per_worker"), source, "resources")
    cpus = data.get("cpus_per_worker", 1.0)
    gpus = data.get("gpus_per_worker", 0.0)
    if not _is_number(cpus) or cpus <= 0:
        raise _fail(source, "resources.cpus_per_worker", f"must be a number > 0, got {cpus!r}")
    if not _is_number(gpus) or gpus < 0:
        raise _fail(source, "resources.gpus_per_worker", f"must be a number >= 0, got {gpus!r}")
    return Resources(workers=_int(data, "workers", 1, source, "resources", 1), cpus_per_worker=float(cpus), gpus_per_worker=float(gpus))


def _profile(value: Any, source: str) -> ProfileSpec:
    data = _mapping(value, source, "profile")
    _unknown(data, ("lengths_s", "batch_size", "repeats", "enabled"), source, "profile")
    lengths = data.get("lengths_s", [10.0, 20.0])
    if not isinstance(lengths, list) or not lengths or not all(_is_number(x) and x > 0 for x in lengths):
        raise _fail(source, "profile.lengths_s", f"must be a non-empty list of positive seconds, got {lengths!r}")
    enabled = data.get("enabled", True)
    if not isinstance(enabled, bool):
        raise _fail(source, "profile.enabled", f"must be true or false, got {enabled!r}")
    return ProfileSpec(
        lengths_s=tuple(float(x) for x in lengths),
        batch_size=_int(data, "batch_size", 2, source, "profile", 1),
        repeats=_int(data, "repeats", 2, source, "profile", 1),
        enabled=enabled,
    )


def _tracking(value: Any, source: str) -> Tracking:
    data = _mapping(value, source, "tracking")
    _unknown(data, ("uri", "experiment"), source, "tracking")
    return Tracking(uri=_str(data, "uri", None, source, "tracking"), experiment=_str(data, "experiment", "pom-ablations", source, "tracking"))


def _storage(value: Any, source: str) -> Storage:
    data = _mapping(value, source, "storage")
    _unknown(data, ("path",), source, "storage")
    return Storage(path=_str(data, "path", "runs", source, "storage"))


# --------------------------------------------------------------------------------------------
# dotted paths and run configs
# --------------------------------------------------------------------------------------------


def set_path(data: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """Return a deep copy of ``data`` with the dotted ``path`` set to ``value``."""
    out = copy.deepcopy(data)
    node = out
    parts = path.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ValueError(f"{path}: {part!r} holds a value, not a section")
        node = child
    node[parts[-1]] = value
    return out


def apply_params(run: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """The run-config dict with every sampled ``dotted.path: value`` set."""
    out = copy.deepcopy(dict(run))
    for path, value in params.items():
        out = set_path(out, path, value)
    return out


def build_run_config(run: Mapping[str, Any], params: Mapping[str, Any], *, source: str = "<spec>"):
    """Validate and build the :class:`orchestrator.train.config.RunConfig` of one trial."""
    from orchestrator.train.config import run_config_from_dict

    return run_config_from_dict(apply_params(run, params), source=source)


def _check_run(spec_run: dict[str, Any], params: Sequence[Param], source: str) -> None:
    """Fail early: the base config and every parameter's values must make a valid run config."""
    from orchestrator.train.config import ConfigError

    try:
        build_run_config(spec_run, {}, source=source)
    except (ConfigError, ValueError) as err:
        raise SpecError(" ".join(str(err).split())) from None
    # Each value alone on top of the base (plus the values of the parameters it depends on).
    for p in params:
        context = {other: allowed[0] for other, allowed in p.when}
        candidates = p.values if p.values is not None else (p.representative(), p.high if not p.distribution.startswith("int") else int(p.high))
        for value in candidates:
            try:
                build_run_config(spec_run, {**context, p.path: value}, source=source)
            except (ConfigError, ValueError) as err:
                msg = " ".join(str(err).split())
                raise SpecError(f"{source}: search.{p.path}: value {value!r} makes an invalid trial ({msg})") from None


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


def parse_set(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise SpecError(f"--set {text!r}: expected key.path=value, e.g. sweep.num_trials=2")
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise SpecError(f"--set {text!r}: the value is not valid YAML ({' '.join(str(err).split())[:200]})") from None
    return key.strip(), value


def _set_spec_path(data: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """``set_path`` that knows search keys are dotted paths themselves.

    ``search.pretrain.lr`` (the whole parameter) and ``search.pretrain.lr.values`` (one field)
    both address the parameter ``pretrain.lr``.
    """
    if not key.startswith("search.") or not isinstance(data.get("search"), Mapping):
        return set_path(data, key, value)
    rest = key[len("search."):]
    out = copy.deepcopy(data)
    search = dict(out["search"])
    for name in sorted(search, key=len, reverse=True):
        if rest == name:
            search[name] = value
            break
        if rest.startswith(name + ".") and isinstance(search[name], Mapping):
            search[name] = {**search[name], rest[len(name) + 1:]: value}
            break
    else:
        search[rest] = value
    out["search"] = search
    return out


def load_spec(path: str | Path, overrides: Sequence[str] = (), *, check_run: bool = True) -> Spec:
    """Read, override and validate a sweep spec.

    Args:
        path: the YAML file.
        overrides: ``key.path=value`` strings (``--set``), applied before validation. A key
            path under ``search`` replaces that parameter: ``--set search.pretrain.lr.values=[1e-3]``.
        check_run: also build the base run config and every parameter value (imports models).

    Raises:
        SpecError: one line naming the file, the key path and what is allowed.
    """
    source = str(path)
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise SpecError(f"{source}: no such spec file; the shipped ones are in search_spaces/") from None
    except OSError as err:
        raise SpecError(f"{source}: cannot read the spec ({err.strerror})") from None
    try:
        data = load_yaml(text)
    except yaml.YAMLError as err:
        raise SpecError(f"{source}: not valid YAML ({' '.join(str(err).split())[:300]})") from None
    if data is None:
        raise SpecError(f"{source}: the spec is empty; it needs at least sweep and search sections")
    if not isinstance(data, dict):
        raise SpecError(f"{source}: expected a mapping of sections at the top, got {type(data).__name__}")
    for text_override in overrides:
        key, value = parse_set(text_override)
        try:
            data = _set_spec_path(data, key, value)
        except ValueError as err:
            raise SpecError(f"--set {text_override!r}: {err}") from None
    return spec_from_dict(data, source=source, check_run=check_run)


def spec_from_dict(data: Mapping[str, Any], *, source: str = "<spec>", check_run: bool = True) -> Spec:
    data = dict(data)
    _unknown(data, TOP_KEYS, source, "")
    if "search" not in data:
        raise _fail(source, "search", "missing section; a sweep needs at least one search parameter")
    sweep = _sweep(data.get("sweep"), source)
    search = _search(data.get("search"), source)
    if sweep.sampler == "grid":
        for p in search:
            try:
                p.grid_values()
            except ValueError:
                raise _fail(source, f"search.{p.path}", "the grid sampler needs values: [...] or an int range") from None
    run = {k: copy.deepcopy(data[k]) for k in RUN_SECTIONS if k in data}
    spec = Spec(
        source=source,
        sweep=sweep,
        search=search,
        resources=_resources(data.get("resources"), source),
        profile=_profile(data.get("profile"), source),
        tracking=_tracking(data.get("tracking"), source),
        storage=_storage(data.get("storage"), source),
        run=run,
        raw=copy.deepcopy(dict(data)),
    )
    if check_run:
        _check_run(run, search, source)
    return spec


# --------------------------------------------------------------------------------------------
# the search space
# --------------------------------------------------------------------------------------------


def grid(spec: Spec) -> list[dict[str, Any]]:
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


def define_by_run(spec: Spec) -> DefineByRun:
    """The spec's search space as an Optuna define-by-run function."""
    return DefineByRun(spec.search)


def sample_preview(spec: Spec, n: int) -> list[dict[str, Any]]:
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


def make_sampler(spec: Spec):
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
        space = {}
        for p in spec.search:
            space[p.path] = list(p.grid_values())
        return optuna.samplers.GridSampler(space, seed=seed)
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True)


def count_trials(spec: Spec) -> int:
    if spec.sweep.sampler == "grid":
        return min(spec.sweep.num_trials, len(grid(spec))) if "num_trials" in spec.raw.get("sweep", {}) else len(grid(spec))
    return spec.sweep.num_trials


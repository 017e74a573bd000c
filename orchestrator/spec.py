"""Sweep specifications: read and validate a ``search_spaces/*.yaml`` file before Ray starts.

A spec is a run configuration (the sections ``preset``, ``model``, ``data``, ``pretrain``,
``finetune``, ``eval`` of :mod:`orchestrator.train.config`) plus the sweep's own sections::

    sweep:      name, objective, extra objectives, trials, concurrency, seed, sampler, scheduler, retries,
                replicate seeds
    search:     dotted.config.path: {values: [...]} | {min, max, distribution} [+ when: {...}]
    resources:  workers per trial, CPUs / GPUs per worker
    profile:    encoder profile lengths and batch
    tracking:   MLflow URI and experiment
    storage:    local folder or s3://bucket/prefix for checkpoints and results

Everything is read by the one loader (:mod:`models.typed_config`, files and ``--set`` through
:mod:`orchestrator.yamlio`); every problem is one :class:`SpecError` line naming the file, the
dotted key and what is allowed, which the CLI prints before exiting with code 2. The run part is
resolved once, here, into the typed :attr:`Spec.base` that the tuner, the preflight and the dry
run share; a trial builds its own from :attr:`Spec.run` and its sampled values
(:func:`build_run_config`). The search space is :mod:`orchestrator.search`.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from models.typed_config import coerce, fail, section_from_dict, set_path
from orchestrator.errors import SpecError
from orchestrator.metrics import OBJECTIVE_METRICS, PROFILE_METRICS
from orchestrator.search import RUN_SECTIONS, Param, parse_search
from orchestrator.yamlio import apply_sets, blame_set, read_yaml_mapping

if TYPE_CHECKING:
    from orchestrator.train.config import RunConfig

SWEEP_SECTIONS = ("sweep", "search", "resources", "profile", "tracking", "storage")
TOP_KEYS = (*SWEEP_SECTIONS, *RUN_SECTIONS)
TRACKING_SCHEMES = ("file", "sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks", "databricks-uc")
"""URI schemes MLflow can open a tracking store at (databases also as ``scheme+driver``)."""
DEFAULT_MAX_FAILURES = 2
SEED_PATHS = ("pretrain.seed", "finetune.seed")
"""The run-config seeds a replicate sets from ``sweep.seeds`` (model init, masking, dropout, batch order)."""


def _at_least(key: str, value: float, minimum: float, *, strict: bool = False) -> None:
    if value < minimum or (strict and value == minimum):
        raise ValueError(f"{key}: must be {'>' if strict else '>='} {minimum}, got {value!r}")


# --------------------------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Objective:
    """A metric the sweep optimises (written ``{metric, mode}`` or just the metric's name)."""

    metric: str
    """One of :data:`orchestrator.metrics.OBJECTIVE_METRICS`."""
    mode: Literal["min", "max"] = "min"
    """``min`` or ``max``."""

    def __post_init__(self) -> None:
        if self.metric not in OBJECTIVE_METRICS:
            raise ValueError(_not_a_metric(self.metric))

    @classmethod
    def from_config_value(cls, value: Any, path: str, source: str | None) -> Objective:
        data = {"metric": value} if isinstance(value, str) else value
        if isinstance(data, Mapping) and data.get("metric") not in OBJECTIVE_METRICS:
            raise fail(source, f"{path}.metric", _not_a_metric(data.get("metric")))
        return section_from_dict(cls, data, source=source, path=path)


def _not_a_metric(metric: Any) -> str:
    return f"{metric!r} is not a metric a trial reports; allowed: {', '.join(OBJECTIVE_METRICS)}"


@dataclass(frozen=True, kw_only=True)
class SchedulerSpec:
    """The trial scheduler."""

    type: Literal["asha", "fifo"] | None = None
    """``asha`` (early stopping at the fine-tuning evaluations) or ``fifo`` (every trial runs to
    its budget); default ``asha``, ``fifo`` with extra objectives."""
    grace_period: int = 1
    """ASHA: reports a trial makes before it can be stopped."""
    reduction_factor: int = 2
    """ASHA: 1/reduction_factor of the trials continue at each rung."""

    def __post_init__(self) -> None:
        _at_least("sweep.scheduler.grace_period", self.grace_period, 1)
        _at_least("sweep.scheduler.reduction_factor", self.reduction_factor, 2)


@dataclass(frozen=True, kw_only=True)
class SweepSection:
    """The ``sweep:`` section."""

    name: str = "sweep"
    """Sweep name: names the MLflow parent run and the storage folder (default: the file's name)."""
    objective: Objective = field(default_factory=lambda: Objective(metric="dev_wer"))
    """The metric the sweep optimises."""
    extra_objectives: tuple[Objective, ...] = ()
    """More metrics for multi-objective search (e.g. encoder_peak_mem_mb, min)."""
    num_trials: int = 4
    """Trials to run (for the grid sampler: the grid size when left out)."""
    max_concurrent: int | None = None
    """Trials running at once; default: as many as the cluster's CPUs (and GPUs) hold, each trial
    taking ``resources.workers`` x ``cpus_per_worker`` (:func:`orchestrator.trial_driver.trials_at_once`)."""
    seed: int = 0
    """Seeds the Optuna sampler."""
    sampler: Literal["tpe", "random", "grid", "nsga2", "qmc"] | None = None
    """Optuna sampler: tpe, random, grid, nsga2, qmc; default ``tpe``, ``nsga2`` with extra objectives."""
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    """Trial scheduler."""
    max_failures: int = DEFAULT_MAX_FAILURES
    """Times a failed trial (a dead node or worker) is retried from its last checkpoint, and times
    each training stage's worker group is restarted; 0 = a failure fails the trial."""
    seeds: tuple[int, ...] = ()
    """Replicate seeds: every configuration the sampler proposes runs once per seed, the seed set
    as the run's ``pretrain.seed`` and ``finetune.seed`` (:data:`SEED_PATHS`); the sampler sees
    the replicates' mean and the report shows mean ± std. Empty: one run per configuration."""

    def __post_init__(self) -> None:
        if not self.name.strip() or any(c in self.name for c in "/\\ '\""):
            raise ValueError(f"sweep.name: {self.name!r} must be non-empty without slashes, spaces or quotes")
        _at_least("sweep.num_trials", self.num_trials, 1)
        if self.max_concurrent is not None:
            _at_least("sweep.max_concurrent", self.max_concurrent, 1)
        _at_least("sweep.seed", self.seed, 0)
        _at_least("sweep.max_failures", self.max_failures, 0)
        for i, seed in enumerate(self.seeds):
            _at_least(f"sweep.seeds[{i}]", seed, 0)
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"sweep.seeds: {list(self.seeds)} repeats a seed; give distinct seeds, e.g. [0, 1, 2]")
        extras = bool(self.extra_objectives)
        if self.sampler is None:
            object.__setattr__(self, "sampler", "nsga2" if extras else "tpe")
        if self.scheduler.type is None:
            object.__setattr__(self, "scheduler", dataclasses.replace(self.scheduler, type="fifo" if extras else "asha"))
        if extras and self.scheduler.type == "asha":
            raise ValueError("sweep.scheduler.type: asha stops trials on one metric; use fifo with extra_objectives")


@dataclass(frozen=True, kw_only=True)
class Resources:
    """What each trial's Ray Train worker group asks for."""

    workers: int = 1
    """DDP workers (Ray Train) per trial."""
    cpus_per_worker: float = 1.0
    """CPUs per worker (> 0)."""
    gpus_per_worker: float = 0.0
    """GPUs per worker (0 = CPU training)."""
    driver: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources each trial driver asks for, e.g. ``{on_demand: 0.01}`` to keep the
    drivers on nodes that are not preempted (the driver asks for no CPU: it only waits)."""

    def __post_init__(self) -> None:
        _at_least("resources.workers", self.workers, 1)
        _at_least("resources.cpus_per_worker", self.cpus_per_worker, 0, strict=True)
        _at_least("resources.gpus_per_worker", self.gpus_per_worker, 0)


@dataclass(frozen=True, kw_only=True)
class ProfileSpec:
    """The encoder profile each trial ends with (orchestrator/profile.py)."""

    scope: Literal["encoder", "paper"] = "encoder"
    """``encoder``: the Conformer blocks on encoder-frame inputs, the call's peak memory above
    weights and inputs; ``paper``: the paper's protocol, front-end + encoder + CTC head with
    weights and inputs included (fp16 on GPU)."""
    lengths_s: tuple[float, ...] | None = None
    """Audio lengths (seconds) at which forward time and peak memory are measured; unset: the
    scope's (encoder: 10, 20; paper: 10, 20, 40, 80)."""
    batch_size: int | None = None
    """Utterances per profiled batch; unset: the scope's (encoder: 2; paper: 6)."""
    repeats: int = 2
    """Timed repetitions per length (the median is reported)."""
    enabled: bool = True
    """Off: no encoder_* metrics (and they cannot be objectives)."""

    def __post_init__(self) -> None:
        from orchestrator.profile import SCOPE_DEFAULTS

        lengths, batch = SCOPE_DEFAULTS[self.scope]
        object.__setattr__(self, "lengths_s", lengths if self.lengths_s is None else self.lengths_s)
        object.__setattr__(self, "batch_size", batch if self.batch_size is None else self.batch_size)
        if not self.lengths_s or min(self.lengths_s) <= 0:
            raise ValueError(f"profile.lengths_s: must be a non-empty list of positive seconds, got {list(self.lengths_s)}")
        _at_least("profile.batch_size", self.batch_size, 1)
        _at_least("profile.repeats", self.repeats, 1)


@dataclass(frozen=True, kw_only=True)
class Tracking:
    """Where trials are tracked."""

    uri: str | None = None
    """MLflow tracking URI; ``None``: ``MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db`` here."""
    experiment: str = "pom-ablations"
    """MLflow experiment name."""

    def __post_init__(self) -> None:
        if self.uri is not None:
            check_tracking_scheme(self.uri, "tracking.uri")
        if not self.experiment.strip():
            raise ValueError("tracking.experiment: must be a non-empty name")


def check_tracking_scheme(uri: str, key: str) -> None:
    """``ValueError`` naming ``key`` unless MLflow can open a tracking store at ``uri``'s scheme."""
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if not uri.strip() or (scheme and scheme.split("+", 1)[0] not in TRACKING_SCHEMES):
        raise ValueError(f"{key}: {uri!r} is not a tracking URI MLflow can use; allowed: a folder or "
                         f"{', '.join(s + '://' for s in TRACKING_SCHEMES)}")


@dataclass(frozen=True, kw_only=True)
class Storage:
    """Where checkpoints and results go."""

    path: str = "runs"
    """Local folder or ``s3://bucket/prefix`` for checkpoints, pre-training cache and results."""

    def __post_init__(self) -> None:
        scheme = self.path.split("://", 1)[0] if "://" in self.path else ""
        if not self.path.strip() or (scheme and scheme != "s3") or self.path.rstrip("/") == "s3:":
            raise ValueError(f"storage.path: {self.path!r} is neither a folder nor s3://bucket/prefix")


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
    base: RunConfig | None = None
    """The run config every trial starts from, resolved once when the spec is loaded (the
    tuner, the preflight and the dry run use it); ``None`` with ``check_run=False``."""

    @property
    def objectives(self) -> tuple[Objective, ...]:
        return (self.sweep.objective, *self.sweep.extra_objectives)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.raw, sort_keys=True, default=str).encode()).hexdigest()[:12]

    def resolved_run(self) -> dict[str, Any]:
        """:attr:`run` merged onto its run preset, without ``preset`` (the same run config, with
        no reference left to the presets' code); :attr:`run` itself when ``preset`` is searched."""
        from orchestrator.train.presets import run_preset_dict

        if any(p.path == "preset" for p in self.search):
            return copy.deepcopy(self.run)
        return run_preset_dict(self.run, self.source)

    def base_config(self) -> RunConfig:
        """:attr:`base`, resolving it now for a spec loaded with ``check_run=False``."""
        return self.base if self.base is not None else build_run_config(self.run, {}, source=self.source)


_SECTION_TYPES = {"sweep": SweepSection, "resources": Resources, "profile": ProfileSpec, "tracking": Tracking, "storage": Storage}


# --------------------------------------------------------------------------------------------
# run configs
# --------------------------------------------------------------------------------------------


def apply_params(run: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """The run-config dict with every sampled ``dotted.path: value`` set."""
    out = dict(run)
    for path, value in params.items():
        out = set_path(out, path, value, source=f"search.{path}")
    return out


def build_run_config(run: Mapping[str, Any], params: Mapping[str, Any], *, source: str = "<spec>"):
    """Validate and build the :class:`orchestrator.train.config.RunConfig` of one trial."""
    from orchestrator.train.config import run_config_from_dict

    return run_config_from_dict(apply_params(run, params), source=source)


def _check_run(spec_run: dict[str, Any], params: Sequence[Param], source: str):
    """The base run config, after checking every parameter's values make a valid trial with it."""
    base = build_run_config(spec_run, {}, source=source)
    for p in params:  # each value alone on top of the base (plus the values of those it depends on)
        context = {other: allowed[0] for other, allowed in p.when}
        for value in p.candidates():
            try:
                build_run_config(spec_run, {**context, p.path: value}, source=source)
            except ValueError as err:
                raise fail(source, f"search.{p.path}", f"value {value!r} makes an invalid trial ({err})") from None
    return base


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


def set_spec_path(data: Mapping[str, Any], key: str, value: Any, *, source: str | None = None) -> dict[str, Any]:
    """:func:`models.typed_config.set_path` that knows search keys are dotted paths themselves.

    ``search.pretrain.lr`` (the whole parameter) and ``search.pretrain.lr.values`` (one field)
    both address the parameter ``pretrain.lr``.
    """
    search = data.get("search")
    if not key.startswith("search.") or not isinstance(search, Mapping):
        return set_path(data, key, value, source=source)
    rest = key[len("search."):]
    search = dict(search)
    for name in sorted(search, key=len, reverse=True):
        if rest == name:
            search[name] = value
            break
        if rest.startswith(name + ".") and isinstance(search[name], Mapping):
            search[name] = {**search[name], rest[len(name) + 1:]: value}
            break
    else:
        search[rest] = value
    return {**data, "search": search}


def load_spec(path: str | Path, overrides: Sequence[str] = (), *, check_run: bool = True) -> Spec:
    """Read, override and validate a sweep spec.

    Args:
        path: the YAML file.
        overrides: ``key.path=value`` strings (``--set``), applied before validation. A key
            path under ``search`` replaces that parameter: ``--set search.pretrain.lr.values=[1e-3]``.
        check_run: also build the base run config and every parameter value (imports models).

    Raises:
        SpecError: one line naming the file (or the ``--set``), the key path and what is allowed.
    """
    source = str(path)
    data = read_yaml_mapping(path, what="spec file", hint="; the shipped ones are in search_spaces/")
    if not data:
        raise SpecError(f"{source}: the spec is empty; it needs at least sweep and search sections")
    data = apply_sets(data, overrides, example="sweep.num_trials=2", setter=set_spec_path)
    try:
        return spec_from_dict(data, source=source, check_run=check_run)
    except SpecError as err:
        raise blame_set(err, source, overrides) from None


def spec_from_dict(data: Mapping[str, Any], *, source: str = "<spec>", check_run: bool = True) -> Spec:
    """Validate a parsed spec (see :func:`load_spec`)."""
    from orchestrator.train.presets import run_preset_dict

    data = dict(data)
    for key in data:
        if key not in TOP_KEYS:
            raise fail(source, str(key), f"unknown key; allowed keys: {', '.join(sorted(TOP_KEYS))}")
    if "search" not in data:
        raise fail(source, "search", "missing section; a sweep needs at least one search parameter")
    sweep_data = coerce(data.get("sweep") or {}, dict[str, Any], "sweep", source)
    sections = {
        name: section_from_dict(cls, data.get(name), source=source, path=name)
        for name, cls in _SECTION_TYPES.items()
        if name != "sweep"
    }
    sweep = section_from_dict(SweepSection, {"name": Path(source).stem or "sweep", **sweep_data}, source=source, path="sweep")
    if not sections["profile"].enabled:
        for key, objective in (("sweep.objective", sweep.objective),
                               *((f"sweep.extra_objectives[{i}]", o) for i, o in enumerate(sweep.extra_objectives))):
            if objective.metric in PROFILE_METRICS:
                raise fail(source, key, f"{objective.metric} is only measured with profile.enabled: true")
    run = copy.deepcopy({k: data[k] for k in RUN_SECTIONS if k in data})
    search = parse_search(data.get("search"), source, run_preset_dict(run, source))
    for p in search:
        if sweep.seeds and p.path in SEED_PATHS:
            raise fail(source, f"search.{p.path}", "sweep.seeds sets the seed of every run; "
                       "drop this search parameter or sweep.seeds")
    if sweep.sampler == "grid":
        for p in search:
            try:
                p.grid_values()
            except ValueError:
                raise fail(source, f"search.{p.path}", "the grid sampler needs values: [...] or an int range") from None
    base = _check_run(run, search, source) if check_run else None
    return Spec(source=source, sweep=sweep, search=search, run=run, raw=copy.deepcopy(data), base=base, **sections)

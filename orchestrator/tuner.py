"""The Tuner layer: a Ray Tune ``Tuner`` (Optuna search, ASHA) over :func:`orchestrator.trial_driver.trial_driver`.

Three Ray layers, three modules: this one (the sweep's ``Tuner``), :mod:`orchestrator.trial_driver`
(one trial: a Tune function trainable that fits a Ray Train ``TorchTrainer`` per stage) and
:mod:`orchestrator.worker` (the Train worker on every DDP rank). Before anything is generated or
started, :func:`run_sweep` runs the cheap checks first (:mod:`orchestrator.preflight`): the
services, then whether the resources exist, then the corpus.

Storage layout (``storage.path``: a folder, or ``s3://bucket/prefix`` with every file below as an
object; see :mod:`orchestrator.storage`)::

    sweeps/<sweep_id>/sweep.json        name, id, MLflow parent run id, spec fingerprint
    sweeps/<sweep_id>/spec.yaml         the spec as run (after --set)
    sweeps/<sweep_id>/tune/             Ray Tune's experiment state (what --resume restores)
    sweeps/<sweep_id>/trials/<id>/      one folder per trial: trial.json + run/ (checkpoints)
    sweeps/<sweep_id>/report.md, *.png  the results
    pretrain/<key>/                     pre-training results shared by trials and sweeps
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from orchestrator.errors import SweepError
from orchestrator.search import count_trials, define_by_run, grid, make_sampler, sample_preview
from orchestrator.spec import Spec, build_run_config
from orchestrator.storage import Storage, StorageError, open_storage

log = logging.getLogger(__name__)

GRID_KEY = "__grid__"


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def storage_root(spec: Spec) -> Storage:
    """The sweep's storage: ``storage.path`` as a folder or ``s3://bucket/prefix``."""
    try:
        return open_storage(spec.storage.path)
    except StorageError as err:
        raise SweepError(f"{spec.source}: storage.path={spec.storage.path}: {err}") from None


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent.parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _objectives(spec: Spec) -> tuple[list[str], list[str]]:
    return [o.metric for o in spec.objectives], [o.mode for o in spec.objectives]


def find_sweep(storage: Storage, name: str, sweep_id: str) -> str | None:
    """The folder (relative to the storage) of sweep ``sweep_id``, or of the newest sweep ``name``."""
    if sweep_id != "latest":
        rel = f"sweeps/{sweep_id}"
        return rel if storage.exists(f"{rel}/sweep.json") else None
    found = []
    for folder in storage.list_dirs("sweeps"):
        try:
            data = storage.read_json(f"sweeps/{folder}/sweep.json")
        except StorageError:
            continue
        if data and data.get("name") == name:
            found.append((data.get("created", 0), f"sweeps/{folder}"))
    return max(found)[1] if found else None


def absolute_run(spec: Spec) -> dict[str, Any]:
    """The spec's run sections as resolved when the sweep starts, local data/cache paths absolute.

    The run preset is applied here, once (:meth:`Spec.resolved_run`): the trials start from the
    same sections whatever happens to the presets' code while the sweep runs. Ray workers run in
    their own working directories, so a relative ``data/synth`` would point somewhere else on
    every worker (and generate a corpus there).
    """
    base = spec.base_config()
    run = spec.resolved_run()
    data = dict(run.get("data") or {})
    if not base.data.root.startswith("s3://"):
        data["root"] = str(Path(base.data.root).expanduser().resolve())
    if base.data.cache_dir and not base.data.cache_dir.startswith("s3://"):
        data["cache_dir"] = str(Path(base.data.cache_dir).expanduser().resolve())
    run["data"] = data
    return run


# --------------------------------------------------------------------------------------------
# dry run
# --------------------------------------------------------------------------------------------


def estimate_step_seconds(spec: Spec, params: dict[str, Any]) -> float:
    """Seconds of one BEST-RQ training step (forward + backward) on this machine.

    Measured on at most 32 s of synthetic audio and scaled linearly to ``max_batch_seconds``.
    """
    import torch

    from models.builder import build_best_rq

    config = build_run_config(spec.run, params, source=spec.source)
    model = build_best_rq(config.model)
    # Measure a bounded batch and scale linearly: a full paper-scale batch would not fit here.
    seconds = config.pretrain.max_batch_seconds
    measured = min(seconds, 32.0)
    utt = 4.0
    batch = max(1, int(measured // utt))
    wave = torch.randn(batch, int(utt * config.model.frontend.sample_rate)) * 0.1
    lengths = torch.full((batch,), wave.shape[1], dtype=torch.long)
    times = []
    for _ in range(2):
        start = time.perf_counter()
        out = model(wave, lengths)
        loss = out.loss if hasattr(out, "loss") else out["loss"]
        loss.backward()
        times.append(time.perf_counter() - start)
    return min(times) * seconds / (batch * utt)


def dry_run(spec: Spec, out=sys.stdout) -> dict[str, Any]:
    """Print the resolved defaults, the trials and an estimated cost; start nothing."""
    base = spec.base_config()
    n = count_trials(spec)
    if spec.sweep.sampler == "grid":
        trials = grid(spec)[:n]
        label = f"{len(trials)} trials (grid)"
    else:
        trials = sample_preview(spec, min(n, 8))
        label = f"{n} trials ({spec.sweep.sampler}); the first {len(trials)} samples"
    seeds = spec.sweep.seeds
    replicas = max(1, len(seeds))
    if seeds:
        label += f"; each run once per seed {list(seeds)}: {n * replicas} trials in all"
    print(f"# sweep {spec.sweep.name}: {label}", file=out)
    print(f"# objective: {', '.join(f'{o.metric} ({o.mode})' for o in spec.objectives)}; "
          f"scheduler {spec.sweep.scheduler.type}; concurrency {spec.sweep.max_concurrent or 'as the cluster allows'}", file=out)
    print("# resolved defaults:", file=out)
    print(yaml.safe_dump(base.to_dict(), sort_keys=False, default_flow_style=None).rstrip(), file=out)
    print("# trials:", file=out)
    for i, params in enumerate(trials):
        print(f"  {i}: " + ", ".join(f"{k}={v}" for k, v in params.items()), file=out)
    step_s = estimate_step_seconds(spec, trials[0] if trials else {})
    steps = base.pretrain.steps + (base.finetune.steps or 0)  # a budget in epochs is known from the corpus only
    budget = f"{steps} steps" if base.finetune.steps is not None else (
        f"{steps} pre-training steps (+ {base.finetune.epochs} fine-tuning epochs, not counted)")
    workers = spec.resources.workers
    hours = n * replicas * steps * step_s * workers / 3600.0
    print(f"# estimate: {step_s:.3f} s per step measured here x {budget} x {n * replicas} trials x "
          f"{workers} worker(s) = {hours:.2f} worker-hours (training only, this machine)", file=out)
    return {"trials": trials, "num_trials": n * replicas, "configurations": n, "seeds": list(seeds),
            "step_seconds": step_s, "worker_hours": hours}


# --------------------------------------------------------------------------------------------
# the sweep
# --------------------------------------------------------------------------------------------


def search_setup(spec: Spec) -> tuple[Any, dict[str, Any] | None, int]:
    """``(search_alg, param_space, num_samples)`` of the sweep's ``TuneConfig`` / ``Tuner``.

    Optuna proposes the configurations (``None`` and a ``grid_search`` param space for the grid
    sampler). With ``sweep.seeds`` each configuration runs once per seed: the searcher is wrapped
    in a :class:`orchestrator.replicate_search.ReplicateSearcher` (Ray's ``Repeater``) and
    ``num_samples`` counts every replicate; a grid gets a second axis over the replicate index.
    Either way the trial config holds ``__trial_index__`` (:mod:`orchestrator.replicates`).
    ASHA treats replicates as any trials: it may stop one seed of a configuration early, and the
    mean the searcher sees then includes that seed's last rung; the report averages finished
    replicates only (``sweep.scheduler.type: fifo`` runs every replicate to its budget).
    TuneConfig.max_concurrent_trials wraps the searcher in a ConcurrencyLimiter (a second one warns).
    """
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from orchestrator.replicates import TRIAL_INDEX

    n = count_trials(spec)
    seeds = spec.sweep.seeds
    if spec.sweep.sampler == "grid":
        space = {GRID_KEY: tune.grid_search(grid(spec)[:n])}
        return None, {**space, TRIAL_INDEX: tune.grid_search(list(range(len(seeds))))} if seeds else space, 1
    metrics, modes = _objectives(spec)
    single = len(metrics) == 1
    searcher = OptunaSearch(space=define_by_run(spec), metric=metrics[0] if single else metrics,
                            mode=modes[0] if single else modes, sampler=make_sampler(spec))
    if not seeds:
        return searcher, None, n
    from orchestrator.replicate_search import replicate_searcher

    return replicate_searcher(searcher, len(seeds)), None, n * len(seeds)


def _init_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    kwargs: dict[str, Any] = {"log_to_driver": True}
    if address:
        kwargs["address"] = address
    else:
        kwargs["include_dashboard"] = True
        kwargs["dashboard_host"] = "127.0.0.1"
        # Ray's default for a new local cluster is token auth, and it says so in a WARNING at
        # every start; nothing is wrong, so that one logger speaks only of errors. (Setting
        # RAY_AUTH_MODE=token instead made the new GCS refuse its own driver here.)
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        # A trial is several Python processes (trial driver and Train controller take no CPU,
        # then the Train workers); the raylet's start-up limit defaults to the CPU count and
        # it warns when more start at once, which every sweep of 2 concurrent trials does.
        kwargs["_system_config"] = {"worker_maximum_startup_concurrency": max(8, 4 * (os.cpu_count() or 1))}
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise SweepError(f"cannot connect to Ray at {address or 'a new local cluster'}: {' '.join(str(err).split())[:300]}") from None


def run_sweep(spec: Spec, *, address: str | None = None, resume: str | None = None, argv: list[str] | None = None) -> int:
    from orchestrator.preflight import preflight, ray_nodes

    # S3 and MLflow, then the resources (this machine, or the cluster at --address right after
    # connecting), then the corpus: one clear line each, before anything is generated or started.
    data_report = preflight(spec, nodes=(lambda: _init_ray(address) or ray_nodes()) if address else None)

    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from orchestrator.report import mark_stopped_trials, write_report
    from orchestrator.tracking import Tracker, TrackingError, default_tracking_uri, redact_uri
    from orchestrator.trial_driver import (
        TrialContext, driver_resources, mark_stopped, remove_registry, trial_driver, trials_at_once,
    )

    storage = storage_root(spec)  # StorageError later on: one line from the CLI (orchestrator.sweep)
    uri = spec.tracking.uri or default_tracking_uri()
    try:
        tracker = Tracker.open(uri, spec.tracking.experiment)
    except TrackingError as err:
        raise SweepError(str(err)) from None

    if resume:
        sweep_rel = find_sweep(storage, spec.sweep.name, resume)
        if sweep_rel is None:
            raise SweepError(f"no sweep {resume!r} named {spec.sweep.name!r} under {storage.describe('sweeps')} to resume; "
                             "run without --resume")
        meta = storage.read_json(f"{sweep_rel}/sweep.json") or {}
        if meta.get("fingerprint") != spec.fingerprint():
            print(f"warning: the spec changed since sweep {meta['sweep_id']} started; resuming with the original trials",
                  file=sys.stderr)
    else:
        sweep_id = f"{spec.sweep.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        while storage.has_prefix(f"sweeps/{sweep_id}") or storage.local(f"sweeps/{sweep_id}").exists():
            time.sleep(1.0)
            sweep_id = f"{spec.sweep.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        sweep_rel = f"sweeps/{sweep_id}"
        meta = {"name": spec.sweep.name, "sweep_id": sweep_id, "created": time.time(),
                "fingerprint": spec.fingerprint(), "source": spec.source}
    sweep_id = meta["sweep_id"]
    command = " ".join(shlex.quote(a) for a in (argv or sys.argv))
    parent = tracker.sweep_run(sweep_id, sweep_id, tags={
        "sweep_name": spec.sweep.name, "git_commit": git_commit(), "command": command[:4000],
        "storage": storage.uri, "objective": spec.sweep.objective.metric,
    })
    meta["parent_run_id"] = parent
    # The sweep's working folder: the storage itself, or (S3) this node's copy that the report,
    # the spec and the data log are written to before they are uploaded / logged to MLflow.
    sweep_dir = storage.local(sweep_rel)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    storage.write_json(f"{sweep_rel}/sweep.json", meta)
    data_report.log_to(tracker, parent, sweep_dir)
    if not resume:
        storage.write_bytes(f"{sweep_rel}/spec.yaml", yaml.safe_dump(spec.raw, sort_keys=False).encode())
        base = spec.base_config()
        storage.write_bytes(f"{sweep_rel}/resolved_config.yaml", yaml.safe_dump(base.to_dict(), sort_keys=False).encode())
        tracker.log_artifact(parent, str(sweep_dir / "spec.yaml"), "spec")
        tracker.log_artifact(parent, str(sweep_dir / "resolved_config.yaml"), "spec")
        tracker.log_params(parent, {"num_trials": spec.sweep.num_trials, "sampler": spec.sweep.sampler,
                                    "scheduler": spec.sweep.scheduler.type, "max_concurrent": spec.sweep.max_concurrent,
                                    "objective": spec.sweep.objective.metric, "spec_file": spec.source,
                                    **({"seeds": list(spec.sweep.seeds)} if spec.sweep.seeds else {})})
    print(f"sweep {sweep_id}: storage {storage.describe(sweep_rel)}, MLflow {redact_uri(uri)} "
          f"(experiment {spec.tracking.experiment!r}, parent run {parent})", flush=True)

    _init_ray(address)
    metrics, modes = _objectives(spec)
    ctx = TrialContext(
        sweep_id=sweep_id, storage=storage.uri, sweep_rel=sweep_rel, spec_run=absolute_run(spec),
        tracking_uri=uri, experiment_id=tracker.experiment_id, parent_run_id=parent,
        workers=spec.resources.workers, cpus_per_worker=spec.resources.cpus_per_worker,
        gpus_per_worker=spec.resources.gpus_per_worker,
        profile={"enabled": spec.profile.enabled, "scope": spec.profile.scope, "lengths_s": list(spec.profile.lengths_s),
                 "batch_size": spec.profile.batch_size, "repeats": spec.profile.repeats},
        objectives=tuple(metrics), max_failures=spec.sweep.max_failures, seeds=spec.sweep.seeds,
    )
    # The driver itself only waits on its TorchTrainer: no CPU (the Train workers hold them).
    trainable = tune.with_resources(tune.with_parameters(trial_driver, ctx=ctx), driver_resources(spec.resources.driver))
    res = spec.resources
    concurrent = spec.sweep.max_concurrent or trials_at_once(res.workers, res.cpus_per_worker, res.gpus_per_worker)
    tracker.set_tags(parent, {"trials_at_once": str(concurrent)})
    print(f"sweep {sweep_id}: {concurrent} trial(s) at once, each {res.workers} worker(s) x "
          f"{res.cpus_per_worker:g} CPU(s)" + (f" x {res.gpus_per_worker:g} GPU(s)" if res.gpus_per_worker else ""), flush=True)
    single = len(metrics) == 1
    scheduler = FIFOScheduler()
    if spec.sweep.scheduler.type == "asha" and single:
        scheduler = ASHAScheduler(
            time_attr="training_iteration", metric=metrics[0], mode=modes[0], max_t=10_000,
            grace_period=spec.sweep.scheduler.grace_period, reduction_factor=spec.sweep.scheduler.reduction_factor,
        )
    search_alg, param_space, num_samples = search_setup(spec)
    tune_config = tune.TuneConfig(
        search_alg=search_alg, scheduler=scheduler, num_samples=num_samples,
        max_concurrent_trials=concurrent,
        **({"metric": metrics[0], "mode": modes[0]} if search_alg is None and not isinstance(scheduler, ASHAScheduler) and single else {}),
    )
    storage_path, filesystem = storage.ray_storage(sweep_rel)
    run_config = tune.RunConfig(name="tune", storage_path=storage_path, storage_filesystem=filesystem, verbose=1,
                                failure_config=tune.FailureConfig(max_failures=spec.sweep.max_failures))
    tune_path = f"{storage_path}/tune"
    if resume and tune.Tuner.can_restore(tune_path, storage_filesystem=filesystem):
        tuner = tune.Tuner.restore(tune_path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                   restart_errored=False, param_space=param_space, storage_filesystem=filesystem)
    else:
        kwargs = {"param_space": param_space} if param_space is not None else {}
        tuner = tune.Tuner(trainable, tune_config=tune_config, run_config=run_config, **kwargs)
    try:
        results = tuner.fit()
        stopped = mark_stopped_trials(tracker, parent, results, metrics, type(scheduler).__name__.replace("Scheduler", ""))
        mark_stopped(storage, sweep_rel, stopped)
    finally:
        remove_registry(storage.uri)
        rows = write_report(tracker, parent, sweep_dir, objectives=list(zip(metrics, modes)))
        _publish_outputs(storage, sweep_rel)
    done = [r for r in rows if r.get("status") == "FINISHED"]
    tracker.finish(parent, "FINISHED" if done else "FAILED")
    print(f"sweep {sweep_id}: {len(done)}/{len(rows)} trials finished; report {storage.describe(sweep_rel + '/report.md')}",
          flush=True)
    return 0 if done else 1


def _publish_outputs(storage: Storage, sweep_rel: str) -> None:
    """Upload the files the driver wrote into the sweep's working folder (report, plots, data log)."""
    if not storage.is_remote:
        return
    folder = storage.local(sweep_rel)
    try:
        for path in sorted(folder.iterdir()):
            if path.is_file() and not path.name.startswith("."):
                storage.push_file(f"{sweep_rel}/{path.name}")
    except StorageError as err:  # the report is in MLflow too; do not hide the sweep's own outcome
        print(f"warning: could not upload the report to {storage.describe(sweep_rel)}: {err}", file=sys.stderr)

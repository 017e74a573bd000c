"""The trial driver: one Ray Tune trial, pre-train (or reuse) -> fine-tune -> evaluate -> profile.

Three Ray layers with three names (as in Ray's Train/Tune interop docs):

* the Tuner (:mod:`orchestrator.tuner`) runs a ``ray.tune.Tuner`` over :func:`trial_driver`;
* the trial driver (this module, a Tune function trainable) waits for or claims the trial's
  pre-training, then fits ONE Ray Train ``TorchTrainer`` for the whole trial, and keeps the
  trial's state (MLflow run id, final metrics) in its folder;
* the Train worker (:mod:`orchestrator.worker`) runs every stage on every DDP rank with the plain
  PyTorch loops of :mod:`orchestrator.train`.

One worker group per trial, not one per stage: a worker group start costs seconds of process and
process-group set-up, and the hand-off between stages is then a checkpoint read on the same
workers. The guarantees stay: each stage checkpoints to storage and resumes from its newest
checkpoint when Ray Train restarts the group; a pre-training result is keyed by a hash of
everything that shapes it and reused (its done marker written last) by every trial, and every
sweep sharing the storage, that needs it.

The driver itself only waits: it asks Tune for no CPU (:func:`driver_resources`) and the Train
workers hold the trial's CPUs/GPUs, in a placement group of Ray Train's own. Tune's status table
counts only what its trials ask for, the drivers, so it shows ``0/2 CPUs`` (``0.01/2`` when the
drivers took a token CPU share) while the workers train; ``ray status`` shows the real use. How
many trials run at once follows the cluster (:func:`trials_at_once`) unless the spec sets it.

A trial is keyed by ``<sweep_id>/<tune trial id>`` (stable across ``--resume`` and retries): it
names the trial's folder and its MLflow run, and the run id is stored with the trial's state so a
restarted trial re-attaches to its run.

Two concurrent trials never compute the same pre-training: a detached named actor (the
registry, one per storage) grants one owner per key with a lease the owner renews. Detached, it
outlives the trial that created it (a trial whose node died is retried and claims its key
again); restartable, it survives its own node (the owners' renewals fill it again); the Tuner
removes it at the end of the sweep (:func:`remove_registry`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import re
import threading
import time
from typing import Any

from orchestrator.worker import FINAL_METRICS, PRETRAIN_DONE, ProfileSettings, WorkerConfig, trial_worker

log = logging.getLogger(__name__)

TRIAL_STATE = "trial.json"
REGISTRY_NAMESPACE = "pom_ablations"
LEASE_S = 120.0
"""A pre-training claim not renewed for this long is taken over by a waiting trial."""
FAILURE_TAG = "failure_reason"
DRIVER_CPUS = 0.0
"""CPUs a trial driver asks for (see :data:`DRIVER_MEMORY`)."""
DRIVER_MEMORY = 128 * 1024**2
"""Bytes of Ray's ``memory`` resource a trial driver asks for. Tune cannot place a trial that
asks for nothing; a CPU share (even 0.01) would leave a 2-CPU machine 1.98 CPUs, one short of
a second 1-CPU trial's worker, so the drivers ask for no CPU at all."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrialContext:
    """Everything a trial needs that is the same for the whole sweep (sent once to each trial)."""

    sweep_id: str
    storage: str
    """``storage.path``: an absolute folder or ``s3://bucket/prefix``."""
    sweep_rel: str
    """The sweep's folder relative to the storage root (``sweeps/<sweep_id>``)."""
    spec_run: dict[str, Any]
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    profile: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The spec's ``profile`` section: ``enabled``, ``scope``, ``lengths_s``, ``batch_size``, ``repeats``."""
    objectives: tuple[str, ...] = ("dev_wer",)
    max_failures: int = 0
    seeds: tuple[int, ...] = ()
    """``sweep.seeds``: the trial config's replicate index picks the run's seed from them."""

    def profile_settings(self) -> ProfileSettings | None:
        if not self.profile.get("enabled", True):
            return None
        return ProfileSettings(scope=str(self.profile.get("scope", "encoder")),
                               lengths_s=tuple(float(x) for x in self.profile.get("lengths_s", (10.0, 20.0))),
                               batch_size=int(self.profile.get("batch_size", 2)),
                               repeats=int(self.profile.get("repeats", 2)))


# --------------------------------------------------------------------------------------------
# keys
# --------------------------------------------------------------------------------------------


def _digest(obj: Any, n: int = 16) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def pretrain_key(config) -> str:
    """Hash of everything that shapes a pre-training result: model, pre-training, data, seed.

    Output folders, the device and the fine-tuning/eval settings do not enter the key.
    """
    plain = config.to_dict()
    data = dict(plain["data"])
    for key in ("cache_dir", "num_workers"):
        data.pop(key, None)
    shaping = {"model": plain["model"], "pretrain": plain["pretrain"], "data": data}
    return _digest(shaping)


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Tune hands sampled ``a.b`` names back as they were (OptunaSearch unflattens on '/')."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}/"))
        else:
            out[name.replace("/", ".")] = value
    return out


# --------------------------------------------------------------------------------------------
# the pre-training registry (a detached named actor: one owner per key, across the cluster)
# --------------------------------------------------------------------------------------------

OWNER = "owner"


class PretrainRegistry:
    """One owner per pre-training key, held as a lease that the owner renews."""

    def __init__(self) -> None:
        self.owners: dict[str, tuple[str, float]] = {}

    def claim(self, key: str, owner: str, lease_s: float = LEASE_S) -> str:
        """Take or renew ``key`` for ``owner``: :data:`OWNER`, or the current owner's name."""
        now = time.time()
        current = self.owners.get(key)
        if current is None or current[0] == owner or current[1] < now:
            self.owners[key] = (owner, now + lease_s)
            return OWNER
        return current[0]

    def release(self, key: str, owner: str) -> None:
        if key in self.owners and self.owners[key][0] == owner:
            del self.owners[key]

    def held(self) -> int:
        now = time.time()
        return sum(1 for _, expires in self.owners.values() if expires >= now)


def registry_name(storage_uri: str) -> str:
    return f"pretrain-registry-{_digest(storage_uri, 12)}"


def registry(storage_uri: str):
    """The registry of ``storage_uri`` (created on first use; detached, restarted if its node dies)."""
    import ray

    # "DEFAULT": outside the calling trial's placement group. Tune places each trial driver in a
    # group that captures what it starts; an actor in it dies when the trial ends and the group
    # is removed, detached or not (and a task asking for more than the group's bundle is refused
    # at once: why a profile task started from the trial driver made every trial fail).
    return ray.remote(PretrainRegistry).options(
        name=registry_name(storage_uri), namespace=REGISTRY_NAMESPACE, lifetime="detached", get_if_exists=True,
        max_restarts=-1, max_task_retries=-1, num_cpus=0, scheduling_strategy="DEFAULT",
    ).remote()


def remove_registry(storage_uri: str) -> bool:
    """Kill the sweep's registry unless another sweep on the same storage holds a claim in it.

    The Tuner calls this when its sweep ends. Returns whether it was removed.
    """
    import ray

    try:
        actor = ray.get_actor(registry_name(storage_uri), namespace=REGISTRY_NAMESPACE)
    except ValueError:
        return False
    try:
        if ray.get(actor.held.remote(), timeout=30) > 0:
            return False
    except (ray.exceptions.RayError, TimeoutError):
        pass
    ray.kill(actor, no_restart=True)
    return True


class _Claim:
    """Waits until this trial may run: the pre-training is done, or this trial owns it.

    While owned, a daemon thread renews the lease; ``release`` ends it.
    """

    def __init__(self, storage, storage_uri: str, key: str, owner: str) -> None:
        self.storage, self.storage_uri, self.key, self.owner = storage, storage_uri, key, owner
        self.done_rel = f"pretrain/{key}/{PRETRAIN_DONE}"
        self.owned = False
        self.waited_s = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> bool:
        """Return whether the pre-training was already done (reused) when the wait ended."""
        import ray

        started = time.time()
        try:
            while not self.storage.exists(self.done_rel):
                if ray.get(registry(self.storage_uri).claim.remote(self.key, self.owner)) == OWNER:
                    self.owned = True
                    self._thread = threading.Thread(target=self._renew, daemon=True)
                    self._thread.start()
                    break
                time.sleep(2.0)
        finally:
            self.waited_s = time.time() - started
        return self.storage.exists(self.done_rel)

    def _renew(self) -> None:
        import ray

        while not self._stop.wait(LEASE_S / 6):
            try:
                ray.get(registry(self.storage_uri).claim.remote(self.key, self.owner), timeout=30)
            except Exception as err:  # the next renewal tries again; the lease is long
                log.warning("could not renew the pre-training claim %s: %s", self.key, err)

    def release(self) -> None:
        import ray

        self._stop.set()
        if self.owned:
            ray.get(registry(self.storage_uri).release.remote(self.key, self.owner))
            self.owned = False


# --------------------------------------------------------------------------------------------
# the trial driver (a Ray Tune function trainable)
# --------------------------------------------------------------------------------------------


def driver_resources(extra: dict[str, float] | None = None) -> dict[str, float]:
    """What Tune reserves for one trial driver: no CPU, a little memory, ``extra`` custom resources."""
    return {"CPU": DRIVER_CPUS, "memory": DRIVER_MEMORY, **(extra or {})}


def trials_at_once(workers: int, cpus_per_worker: float, gpus_per_worker: float = 0.0,
                   cluster: dict[str, float] | None = None) -> int:
    """Trials whose worker groups fit the cluster together (``cluster``: ``ray.cluster_resources()``).

    2 CPUs and 1 worker x 1 CPU per trial: 2 trials at once. At least 1.
    """
    if cluster is None:
        import ray

        cluster = ray.cluster_resources()
    fits = int(cluster.get("CPU", 0.0) / (workers * cpus_per_worker) + 1e-9)
    if gpus_per_worker > 0:
        fits = min(fits, int(cluster.get("GPU", 0.0) / (workers * gpus_per_worker) + 1e-9))
    return max(1, fits)


def _fit(ctx: TrialContext, worker: WorkerConfig) -> None:
    """One TorchTrainer for the whole trial; its dev-WER rungs go to Tune."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from orchestrator.storage import open_storage

    storage_path, filesystem = open_storage(ctx.storage).ray_storage(f"{ctx.sweep_rel}/ray_train")
    gpus = {"GPU": ctx.gpus_per_worker} if ctx.gpus_per_worker else {}
    TorchTrainer(
        trial_worker,
        train_loop_config=worker.to_dict(),
        scaling_config=ScalingConfig(num_workers=ctx.workers, use_gpu=ctx.gpus_per_worker > 0,
                                     resources_per_worker={"CPU": ctx.cpus_per_worker, **gpus}),
        run_config=RunConfig(
            name=worker.trial_key.replace("/", "-"), storage_path=storage_path, storage_filesystem=filesystem,
            callbacks=[TuneReportCallback()],
            # The worker resumes every stage from its own checkpoints when the group restarts.
            failure_config=FailureConfig(max_failures=ctx.max_failures),
        ),
    ).fit()


def trial_driver(config: dict[str, Any], ctx: TrialContext) -> None:
    """Ray Tune function trainable: one trial, end to end."""
    from ray import tune

    from orchestrator.replicates import REPLICATE_SEED, replicate_seed, seed_params
    from orchestrator.spec import build_run_config
    from orchestrator.storage import open_storage
    from orchestrator.tracking import Tracker

    started = time.time()
    config = dict(config)
    seed = replicate_seed(ctx.seeds, config)  # pops the replicate index: it is no config path
    params = dict(config["__grid__"]) if "__grid__" in config else flatten(config)
    tune_id = tune.get_context().get_trial_id()
    trial_key = f"{ctx.sweep_id}/{tune_id}"
    storage = open_storage(ctx.storage)
    trial_rel = f"{ctx.sweep_rel}/trials/{tune_id}"
    run_rel = f"{trial_rel}/run"
    state_path = f"{trial_rel}/{TRIAL_STATE}"
    state = storage.read_json(state_path) or {}
    if state.get("status") == "done":  # completed before an interruption: report, never rerun
        tune.report(state["final"])
        return

    tracker = Tracker(uri=ctx.tracking_uri, experiment_id=ctx.experiment_id)
    run_id = state.get("mlflow_run_id") or tracker.trial_run(ctx.parent_run_id, trial_key, f"trial-{tune_id}")
    state.update({"trial_key": trial_key, "mlflow_run_id": run_id, "params": params, "status": "running",
                  "attempts": int(state.get("attempts", 0)) + 1})  # > 1: Tune retried it (--resume counts too)
    storage.write_json(state_path, state)

    claim = None
    try:
        config_obj = dataclasses.replace(
            build_run_config(ctx.spec_run, {**params, **seed_params(seed)}, source=f"trial {trial_key}"),
            output_dir=str(storage.local(run_rel)))
        run_plain = config_obj.to_dict()
        run_plain.pop("output_dir", None)  # each stage sets its own folder on the worker's node
        _log_trial_params(tracker, run_id, params, config_obj, trial_key)
        if seed is not None:  # the seed is part of the pre-training key: replicates never share one
            tracker.log_params(run_id, {REPLICATE_SEED: seed})
            tracker.set_tags(run_id, {REPLICATE_SEED: str(seed)})
        param_count = float(_param_count(config_obj))
        tracker.log_metrics(run_id, {"params": param_count})  # known now: a trial ASHA stops keeps it too

        key = pretrain_key(config_obj)
        pre_rel = f"pretrain/{key}"
        claim = _Claim(storage, ctx.storage, key, trial_key)
        reused = claim.acquire()
        if not reused:
            storage.write_json(f"{pre_rel}/config.json", {"key": key, "run": run_plain})
        tracker.set_tags(run_id, {"pretrain_reused": str(reused).lower(), "pretrain_key": key})
        tracker.log_metrics(run_id, {"time/pretrain_wait_s": claim.waited_s})

        _fit(ctx, WorkerConfig(
            trial_key=trial_key, run_id=run_id, tracking_uri=ctx.tracking_uri, experiment_id=ctx.experiment_id,
            storage=ctx.storage, run=run_plain, run_rel=run_rel, pretrain_rel=pre_rel,
            objectives=tuple(ctx.objectives), cpus_per_worker=ctx.cpus_per_worker,
            profile=ctx.profile_settings(), trial_started=started + claim.waited_s,
        ))
        claim.release()
        final = storage.read_json(f"{run_rel}/{FINAL_METRICS}")
        if not final:
            raise RuntimeError(f"fine-tuning finished without writing {storage.describe(f'{run_rel}/{FINAL_METRICS}')}")
        final["params"] = param_count
        final["pretrain_reused"] = float(reused)
        final["wall_time_s"] = final["time/total_s"] = time.time() - started
        final["time/pretrain_wait_s"] = claim.waited_s
        tracker.log_metrics(run_id, {k: final[k] for k in ("params", "wall_time_s", "time/total_s")})
        bad = [k for k in ctx.objectives if not _finite(final.get(k))]
        if bad:
            raise RuntimeError(f"trial ended without a finite {', '.join(bad)} (diverged?); final metrics: {sorted(final.items())[:40]}")
        state.update({"status": "done", "final": final})
        state.pop("reason", None)
        storage.write_json(state_path, state)
        clear_failure(tracker, run_id)  # an earlier attempt of this trial may have failed
        tracker.finish(run_id, "FINISHED")
        tune.report(final)
    except Exception as err:
        reason = failure_reason(err)
        state.update({"status": "failed", "reason": reason})
        storage.write_json(state_path, state)
        try:
            tracker.set_tags(run_id, {FAILURE_TAG: reason})
            tracker.finish(run_id, "FAILED")
        finally:
            if claim is not None:
                claim.release()
            raise


def clear_failure(tracker, run_id: str) -> bool:
    """Remove the ``failure_reason`` tag an earlier attempt left; return whether there was one."""
    if FAILURE_TAG not in tracker.client.get_run(run_id).data.tags:
        return False
    tracker.client.delete_tag(run_id, FAILURE_TAG)
    return True


def mark_stopped(storage, sweep_rel: str, trial_keys) -> list[str]:
    """Set ``trial.json`` to ``stopped`` for trials the scheduler stopped early (they never reach
    their own end, so their state says ``running``). Returns the trial ids changed."""
    changed = []
    for key in trial_keys:
        tune_id = str(key).rsplit("/", 1)[-1]
        rel = f"{sweep_rel}/trials/{tune_id}/{TRIAL_STATE}"
        state = storage.read_json(rel)
        if state and state.get("status") == "running":
            state["status"] = "stopped"
            storage.write_json(rel, state)
            changed.append(tune_id)
    return changed


_ERROR_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception)): (.+)$")


def failure_reason(err: BaseException) -> str:
    """The innermost ``SomeError: message`` line of an error (Ray wraps worker tracebacks)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in reversed(lines):
        match = _ERROR_LINE.match(line)
        if match:
            return f"{match.group(1).rsplit('.', 1)[-1]}: {match.group(2)}"[:2000]
    return (lines[-1] if lines else type(err).__name__)[:2000]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _param_count(config) -> int:
    from models.builder import build_best_rq
    from models.params import count_parameters

    counts = count_parameters(build_best_rq(config.model))
    return int(counts.get("total", sum(v for k, v in counts.items() if k != "total")))


def _log_trial_params(tracker, run_id: str, params: dict[str, Any], config, trial_key: str) -> None:
    from models.config import plan_label
    from orchestrator.tracking import trial_run_name

    plain = config.to_dict()
    plain.pop("output_dir", None)
    tracker.log_params(run_id, {"sampled": params})
    tracker.log_params(run_id, {"config": plain})
    tracker.set_tags(run_id, {"layer_plan": plan_label(config.model.encoder.layers)})
    tracker.set_run_name(run_id, trial_run_name(plan_label(config.model.encoder.layers), trial_key))

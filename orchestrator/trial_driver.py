"""The trial driver: one Ray Tune trial, pre-train (or reuse) -> fine-tune -> evaluate -> profile.

Three Ray layers with three names (as in Ray's Train/Tune interop docs):

* the Tuner (:mod:`orchestrator.driver`) runs a ``ray.tune.Tuner`` over :func:`trial_driver`;
* the trial driver (this module, a Tune function trainable) builds and fits the Ray Train
  ``TorchTrainer`` of the trial, and keeps the trial's state (MLflow run id, stage results) in
  its folder;
* the Train worker (:mod:`orchestrator.worker`) calls the plain PyTorch loops of
  :mod:`orchestrator.train` on every DDP rank.

A trial is keyed by ``<sweep_id>/<tune trial id>`` (stable across ``--resume``): it names the
trial's checkpoint folder and its MLflow run, and the run id is stored with the trial's state so a
restarted trial re-attaches to its run. A pre-training result is keyed by a hash of everything
that shapes it and reused by every trial (and every sweep sharing the storage) that needs it; a
named Ray actor makes sure two concurrent trials never compute the same key twice.

Everything durable goes through :mod:`orchestrator.storage` (a folder, or ``s3://``): the trial
state, the pre-training done marker, the final metrics and the loops' checkpoints. The loops
write to the storage's working folder on the node they run on; with S3 each checkpoint is
uploaded once written and the newest is downloaded before a stage starts, so a trial restarted on
another node resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any

from orchestrator.worker import FINAL_METRICS, WorkerConfig, stage_worker

log = logging.getLogger(__name__)

TRIAL_STATE = "trial.json"
PRETRAIN_DONE = "pretrain.done.json"
REGISTRY_NAME = "pom_ablations_pretrain_registry"


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
    objectives: tuple[str, ...] = ("dev_wer",)
    max_failures: int = 0


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
# the pre-training registry (a named actor: one owner per key, across the whole cluster)
# --------------------------------------------------------------------------------------------


def _registry():
    import ray

    @ray.remote(num_cpus=0)
    class PretrainRegistry:
        def __init__(self) -> None:
            self.owners: dict[str, str] = {}

        def claim(self, key: str, owner: str) -> str:
            current = self.owners.get(key)
            if current is None or current == owner:
                self.owners[key] = owner
                return "owner"
            return current

        def release(self, key: str, owner: str) -> None:
            if self.owners.get(key) == owner:
                del self.owners[key]

    return PretrainRegistry.options(name=REGISTRY_NAME, get_if_exists=True, lifetime=None).remote()


# --------------------------------------------------------------------------------------------
# the trial driver (a Ray Tune function trainable)
# --------------------------------------------------------------------------------------------


def _fit_stage(ctx: TrialContext, stage: str, run: dict[str, Any], trial_key: str, run_id: str, *, output_rel: str,
               init_rel: str | None = None, tune_callback: bool):
    from orchestrator.storage import open_storage
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage_path, filesystem = open_storage(ctx.storage).ray_storage(f"{ctx.sweep_rel}/ray_train")
    callbacks = []
    if tune_callback:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
    trainer = TorchTrainer(
        stage_worker,
        train_loop_config=WorkerConfig(
            stage=stage, run=run, storage=ctx.storage, output_rel=output_rel, init_rel=init_rel,
            trial_key=trial_key, run_id=run_id, tracking_uri=ctx.tracking_uri,
            experiment_id=ctx.experiment_id, objectives=tuple(ctx.objectives),
        ).to_dict(),
        scaling_config=ScalingConfig(
            num_workers=ctx.workers,
            use_gpu=ctx.gpus_per_worker > 0,
            resources_per_worker={"CPU": ctx.cpus_per_worker, **({"GPU": ctx.gpus_per_worker} if ctx.gpus_per_worker else {})},
        ),
        run_config=RunConfig(
            name=f"{trial_key.replace('/', '-')}-{stage}",
            storage_path=storage_path,
            storage_filesystem=filesystem,
            callbacks=callbacks,
            # Our loops resume from their own checkpoints when a worker group restarts.
            failure_config=FailureConfig(max_failures=ctx.max_failures),
        ),
    )
    return trainer.fit()


def _without_output(run: dict[str, Any]) -> dict[str, Any]:
    # Each worker sets output_dir to its own node's working folder for the stage.
    out = json.loads(json.dumps(run))
    out.pop("output_dir", None)
    return out


def _pretrain_stage(ctx: TrialContext, storage, config, run_plain: dict[str, Any], trial_key: str, run_id: str,
                    tracker) -> tuple[str, bool]:
    """Return the pre-training folder (relative to the storage) for this trial's key and whether it was reused."""
    import ray

    key = pretrain_key(config)
    folder = f"pretrain/{key}"
    done = f"{folder}/{PRETRAIN_DONE}"
    if storage.exists(done):
        return folder, True
    registry = _registry()
    waited = False
    while True:
        owner = ray.get(registry.claim.remote(key, trial_key))
        if owner == "owner":
            break
        if storage.exists(done):
            return folder, True
        waited = True
        time.sleep(2.0)
    try:
        if storage.exists(done):  # finished by the previous owner while we waited
            return folder, True
        stage_run = _without_output(run_plain)
        storage.write_json(f"{folder}/config.json", {"key": key, "run": stage_run})
        tracker.set_tags(run_id, {"pretrain_key": key})
        _fit_stage(ctx, "pretrain", stage_run, trial_key, run_id, output_rel=folder, tune_callback=False)
        storage.write_json(done, {"key": key, "by": trial_key, "time": time.time()})
        return folder, waited
    finally:
        ray.get(registry.release.remote(key, trial_key))


def trial_driver(config: dict[str, Any], ctx: TrialContext) -> None:
    """Ray Tune function trainable: one trial, end to end."""
    from ray import tune

    from orchestrator.spec import build_run_config
    from orchestrator.storage import open_storage
    from orchestrator.tracking import Tracker

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
    state.update({"trial_key": trial_key, "mlflow_run_id": run_id, "params": params, "status": "running"})
    storage.write_json(state_path, state)

    started = time.time()
    try:
        base = build_run_config(ctx.spec_run, params, source=f"trial {trial_key}")
        config_obj = dataclasses.replace(base, output_dir=str(storage.local(run_rel)))
        run_plain = config_obj.to_dict()
        _log_trial_params(tracker, run_id, params, config_obj)
        param_count = float(_param_count(config_obj))
        tracker.log_metrics(run_id, {"params": param_count})  # known now: a trial ASHA stops keeps it too

        pre_folder, reused = _pretrain_stage(ctx, storage, config_obj, run_plain, trial_key, run_id, tracker)
        tracker.set_tags(run_id, {"pretrain_reused": str(reused).lower(), "pretrain_key": pre_folder.rsplit("/", 1)[-1]})

        _fit_stage(ctx, "finetune", _without_output(run_plain), trial_key, run_id, output_rel=run_rel,
                   init_rel=pre_folder, tune_callback=True)
        final = storage.read_json(f"{run_rel}/{FINAL_METRICS}")
        if not final:
            raise RuntimeError(f"fine-tuning finished without writing {storage.describe(f'{run_rel}/{FINAL_METRICS}')}")

        if ctx.profile.get("enabled", True):
            prof = _profile(config_obj, ctx.profile)
            final.update(prof)
            tracker.log_metrics(run_id, prof)
        final["params"] = param_count
        final["wall_time_s"] = time.time() - started
        final["pretrain_reused"] = float(reused)
        tracker.log_metrics(run_id, {"params": final["params"], "wall_time_s": final["wall_time_s"]})
        bad = [k for k in ctx.objectives if not _finite(final.get(k))]
        if bad:
            raise RuntimeError(f"trial ended without a finite {', '.join(bad)} (diverged?); final metrics: {sorted(final.items())[:40]}")
        state.update({"status": "done", "final": final})
        storage.write_json(state_path, state)
        tracker.finish(run_id, "FINISHED")
        tune.report(final)
    except Exception as err:
        reason = failure_reason(err)
        state.update({"status": "failed", "reason": reason})
        storage.write_json(state_path, state)
        try:
            tracker.set_tags(run_id, {"failure_reason": reason})
            tracker.finish(run_id, "FAILED")
        finally:
            raise


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


def _log_trial_params(tracker, run_id: str, params: dict[str, Any], config) -> None:
    from models.config import plan_label

    plain = config.to_dict()
    plain.pop("output_dir", None)
    tracker.log_params(run_id, {"sampled": params})
    tracker.log_params(run_id, {"config": plain})
    tracker.set_tags(run_id, {"layer_plan": plan_label(config.model.encoder.layers)})


def _profile(config, profile: dict[str, Any]) -> dict[str, float]:
    import torch

    from models.builder import build_encoder
    from orchestrator.profile import profile_encoder

    encoder = build_encoder(config.model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else None
    return profile_encoder(
        encoder,
        config.model.encoder.model_dim,
        lengths_s=tuple(profile.get("lengths_s", (10.0, 20.0))),
        batch_size=int(profile.get("batch_size", 2)),
        repeats=int(profile.get("repeats", 2)),
        device=device,
        dtype=dtype,
    )

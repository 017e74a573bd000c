"""The per-trial driver: pre-train (or reuse) -> fine-tune -> evaluate -> profile.

Three layers with three names (as in Ray's Train/Tune interop docs):

* the sweep (:mod:`orchestrator.sweep`) runs a ``ray.tune.Tuner`` over :func:`trial_driver`;
* the trial driver (this module) builds and fits one Ray Train ``TorchTrainer`` per training
  stage, and keeps the trial's state (MLflow run id, stage results) in its folder;
* the worker loop (:func:`stage_worker`) calls the plain PyTorch loops of
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

log = logging.getLogger(__name__)

TRIAL_STATE = "trial.json"
PRETRAIN_DONE = "pretrain.done.json"
FINAL_METRICS = "final_metrics.json"
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
# the worker loop (runs on every Ray Train worker)
# --------------------------------------------------------------------------------------------


def _prefixed(stage: str, metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if key in ("step",):
            continue
        out[key if "/" in key else f"{stage}/{key}"] = float(value)
    return out


def relog_checkpoint_metrics(tracker, run_id: str, stage: str, checkpoints: Path) -> int | None:
    """Log again, at its step, the metrics saved with the newest checkpoint in ``checkpoints``.

    A stage calls this when it starts. The loops write a checkpoint and then report that step's
    metrics: a worker killed between the two would leave the step out of the MLflow curve, and the
    resumed run starts at the step after it. Logging the checkpoint's own metrics (its
    ``meta.json``) closes that gap; when the step was already logged it appears twice with the
    same values. Returns the step logged, or ``None`` when there is no checkpoint yet.
    """
    from orchestrator.train.checkpoint import latest_checkpoint

    newest = latest_checkpoint(checkpoints)
    if newest is None:
        return None
    try:
        meta = json.loads((newest / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    metrics, step = meta.get("metrics") or {}, meta.get("step")
    if not metrics or not isinstance(step, int):
        return None
    tracker.log_metrics(run_id, _prefixed(stage, metrics), step=step)
    return step


class DivergedError(RuntimeError):
    """A training loss became NaN or infinite: the trial fails with this reason."""


MAX_LOSS = 1e6
"""Losses here are per target (cross-entropy over codes, CTC per token): a few units when
training works; above this the run has diverged even if the number is still finite."""


def check_finite(stage: str, metrics: dict[str, Any]) -> None:
    """Raise :class:`DivergedError` when a reported loss is not finite or above ``MAX_LOSS``
    (every rank sees the same all-reduced value, so every rank raises together)."""
    for key, value in metrics.items():
        if key.endswith("loss") and isinstance(value, float) and not (math.isfinite(value) and abs(value) < MAX_LOSS):
            raise DivergedError(
                f"{stage} diverged: {key} is {value} at step {metrics.get('step', '?')}; "
                "lower the learning rate or raise the warm-up"
            )


def stage_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train worker entry: run one stage with the plain loops; rank 0 logs to MLflow."""
    import ray.train

    from orchestrator.storage import open_storage
    from orchestrator.tracking import Tracker
    from orchestrator.train.config import run_config_from_dict
    from orchestrator.train.runtime import barrier

    stage = loop_config["stage"]
    storage = open_storage(loop_config["storage"])
    run = dict(loop_config["run"])
    run["output_dir"] = str(storage.local(loop_config["output_rel"]))
    if loop_config.get("init_rel"):
        run["finetune"] = {**(run.get("finetune") or {}), "init": str(storage.local(loop_config["init_rel"]))}
    config = run_config_from_dict(run, source=f"trial {loop_config['trial_key']}")
    context = ray.train.get_context()
    rank = context.get_world_rank()
    checkpoints_rel = f"{loop_config['output_rel']}/{stage}/checkpoints"
    keep = config.pretrain.keep_checkpoints if stage == "pretrain" else config.finetune.keep_checkpoints
    # One process per node fetches what this stage reads (its newest checkpoint, or the
    # pre-trained one it starts from) into the node's working folder; the others wait.
    if context.get_local_rank() == 0:
        found = storage.pull_checkpoint(checkpoints_rel)
        if found is None and loop_config.get("init_rel"):
            storage.pull_checkpoint(f"{loop_config['init_rel']}/pretrain/checkpoints")
    barrier()

    def publish(checkpoint_dir: Path | None) -> None:
        if checkpoint_dir is not None and rank == 0:
            storage.push_checkpoint(checkpoints_rel, Path(checkpoint_dir), keep=keep)

    tracker = Tracker(uri=loop_config["tracking_uri"], experiment_id=loop_config["experiment_id"]) if rank == 0 else None
    run_id = loop_config["run_id"]
    objectives = loop_config["objectives"]
    if tracker is not None:  # a resumed stage: its checkpoint's step may not be in MLflow yet
        relog_checkpoint_metrics(tracker, run_id, stage, Path(config.output_dir) / stage / "checkpoints")

    def log_metrics(prefix: str, metrics: dict[str, Any]) -> None:
        if tracker is not None:
            step = int(metrics.get("step", 0) or 0)
            tracker.log_metrics(run_id, _prefixed(prefix, metrics), step=step)

    if stage == "pretrain":
        from orchestrator.train.pretrain import pretrain

        def report(metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
            publish(checkpoint_dir)
            log_metrics("pretrain", metrics)
            check_finite("pre-training", metrics)

        result = pretrain(config, report=report)
        if not result.get("complete", True):
            raise RuntimeError(f"pre-training stopped at step {result.get('step')} before its budget")
        return

    from orchestrator.train.evaluate import evaluate_run
    from orchestrator.train.finetune import finetune

    latest: dict[str, float] = {}

    def report(metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        publish(checkpoint_dir)
        log_metrics("finetune", metrics)
        check_finite("fine-tuning", metrics)
        wer = metrics.get("dev/wer")
        if wer is not None:
            latest["dev_wer"] = float(wer)
            if "dev/cer" in metrics:
                latest["dev_cer"] = float(metrics["dev/cer"])
            # Every rank reports (Train V2 collects one report per worker); ASHA sees dev_wer.
            tune_metrics = {"dev_wer": float(wer), "finetune_step": int(metrics.get("step", 0))}
            if "dev/cer" in metrics:
                tune_metrics["dev_cer"] = float(metrics["dev/cer"])
            ray.train.report(_fill_objectives(tune_metrics, objectives))

    result = finetune(config, report=report)
    last = dict(result.get("metrics") or {})
    if "dev/wer" in last:  # a fine-tuning run that was already complete reports nothing new
        latest.setdefault("dev_wer", float(last["dev/wer"]))
        if "dev/cer" in last:
            latest.setdefault("dev_cer", float(last["dev/cer"]))
    final: dict[str, float] = dict(latest)
    evaluation = evaluate_run(config)
    final.update(_flatten_eval(evaluation))
    if tracker is not None:
        tracker.log_metrics(run_id, final, step=int(result.get("step", 0)))
    final["finetune_step"] = int(result.get("step", 0))
    if rank == 0:  # the trial driver reads it (Train V2's Result.metrics only follows checkpoints)
        if (Path(config.output_dir) / "eval").is_dir():  # results.json and the per-subset hypotheses
            storage.push_dir(f"{loop_config['output_rel']}/eval")
        storage.write_json(f"{loop_config['output_rel']}/{FINAL_METRICS}", final)
    ray.train.report(_fill_objectives(final, objectives))


def _flatten_eval(evaluation: dict[str, Any]) -> dict[str, float]:
    """``evaluate_run`` results -> flat metrics: test_wer (first subset), test/<subset>/wer, CI."""
    out: dict[str, float] = {}
    subsets = evaluation.get("subsets") or {}
    first = True
    for subset, scores in subsets.items():
        for key in ("wer", "cer", "wer_ci_low", "wer_ci_high", "utterances"):
            if key in scores and isinstance(scores[key], (int, float)):
                out[f"test/{subset}/{key}"] = float(scores[key])
                if first and key in ("wer", "cer"):
                    out[f"test_{key}"] = float(scores[key])
        first = False
    return out


def _fill_objectives(metrics: dict[str, Any], objectives: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """Every Tune report must carry every objective (Tune checks); NaN where not known yet."""
    out = dict(metrics)
    for name in objectives:
        out.setdefault(name, float("nan"))
    return out


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
        train_loop_config={
            "stage": stage,
            "run": run,
            "storage": ctx.storage,
            "output_rel": output_rel,
            "init_rel": init_rel,
            "trial_key": trial_key,
            "run_id": run_id,
            "tracking_uri": ctx.tracking_uri,
            "experiment_id": ctx.experiment_id,
            "objectives": list(ctx.objectives),
        },
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

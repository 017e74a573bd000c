"""BEST-RQ pre-training loop (pure PyTorch: no Ray, no MLflow).

Dimensions: b batch, s samples, q codebooks, v codebook size.

    pretrain(config, report=...)                        # one process, or every rank under DDP
      -> corpus (generated on first use) -> manifests -> DynamicBatchSampler (rank, world_size)
      -> normaliser statistics on a training sample (before step 0; saved in the model)
      -> steps of train_one_step(compute_loss) with AdamW + Noam + clipping + accumulation
      -> every log_every steps: Counters reduced over ranks -> report(metrics, None)
      -> every checkpoint_every steps and at the end: checkpoint -> report(metrics, folder)

Output folder ``<output_dir>/pretrain/``: ``config.yaml`` and ``checkpoints/step-NNNNNNNN/``
(``state.pt``: model, optimizer, scheduler, GradScaler, sampler position, per-rank RNG states,
step, config; ``meta.json``: step, completeness, last metrics). A run pointed at a folder with
checkpoints resumes from the newest; a complete run returns at once.

Reported metrics (means over the window since the last report, all ranks together):
``pretrain/loss`` (cross-entropy per masked frame), ``pretrain/accuracy`` (masked prediction),
``pretrain/code_perplexity`` (exp entropy of the target-code distribution: near the codebook size
when targets spread, towards 1 on collapse), ``pretrain/audio_seconds_per_second``,
``pretrain/grad_norm``, ``pretrain/lr``, ``pretrain/skipped_steps``, ``pretrain/epoch``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from models.best_rq import BestRQModel
from models.config import config_to_dict
from orchestrator.train.config import PretrainConfig, RunConfig
from orchestrator.train.data import ensure_corpus, estimate_normalizer, load_utterances, make_loader
from orchestrator.train.loop import (
    MetricWindow,
    find_resume_checkpoint,
    gather_rank_states,
    load_training_state,
    restore_rank_state,
    save_training_checkpoint,
    train_one_step,
)
from orchestrator.train.metrics import Counters, perplexity
from orchestrator.train.runtime import Report, Runtime, deterministic, log, seed_everything, unwrap
from orchestrator.train.schedule import make_scheduler

STAGE = "pretrain"


def compute_loss(model: nn.Module, batch: dict, runtime: Runtime) -> tuple[torch.Tensor, Counters]:
    """BEST-RQ loss of one batch and its summable counters.

    Returns:
        ``loss``: () mean cross-entropy over masked frames (what is back-propagated), and counters
        ``loss`` (weighted by masked frames), ``accuracy``, ``masked_frames``, ``audio_seconds``
        and the vector ``code_usage`` ((q * v,) target counts).
    """
    waves = batch["waves"].to(runtime.device, non_blocking=True)  # (b, s)
    lengths = batch["wave_lengths"].to(runtime.device, non_blocking=True)  # (b,)
    with runtime.autocast():
        out = model(waves, lengths)
    inner = unwrap(model)
    masked = float(out.num_masked)
    counters = Counters()
    counters.add("loss", float(out.loss.detach()) * masked, masked)
    counters.add("accuracy", float(out.num_correct), masked * len(inner.heads))
    counters.add_total("masked_frames", masked)
    counters.add_total("audio_seconds", float(lengths.sum()) / inner.features.sample_rate)
    counters.add_vector("code_usage", out.target_counts.flatten())  # (q * v,)
    return out.loss, counters


def _summary(counters: Counters, elapsed: float, *, step: int, lr: float, epoch: float, num_codebooks: int) -> dict[str, Any]:
    means = counters.means()
    usage = counters.vectors["code_usage"].view(num_codebooks, -1)  # (q, v)
    code_ppl = sum(perplexity(row) for row in usage) / num_codebooks
    return {
        "stage": STAGE,
        "step": step,
        f"{STAGE}/loss": means["loss"],
        f"{STAGE}/accuracy": means["accuracy"],
        f"{STAGE}/code_perplexity": code_ppl,
        f"{STAGE}/audio_seconds_per_second": means["audio_seconds"] / max(elapsed, 1e-9),
        f"{STAGE}/grad_norm": means["grad_norm"],
        f"{STAGE}/skipped_steps": means["skipped_steps"],
        f"{STAGE}/lr": lr,
        f"{STAGE}/epoch": epoch,
    }


def make_optimizer(model: nn.Module, config: PretrainConfig) -> torch.optim.AdamW:
    """AdamW over every trainable parameter (the paper: lr 1e-3, betas (0.9, 0.98), eps 1e-9, wd 0.1)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(
        params, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay
    )


def stage_dir(config: RunConfig) -> Path:
    return Path(config.output_dir) / STAGE


def pretrain(
    config: RunConfig,
    *,
    report: Report | None = None,
    stop_after: int | None = None,
    resume_from: str | Path | None = None,
) -> dict[str, Any]:
    """Run (or resume, or skip when complete) BEST-RQ pre-training.

    Works as a single process and, unchanged, on every rank of an initialised process group.

    Args:
        config: the run configuration (``model``, ``data``, ``pretrain``, ``output_dir``, ``device``).
        report: ``report(metrics, checkpoint_dir)``, called on every rank after the reduce, at each
            log interval and with the checkpoint folder at each checkpoint.
        stop_after: stop (with a checkpoint) after this step, as a preempted run would; the
            schedule still follows ``config.pretrain.steps``.
        resume_from: a checkpoint folder to resume from instead of the newest in the stage folder.

    Returns:
        ``{"step", "complete", "checkpoint", "metrics"}``: the last step, whether the budget is
        reached, the last checkpoint folder and the last reported metrics.
    """
    pc = config.pretrain
    runtime = Runtime.create(config.device, pc.precision)
    root = stage_dir(config)
    checkpoints = root / "checkpoints"
    report = report or (lambda metrics, checkpoint_dir: None)

    with deterministic(pc.deterministic):
        resume = find_resume_checkpoint(checkpoints, Path(resume_from) if resume_from else None)
        state = load_training_state(resume, runtime, STAGE) if resume is not None else None
        if state is not None:
            _check_same_model(state, config, resume)
            if state["step"] >= pc.steps:
                log.info("pre-training already complete at step %d (%s)", state["step"], resume)
                meta = state.get("meta", {})
                return {"step": state["step"], "complete": True, "checkpoint": resume, "metrics": meta}

        ensure_corpus(config.data)
        utterances = load_utterances(config.data, config.data.pretrain_subset_list)
        seed_everything(pc.seed)
        model = BestRQModel(config.model).to(runtime.device)
        optimizer = make_optimizer(model, pc)
        scheduler = make_scheduler(optimizer, pc.schedule, pc.warmup_steps, pc.steps)
        scaler = runtime.grad_scaler()
        data = make_loader(
            utterances, config.data, max_batch_seconds=pc.max_batch_seconds, seed=pc.seed, shuffle=True,
            rank=runtime.rank, world_size=runtime.world_size,
        )
        step = 0
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if scaler is not None and state.get("scaler") is not None:
                scaler.load_state_dict(state["scaler"])
            data.sampler.load_state_dict(state["sampler"])
            step = int(state["step"])
            if restore_rank_state(state["ranks"], runtime) is None:
                seed_everything(pc.seed + 1000 * runtime.rank + step)
            log.info("resumed pre-training from %s at step %d", resume, step)
        else:
            start = time.perf_counter()
            frames = estimate_normalizer(
                model, utterances, config.data, seed=pc.seed, rank=runtime.rank,
                world_size=runtime.world_size, device=runtime.device,
            )
            log.info("normaliser statistics from %d frames (%.1f s)", frames, time.perf_counter() - start)
            seed_everything(pc.seed + runtime.rank)  # ranks draw different masks, noise and dropout
            if runtime.is_main:
                root.mkdir(parents=True, exist_ok=True)
                (root / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        del state

        ddp_model = runtime.wrap(model)
        num_codebooks = len(model.heads)
        window = MetricWindow()
        batches = data.batches()
        metrics: dict[str, Any] = {}
        checkpoint: Path | None = resume
        last = pc.steps if stop_after is None else min(pc.steps, stop_after)
        while step < last:
            micro = [next(batches) for _ in range(pc.accum_steps)]
            counters = train_one_step(
                ddp_model, micro, optimizer, scheduler, scaler, runtime, compute_loss, clip_norm=pc.clip_norm
            )
            step += 1
            window.add(counters)
            done = step >= last
            save = step % pc.checkpoint_every == 0 or done
            if step % pc.log_every == 0 or save:
                reduced, elapsed = window.close()
                epoch = data.sampler.epoch + data.sampler.batches_done / max(1, len(data.sampler))
                metrics = _summary(
                    reduced, elapsed, step=step, lr=scheduler.get_last_lr()[0], epoch=epoch,
                    num_codebooks=num_codebooks,
                )
                if not math.isfinite(metrics[f"{STAGE}/loss"]):
                    log.warning("pre-training loss is %s at step %d", metrics[f"{STAGE}/loss"], step)
            checkpoint_dir = None
            if save:
                rank_states = gather_rank_states()
                meta = {"stage": STAGE, "steps": pc.steps, "complete": step >= pc.steps, "metrics": metrics}
                checkpoint_dir = save_training_checkpoint(
                    checkpoints, step,
                    {
                        "stage": STAGE,
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict() if scaler is not None else None,
                        "sampler": data.sampler.state_dict(),
                        "config": config.to_dict(),
                        "model_config": config_to_dict(config.model),
                        "meta": meta,
                    },
                    rank_states, runtime, keep=pc.keep_checkpoints, meta=meta,
                )
                checkpoint = checkpoint_dir
            if step % pc.log_every == 0 or save:
                report(metrics, checkpoint_dir)
                window.reset_clock()
        return {"step": step, "complete": step >= pc.steps, "checkpoint": checkpoint, "metrics": metrics}


def _check_same_model(state: dict, config: RunConfig, path: Path) -> None:
    saved = state.get("model_config")
    if saved is not None and saved != config_to_dict(config.model):
        raise ValueError(
            f"{path} was trained with another model configuration than this run's; resume with the "
            "same model: section, or choose another output_dir"
        )

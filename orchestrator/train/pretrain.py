"""BEST-RQ pre-training loop (pure PyTorch: no Ray, no MLflow).

Dimensions: b batch, s samples, q codebooks, v codebook size.

    pretrain(config, report=...)                        # one process, or every rank under DDP
      -> corpus (generated on first use) -> manifests -> DynamicBatchSampler (rank, world_size)
      -> normaliser statistics on a training sample (before step 0; saved in the model)
      -> run_stage (orchestrator.train.loop): steps of train_one_step(compute_loss) with AdamW +
         Noam + clipping + accumulation; every log_every steps: Counters reduced over ranks ->
         report(metrics, None); every checkpoint_every steps and at the end: checkpoint ->
         report(metrics, folder)

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

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.best_rq import BestRQModel
from models.config import config_to_dict
from orchestrator.train.config import PretrainConfig, RunConfig
from orchestrator.train.data import Loader, ensure_corpus, estimate_normalizer, load_utterances, make_loader
from orchestrator.train.loop import Objective, check_same_model, run_stage
from orchestrator.train.metrics import Counters, perplexity
from orchestrator.train.runtime import Runtime, log, unwrap
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


def summarise(counters: Counters, elapsed: float, *, step: int, lr: float, epoch: float, num_codebooks: int) -> dict[str, Any]:
    """The reported metrics of one window (names in the module docstring)."""
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


class PretrainObjective(Objective):
    """BEST-RQ on the pre-training subsets: the part of :func:`run_stage` that is pre-training's."""

    stage = STAGE

    def __init__(self, config: RunConfig) -> None:
        super().__init__(config, config.pretrain)
        self.utterances: list = []

    def check_resume(self, state: dict[str, Any], path: Path) -> None:
        check_same_model(state, self.model_config(), path)

    def model_config(self) -> dict[str, Any]:
        return config_to_dict(self.config.model)

    def prepare(self, resume: Path | None) -> Loader:
        ensure_corpus(self.config.data)
        self.utterances = load_utterances(self.config.data, self.config.data.pretrain_subset_list)
        pc, runtime = self.config.pretrain, self.runtime
        return make_loader(
            self.utterances, self.config.data, max_batch_seconds=pc.max_batch_seconds, seed=pc.seed, shuffle=True,
            rank=runtime.rank, world_size=runtime.world_size,
        )

    def build(self, steps: int):
        pc = self.config.pretrain
        model = BestRQModel(self.config.model).to(self.runtime.device)
        optimizer = make_optimizer(model, pc)
        return model, optimizer, make_scheduler(optimizer, pc.schedule, pc.warmup_steps, steps)

    def initialise(self) -> None:
        start = time.perf_counter()
        frames = estimate_normalizer(
            self.model, self.utterances, self.config.data, seed=self.config.pretrain.seed, rank=self.runtime.rank,
            world_size=self.runtime.world_size, device=self.runtime.device,
        )
        log.info("normaliser statistics from %d frames (%.1f s)", frames, time.perf_counter() - start)

    def compute_loss(self, model: nn.Module, batch: dict, runtime: Runtime) -> tuple[torch.Tensor, Counters]:
        return compute_loss(model, batch, runtime)

    def summary(self, counters: Counters, elapsed: float, *, step: int, epoch: float) -> dict[str, Any]:
        return summarise(
            counters, elapsed, step=step, lr=self.scheduler.get_last_lr()[0], epoch=epoch,
            num_codebooks=len(self.model.heads),
        )


def pretrain(config: RunConfig, **options: Any) -> dict[str, Any]:
    """Run (or resume, or skip when complete) BEST-RQ pre-training: :func:`run_stage` of a
    :class:`PretrainObjective`; ``options`` are its ``report``, ``stop_after`` and ``resume_from``.

    Returns:
        ``{"step", "complete", "checkpoint", "metrics"}``.
    """
    return run_stage(PretrainObjective(config), **options)

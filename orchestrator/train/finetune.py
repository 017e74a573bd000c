"""CTC fine-tuning loop and greedy validation (pure PyTorch: no Ray, no MLflow).

Dimensions: b batch, s samples, t' encoder frames, v vocabulary, u target tokens.

    finetune(config, report=...)
      -> tokenizer (characters, or sentencepiece trained on the training transcripts)
      -> CTCModel: encoder from the pre-training checkpoint (loaded/skipped/missing keys logged)
         or random init (then normaliser statistics are estimated here)
      -> AdamW with two groups (CTC head 3e-4, encoder 5e-5: the paper), Noam warm-up
      -> optional frozen-encoder warm-up: the first freeze_encoder_steps train the head only
      -> speed perturbation + SpecAugment, CTC loss (zero_infinity)
      -> every eval_every steps and at the end: greedy dev WER/CER per subset

Output folder ``<output_dir>/finetune/``: ``config.yaml``, ``tokenizer/``, ``checkpoints/``
(each checkpoint holds its own ``tokenizer/`` too, so it is self-contained for evaluation).

Reported metrics: ``finetune/loss`` (CTC per target token), ``finetune/grad_norm``,
``finetune/lr_head``, ``finetune/lr_encoder``, ``finetune/audio_seconds_per_second``,
``finetune/encoder_frozen``, ``finetune/epoch``; at evaluations ``dev/wer``, ``dev/cer``,
``dev/loss`` over all dev subsets and ``<subset>/wer``, ``<subset>/cer`` per subset.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from torch import nn

from models.config import config_to_dict
from models.ctc import CTCModel, greedy_decode
from orchestrator.data.augment import SpecAugment, SpeedPerturb
from orchestrator.data.tokenizers import BPETokenizer, CharTokenizer, load_tokenizer
from orchestrator.train.checkpoint import latest_checkpoint, load_state
from orchestrator.train.config import FinetuneConfig, RunConfig
from orchestrator.train.data import (
    Loader,
    ensure_corpus,
    estimate_normalizer,
    load_utterances,
    make_loader,
    shard_for_rank,
)
from orchestrator.train.decoding import Scores, score
from orchestrator.train.loop import (
    MetricWindow,
    find_resume_checkpoint,
    gather_rank_states,
    load_training_state,
    restore_rank_state,
    save_training_checkpoint,
    train_one_step,
)
from orchestrator.train.metrics import Counters
from orchestrator.train.runtime import (
    Report,
    Runtime,
    all_gather_objects,
    deterministic,
    log,
    seed_everything,
    unwrap,
)
from orchestrator.train.schedule import make_scheduler

STAGE = "finetune"
TOKENIZER_DIR = "tokenizer"


# ---------------------------------------------------------------------------------------------
# Loss and evaluation


class _Augmenters(nn.Module):
    """Speed perturbation (waves) and SpecAugment (features), with their generators' state."""

    def __init__(self, config: FinetuneConfig, sample_rate: int, rank: int) -> None:
        super().__init__()
        self.speed = SpeedPerturb(config.augment, sample_rate=sample_rate, rank=rank)
        self.spec = SpecAugment(config.augment, rank=rank)


def make_compute_loss(augmenters: _Augmenters | None) -> Callable[[nn.Module, dict, Runtime], tuple[torch.Tensor, Counters]]:
    """``compute_loss`` for CTC, with training augmentation when ``augmenters`` is given."""

    def compute_loss(model: nn.Module, batch: dict, runtime: Runtime) -> tuple[torch.Tensor, Counters]:
        """CTC loss per target token of one batch, and its counters (``loss``, ``audio_seconds``)."""
        inner = unwrap(model)
        waves = batch["waves"].to(runtime.device, non_blocking=True)  # (b, s)
        lengths = batch["wave_lengths"].to(runtime.device, non_blocking=True)  # (b,)
        tokens = batch["tokens"].to(runtime.device, non_blocking=True)  # (b, u)
        token_lengths = batch["token_lengths"].to(runtime.device, non_blocking=True)  # (b,)
        spec = None
        if augmenters is not None and model.training:
            waves, lengths = augmenters.speed(waves, lengths)
            spec = augmenters.spec
        with runtime.autocast():
            out = model(waves, lengths, augment=spec)
        loss_sum = inner.ctc_loss(out, tokens, token_lengths, reduction="sum")  # fp32 log-probs
        num_tokens = float(token_lengths.sum())
        counters = Counters()
        counters.add("loss", float(loss_sum.detach()), num_tokens)
        counters.add_total("audio_seconds", float(batch["wave_lengths"].sum()) / inner.features.sample_rate)
        return loss_sum / max(num_tokens, 1.0), counters

    return compute_loss


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader,
    tokenizer,
    runtime: Runtime,
    *,
    decode: Callable[[torch.Tensor, torch.Tensor], list[str]] | None = None,
) -> tuple[Counters, Scores]:
    """Decode ``loader`` (this rank's share) and score it.

    Args:
        model: a ``CTCModel`` (a DDP wrapper is unwrapped: evaluation has no collectives).
        loader: batches with ``tokens`` (for the loss) and ``texts`` (references).
        tokenizer: turns token ids into text.
        runtime: device and precision.
        decode: ``(log_probs (b, t', v), lengths (b,)) -> texts``; default greedy.

    Returns:
        Counters (``loss`` per token, ``word_errors``/``words``, ``char_errors``/``chars``,
        unreduced) and the per-utterance :class:`Scores` (references and hypotheses included).
    """
    inner = unwrap(model)
    was_training = inner.training
    inner.eval()
    counters = Counters()
    scores = Scores.empty()
    counters.add("loss", 0.0, 0.0)
    try:
        for batch in loader:
            position = batch.get("position")
            if position is not None and getattr(position, "duplicate", False):
                continue
            waves = batch["waves"].to(runtime.device)
            lengths = batch["wave_lengths"].to(runtime.device)
            with runtime.autocast():
                out = inner(waves, lengths)
            if batch.get("tokens") is not None:
                tokens = batch["tokens"].to(runtime.device)
                token_lengths = batch["token_lengths"].to(runtime.device)
                loss_sum = inner.ctc_loss(out, tokens, token_lengths, reduction="sum")
                counters.add("loss", float(loss_sum), float(token_lengths.sum()))
            if decode is None:
                texts = [tokenizer.decode(ids) for ids in greedy_decode(out.log_probs, out.lengths, inner.blank)]
            else:
                texts = decode(out.log_probs, out.lengths)
            scores.extend(score(batch["ids"], batch["texts"], texts))
    finally:
        inner.train(was_training)
    counters.add("wer", float(sum(scores.word_errors)), float(sum(scores.words)))
    counters.add("cer", float(sum(scores.char_errors)), float(sum(scores.chars)))
    return counters, scores


def eval_loaders(config: RunConfig, subsets: tuple[str, ...], tokenizer, runtime: Runtime, max_batch_seconds: float) -> dict[str, Any]:
    """One loader per subset over this rank's share of it (every utterance scored exactly once)."""
    out = {}
    for subset in subsets:
        utterances = load_utterances(config.data, (subset,), filter_durations=False)
        mine = shard_for_rank(utterances, runtime.rank, runtime.world_size)
        if not mine:
            out[subset] = []
            continue
        out[subset] = make_loader(
            mine, config.data, max_batch_seconds=max_batch_seconds, seed=0, shuffle=False, tokenizer=tokenizer,
        ).loader
    return out


def validate(model: nn.Module, loaders: dict[str, Any], tokenizer, runtime: Runtime) -> dict[str, float]:
    """Greedy WER/CER/loss per dev subset and over all of them, reduced over ranks."""
    metrics: dict[str, float] = {}
    total = Counters()
    for subset, loader in loaders.items():
        counters, _ = evaluate(model, loader, tokenizer, runtime)
        reduced = counters.reduce().means()
        metrics[f"{subset}/wer"] = reduced["wer"]
        metrics[f"{subset}/cer"] = reduced["cer"]
        total.merge(counters)
    means = total.reduce().means()
    metrics = {"dev/wer": means["wer"], "dev/cer": means["cer"], "dev/loss": means["loss"], **metrics}
    return metrics


# ---------------------------------------------------------------------------------------------
# Set-up helpers


def build_tokenizer(config: RunConfig, utterances, root: Path):
    """The run's tokenizer: reloaded from ``root/tokenizer`` when it exists, else built (and saved by rank 0)."""
    fc = config.finetune
    saved = root / TOKENIZER_DIR
    if (saved / "tokenizer.json").exists():
        tokenizer = load_tokenizer(saved)
        if tokenizer.kind != fc.tokenizer:
            raise ValueError(
                f"{saved} holds a {tokenizer.kind!r} tokenizer but finetune.tokenizer is {fc.tokenizer!r}; "
                "choose another output_dir"
            )
        return tokenizer
    if fc.tokenizer == "char":
        return CharTokenizer()
    # Deterministic (one sentencepiece thread): every rank trains the same model in memory.
    return BPETokenizer.train([u.text for u in utterances], None, fc.vocab_size)


def resolve_init(config: RunConfig) -> Path | None:
    """The pre-training checkpoint ``finetune.init`` names (``None`` for random init).

    Raises:
        ValueError: ``pretrain`` with no complete pre-training checkpoint in this run, or a path
            without a checkpoint.
    """
    init = config.finetune.init
    if init == "random":
        return None
    if init == "pretrain":
        folder = Path(config.output_dir) / "pretrain" / "checkpoints"
        found = latest_checkpoint(folder)
        if found is None:
            raise ValueError(
                f"finetune.init is 'pretrain' but {folder} has no checkpoint: run "
                "`python -m orchestrator.run pretrain` first, or set finetune.init=random or a checkpoint path"
            )
        return found
    path = Path(init)
    if (path / "state.pt").is_file():
        return path
    for candidate in (path / "checkpoints", path / "pretrain" / "checkpoints"):
        found = latest_checkpoint(candidate)
        if found is not None:
            return found
    raise ValueError(f"finetune.init={init!r}: no pre-training checkpoint there (a step-N folder or a run folder)")


def make_optimizer(model: CTCModel, config: FinetuneConfig) -> torch.optim.AdamW:
    """AdamW with two groups: ``head`` at ``head_lr`` and everything else (``encoder``) at ``encoder_lr``."""
    head = [p for p in model.head.parameters()]
    head_ids = {id(p) for p in head}
    encoder = [p for p in model.parameters() if id(p) not in head_ids]
    return torch.optim.AdamW(
        [
            {"params": head, "lr": config.head_lr, "name": "head"},
            {"params": encoder, "lr": config.encoder_lr, "name": "encoder"},
        ],
        betas=config.betas,
        eps=config.eps,
        weight_decay=config.weight_decay,
    )


def _set_encoder_trainable(model: CTCModel, trainable: bool) -> None:
    head_ids = {id(p) for p in model.head.parameters()}
    for p in model.parameters():
        if id(p) not in head_ids:
            p.requires_grad_(trainable)


def stage_dir(config: RunConfig) -> Path:
    return Path(config.output_dir) / STAGE


# ---------------------------------------------------------------------------------------------
# The loop


def finetune(
    config: RunConfig,
    *,
    report: Report | None = None,
    stop_after: int | None = None,
    resume_from: str | Path | None = None,
) -> dict[str, Any]:
    """Run (or resume, or skip when complete) CTC fine-tuning with greedy dev evaluation.

    Args:
        config: the run configuration.
        report: ``report(metrics, checkpoint_dir)`` on every rank after the reduce.
        stop_after: stop (with a checkpoint) after this step, as a preempted run would.
        resume_from: a fine-tuning checkpoint folder to resume from instead of the newest.

    Returns:
        ``{"step", "complete", "checkpoint", "metrics", "init"}``; ``metrics`` are the last
        reported ones (with the last ``dev/wer``), ``init`` the pre-trained checkpoint and its
        loaded/skipped/missing key counts (``None`` for random init).
    """
    fc = config.finetune
    runtime = Runtime.create(config.device, fc.precision)
    root = stage_dir(config)
    checkpoints = root / "checkpoints"
    report = report or (lambda metrics, checkpoint_dir: None)

    with deterministic(fc.deterministic):
        resume = find_resume_checkpoint(checkpoints, Path(resume_from) if resume_from else None)
        state = load_training_state(resume, runtime, STAGE) if resume is not None else None
        if state is not None and state["step"] >= fc.steps:
            log.info("fine-tuning already complete at step %d (%s)", state["step"], resume)
            meta = state.get("meta", {})
            return {"step": state["step"], "complete": True, "checkpoint": resume,
                    "metrics": meta.get("metrics", {}), "init": meta.get("init")}

        ensure_corpus(config.data)
        utterances = load_utterances(config.data, config.data.train_subsets)
        tokenizer = load_tokenizer(resume / TOKENIZER_DIR) if resume is not None else build_tokenizer(config, utterances, root)
        model_config = dataclasses.replace(
            config.model, ctc=dataclasses.replace(config.model.ctc, vocab_size=tokenizer.vocab_size)
        )
        seed_everything(fc.seed)
        model = CTCModel(model_config).to(runtime.device)
        augmenters = _Augmenters(fc, model.features.sample_rate, runtime.rank)
        optimizer = make_optimizer(model, fc)
        scheduler = make_scheduler(optimizer, fc.schedule, fc.warmup_steps, fc.steps)
        scaler = runtime.grad_scaler()
        data = make_loader(
            utterances, config.data, max_batch_seconds=fc.max_batch_seconds, seed=fc.seed, shuffle=True,
            tokenizer=tokenizer, rank=runtime.rank, world_size=runtime.world_size,
        )
        dev = eval_loaders(config, config.data.dev_subsets, tokenizer, runtime, config.eval.max_batch_seconds)
        step = 0
        init_info: dict[str, Any] | None = None
        if state is not None:
            if state.get("model_config") != config_to_dict(model_config):
                raise ValueError(
                    f"{resume} was trained with another model configuration than this run's; resume with the "
                    "same model: section, or choose another output_dir"
                )
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if scaler is not None and state.get("scaler") is not None:
                scaler.load_state_dict(state["scaler"])
            data.sampler.load_state_dict(state["sampler"])
            step = int(state["step"])
            init_info = state.get("meta", {}).get("init")
            mine = restore_rank_state(state["ranks"], runtime)
            if mine is not None:
                augmenters.load_state_dict(mine["augment"])
            else:
                seed_everything(fc.seed + 1000 * runtime.rank + step)
            log.info("resumed fine-tuning from %s at step %d", resume, step)
        else:
            init_info = _initialise(model, config, utterances, runtime)
            seed_everything(fc.seed + runtime.rank)
            if runtime.is_main:
                root.mkdir(parents=True, exist_ok=True)
                tokenizer.save(root / TOKENIZER_DIR)
                (root / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        del state

        frozen = step < fc.freeze_encoder_steps
        _set_encoder_trainable(model, not frozen)
        ddp_model = runtime.wrap(model)
        compute_loss = make_compute_loss(augmenters)
        window = MetricWindow()
        batches = data.batches()
        metrics: dict[str, Any] = {}
        dev_metrics: dict[str, float] = {}
        checkpoint: Path | None = resume
        last = fc.steps if stop_after is None else min(fc.steps, stop_after)
        while step < last:
            if frozen and step >= fc.freeze_encoder_steps:
                # DDP registers gradient hooks for the parameters that require grad when it is built:
                # unfreezing needs a new wrapper (its construction broadcasts rank 0's, identical, weights).
                frozen = False
                _set_encoder_trainable(model, True)
                ddp_model = runtime.wrap(model)
                log.info("step %d: encoder unfrozen", step)
            micro = [next(batches) for _ in range(fc.accum_steps)]
            counters = train_one_step(
                ddp_model, micro, optimizer, scheduler, scaler, runtime, compute_loss, clip_norm=fc.clip_norm
            )
            step += 1
            window.add(counters)
            done = step >= last
            save = step % fc.checkpoint_every == 0 or done
            evaluate_now = step % fc.eval_every == 0 or step >= fc.steps
            if step % fc.log_every == 0 or save or evaluate_now:
                reduced, elapsed = window.close()
                means = reduced.means()
                lrs = {g.get("name", str(i)): lr for i, (g, lr) in enumerate(zip(optimizer.param_groups, scheduler.get_last_lr()))}
                metrics = {
                    "stage": STAGE,
                    "step": step,
                    f"{STAGE}/loss": means["loss"],
                    f"{STAGE}/grad_norm": means["grad_norm"],
                    f"{STAGE}/skipped_steps": means["skipped_steps"],
                    f"{STAGE}/audio_seconds_per_second": means["audio_seconds"] / max(elapsed, 1e-9),
                    f"{STAGE}/lr_head": lrs.get("head", math.nan),
                    f"{STAGE}/lr_encoder": lrs.get("encoder", math.nan),
                    f"{STAGE}/encoder_frozen": float(frozen),
                    f"{STAGE}/epoch": data.sampler.epoch + data.sampler.batches_done / max(1, len(data.sampler)),
                }
                if evaluate_now:
                    start = time.perf_counter()
                    dev_metrics = validate(model, dev, tokenizer, runtime)
                    metrics.update(dev_metrics)
                    metrics["dev/seconds"] = time.perf_counter() - start
            checkpoint_dir = None
            if save:
                rank_states = gather_rank_states({"augment": augmenters.state_dict()})
                meta = {"stage": STAGE, "steps": fc.steps, "complete": step >= fc.steps, "metrics": metrics,
                        "dev": dev_metrics, "init": init_info, "tokenizer": tokenizer.kind}
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
                        "model_config": config_to_dict(model_config),
                        "meta": meta,
                    },
                    rank_states, runtime, keep=fc.keep_checkpoints, meta=meta,
                    write_files=lambda folder: tokenizer.save(folder / TOKENIZER_DIR),
                )
                checkpoint = checkpoint_dir
            if step % fc.log_every == 0 or save or evaluate_now:
                report(metrics, checkpoint_dir)
                window.reset_clock()
        return {"step": step, "complete": step >= fc.steps, "checkpoint": checkpoint, "metrics": metrics,
                "init": init_info}


def _initialise(model: CTCModel, config: RunConfig, utterances, runtime: Runtime) -> dict[str, Any] | None:
    """Load the pre-trained backbone (normaliser included), or estimate the normaliser for random init."""
    source = resolve_init(config)
    if source is None:
        frames = estimate_normalizer(
            model, utterances, config.data, seed=config.finetune.seed, rank=runtime.rank,
            world_size=runtime.world_size, device=runtime.device,
        )
        log.info("random init; normaliser statistics from %d frames", frames)
        return None
    state = load_state(source, map_location=runtime.device)
    if state.get("stage") != "pretrain":
        raise ValueError(f"finetune.init: {source} is a {state.get('stage')!r} checkpoint, not a pre-training one")
    if not state.get("meta", {}).get("complete", True):
        log.warning("fine-tuning from %s, an incomplete pre-training run (step %d)", source, state["step"])
    result = model.load_pretrained(state["model"])
    if not model.normalizer.is_fitted:
        raise ValueError(f"{source}: the pre-trained model has no normaliser statistics")
    info = {
        "checkpoint": str(source),
        "pretrain_step": int(state["step"]),
        "loaded": len(result.loaded),
        "skipped": len(result.skipped),
        "missing": len(result.missing),
        "skipped_keys": sorted({k.split(".", 1)[0] for k in result.skipped}),
        "missing_keys": sorted({k.split(".", 1)[0] for k in result.missing}),
    }
    log.info(
        "encoder from %s (step %d): %d keys loaded, %d skipped (%s), %d missing (%s)",
        source, info["pretrain_step"], info["loaded"], info["skipped"], ", ".join(info["skipped_keys"]),
        info["missing"], ", ".join(info["missing_keys"]),
    )
    return info

"""CTC fine-tuning objective and greedy validation (pure PyTorch: no Ray, no MLflow).

Dimensions: b batch, s samples, t' encoder frames, v vocabulary, u target tokens.

    finetune(config, report=...)  ->  run_stage(FinetuneObjective)   (orchestrator.train.loop)
      -> tokenizer (characters, or sentencepiece trained on the training transcripts)
      -> CTCModel: encoder from the pre-training checkpoint (loaded/skipped/missing keys logged)
         or random init (then normaliser statistics are estimated here)
      -> budget: ``finetune.steps`` optimiser steps, or ``finetune.epochs`` passes over the
         training subsets (resolved to steps from the sampler's batches per epoch)
      -> AdamW with two groups (CTC head ``head_lr``, encoder ``encoder_lr``; the paper: 3e-4 and
         5e-5, weight decay 1e-3) and ``finetune.schedule``: ``noam``, ``linear``, ``constant``
         (after a linear warm-up) or ``newbob`` (annealed on the dev loss at each evaluation:
         head x ``newbob_head_factor``, encoder x ``newbob_encoder_factor`` when the relative
         improvement is below ``newbob_threshold`` for more than ``newbob_patience`` evaluations)
      -> optional frozen-encoder warm-up: the first freeze_encoder_steps train the head only
      -> augmentation (``finetune.augment``): speed perturbation, DropFreq, DropChunk on the waves
         in sequence, the clean batch optionally concatenated, SpecAugment on the features;
         CTC loss (zero_infinity)
      -> every ``eval_every`` steps (or each epoch) and at the end: greedy dev WER/CER/loss per
         subset; a new best dev WER writes a checkpoint and ``checkpoints/best.json`` names it
         (the test evaluation loads that one)

Output folder ``<output_dir>/finetune/``: ``config.yaml``, ``tokenizer/``, ``checkpoints/``
(each checkpoint holds its own ``tokenizer/`` too, so it is self-contained for evaluation).

Reported metrics: ``finetune/loss`` (CTC per target token), ``finetune/grad_norm``,
``finetune/lr_head``, ``finetune/lr_encoder``, ``finetune/audio_seconds_per_second`` (of the
corpus audio, before augmentation), ``finetune/encoder_frozen``, ``finetune/epoch``; at
evaluations ``dev/wer``, ``dev/cer``, ``dev/loss`` over all dev subsets, ``<subset>/wer``,
``<subset>/cer`` per subset, and ``dev/best_wer``.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from models.config import config_to_dict
from models.ctc import CTCModel, greedy_decode
from orchestrator.data.augment import SpecAugment, WaveAugment
from orchestrator.data.tokenizers import BPETokenizer, CharTokenizer, load_tokenizer
from orchestrator.errors import StageError
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
from orchestrator.train.loop import Objective, run_stage
from orchestrator.train.metrics import Counters
from orchestrator.train.runtime import Runtime, log, unwrap
from orchestrator.train.schedule import NewBob, NewBobScheduler, make_scheduler

STAGE = "finetune"
TOKENIZER_DIR = "tokenizer"


# ---------------------------------------------------------------------------------------------
# Loss and evaluation


class _Augmenters(nn.Module):
    """The wave chain (speed, DropFreq, DropChunk, clean concat) and SpecAugment (features),
    with their generators' state."""

    def __init__(self, config: FinetuneConfig, sample_rate: int, rank: int) -> None:
        super().__init__()
        self.wave = WaveAugment(config.augment, sample_rate=sample_rate, rank=rank)
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
            waves, lengths, copies = augmenters.wave(waves, lengths)  # (copies * b, s')
            if copies > 1:  # the clean batch appended: the same targets again
                tokens, token_lengths = tokens.repeat(copies, 1), token_lengths.repeat(copies)
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
        tokenizer = load_saved_tokenizer(root)
        if tokenizer.kind != fc.tokenizer:
            raise StageError(
                f"{saved} holds a {tokenizer.kind!r} tokenizer but finetune.tokenizer is {fc.tokenizer!r}; "
                "choose another output_dir"
            )
        return tokenizer
    if fc.tokenizer == "char":
        return CharTokenizer()
    # Deterministic (one sentencepiece thread): every rank trains the same model in memory.
    return BPETokenizer.train([u.text for u in utterances], None, fc.vocab_size)


def load_saved_tokenizer(folder: Path):
    """The tokenizer saved in ``folder/tokenizer`` (a run's or a checkpoint's); a missing or broken one
    is a :class:`StageError`."""
    try:
        return load_tokenizer(folder / TOKENIZER_DIR)
    except (FileNotFoundError, ValueError) as exc:
        raise StageError(f"{folder}: its fine-tuning tokenizer cannot be read: {exc}") from None


def resolve_init(config: RunConfig) -> Path | None:
    """The pre-training checkpoint ``finetune.init`` names (``None`` for random init).

    Raises:
        StageError: ``pretrain`` with no complete pre-training checkpoint in this run, or a path
            without a checkpoint.
    """
    init = config.finetune.init
    if init == "random":
        return None
    if init == "pretrain":
        folder = Path(config.output_dir) / "pretrain" / "checkpoints"
        found = latest_checkpoint(folder)
        if found is None:
            raise StageError(
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
    raise StageError(f"finetune.init={init!r}: no pre-training checkpoint there (a step-N folder or a run folder)")


def make_optimizer(model: CTCModel, config: FinetuneConfig) -> torch.optim.AdamW:
    """AdamW with two groups: ``head`` at ``head_lr`` and everything else (``encoder``) at
    ``encoder_lr``, both with ``weight_decay``."""
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



# ---------------------------------------------------------------------------------------------
# The objective


def steps_per_epochs(sampler, epochs: int, accum_steps: int) -> int:
    """Optimiser steps for ``epochs`` passes: this rank's batches of epochs 0..epochs-1 (the same
    count on every rank) in groups of ``accum_steps``, rounded up."""
    batches = sum(len(sampler.batches(e)) for e in range(epochs))
    return max(1, math.ceil(batches / accum_steps))


class FinetuneObjective(Objective):
    """CTC on the training subsets with greedy dev validation: the part of :func:`run_stage`
    that is fine-tuning's."""

    stage = STAGE

    def __init__(self, config: RunConfig) -> None:
        super().__init__(config, config.finetune)
        self.fc = config.finetune  # the same as self.settings, typed
        self.utterances: list = []
        self.tokenizer = None
        self.model_cfg = None
        self.data: Loader | None = None
        self.dev: dict[str, Any] = {}
        self.augmenters: _Augmenters | None = None
        self.init_info: dict[str, Any] | None = None
        self.dev_metrics: dict[str, float] = {}
        self.best_record: dict[str, Any] | None = None
        self.frozen = False
        self.started = False
        self.eval_epoch = 0

    def known_steps(self) -> int | None:
        return self.fc.steps  # None when the budget is in epochs

    def prepare(self, resume: Path | None) -> Loader:
        config, fc, runtime = self.config, self.fc, self.runtime
        ensure_corpus(config.data)
        self.utterances = load_utterances(config.data, config.data.train_subsets)
        self.tokenizer = (
            load_saved_tokenizer(resume) if resume is not None
            else build_tokenizer(config, self.utterances, self.root)
        )
        self.model_cfg = dataclasses.replace(
            config.model, ctc=dataclasses.replace(config.model.ctc, vocab_size=self.tokenizer.vocab_size)
        )
        self.data = make_loader(
            self.utterances, config.data, max_batch_seconds=fc.max_batch_seconds, seed=fc.seed, shuffle=True,
            tokenizer=self.tokenizer, rank=runtime.rank, world_size=runtime.world_size,
        )
        return self.data

    def total_steps(self, data: Loader) -> int:
        if self.fc.epochs is None:
            return self.fc.steps
        steps = steps_per_epochs(data.sampler, self.fc.epochs, self.fc.accum_steps)
        log.info("finetune.epochs=%d: %d optimiser steps", self.fc.epochs, steps)
        return steps

    def model_config(self) -> dict[str, Any]:
        return config_to_dict(self.model_cfg)

    def build(self, steps: int):
        fc, runtime = self.fc, self.runtime
        model = CTCModel(self.model_cfg).to(runtime.device)
        self.augmenters = _Augmenters(fc, model.features.sample_rate, runtime.rank)
        self.loss = make_compute_loss(self.augmenters)
        optimizer = make_optimizer(model, fc)
        newbob = NewBob(
            factors={"head": fc.newbob_head_factor, "encoder": fc.newbob_encoder_factor},
            threshold=fc.newbob_threshold, patience=fc.newbob_patience,
        )
        scheduler = make_scheduler(optimizer, fc.schedule, fc.warmup_steps, steps, newbob=newbob)
        self.dev = eval_loaders(self.config, self.config.data.dev_subsets, self.tokenizer, runtime,
                                self.config.eval.max_batch_seconds)
        return model, optimizer, scheduler

    def initialise(self) -> None:
        self.init_info = load_initial_weights(self.model, self.config, self.utterances, self.runtime)

    def restore(self, state: dict[str, Any], mine: dict[str, Any] | None) -> None:
        meta = state.get("meta", {})
        self.init_info = meta.get("init")
        self.dev_metrics = meta.get("dev") or {}
        self.best_record = meta.get("best")
        if mine is not None:
            self.augmenters.load_state_dict(mine["augment"])

    def save_files(self, folder: Path) -> None:
        self.tokenizer.save(folder / TOKENIZER_DIR)

    def before_step(self, step: int) -> bool:
        if not self.started:  # the first call: set the state this step (0, or a resumed one) implies
            self.started = True
            self.eval_epoch = self.data.sampler.epoch
            self.frozen = step < self.fc.freeze_encoder_steps
            _set_encoder_trainable(self.model, not self.frozen)
            return False
        if self.frozen and step >= self.fc.freeze_encoder_steps:
            # Unfreezing needs a new DDP wrapper (its construction broadcasts rank 0's, identical, weights).
            self.frozen = False
            _set_encoder_trainable(self.model, True)
            log.info("step %d: encoder unfrozen", step)
            return True
        return False

    def compute_loss(self, model: nn.Module, batch: dict, runtime: Runtime) -> tuple[torch.Tensor, Counters]:
        return self.loss(model, batch, runtime)

    def summary(self, counters: Counters, elapsed: float, *, step: int, epoch: float) -> dict[str, Any]:
        means = counters.means()
        groups, lrs = self.optimizer.param_groups, self.scheduler.get_last_lr()
        named = {g.get("name", str(i)): lr for i, (g, lr) in enumerate(zip(groups, lrs))}
        return {
            "stage": STAGE,
            "step": step,
            f"{STAGE}/loss": means["loss"],
            f"{STAGE}/grad_norm": means["grad_norm"],
            f"{STAGE}/skipped_steps": means["skipped_steps"],
            f"{STAGE}/audio_seconds_per_second": means["audio_seconds"] / max(elapsed, 1e-9),
            f"{STAGE}/lr_head": named.get("head", math.nan),
            f"{STAGE}/lr_encoder": named.get("encoder", math.nan),
            f"{STAGE}/encoder_frozen": float(self.frozen),
            f"{STAGE}/epoch": epoch,
        }

    def evaluate_now(self, step: int, steps: int) -> bool:
        if self.fc.eval_every == "epoch":  # the step that finished an epoch
            changed, self.eval_epoch = self.data.sampler.epoch != self.eval_epoch, self.data.sampler.epoch
            return changed or step >= steps
        return step % self.fc.eval_every == 0 or step >= steps

    def validate(self, step: int, metrics: dict[str, Any]) -> bool:
        """Greedy dev scores; NewBob sees the dev loss; a new best dev WER asks for a checkpoint."""
        self.dev_metrics = validate(self.model, self.dev, self.tokenizer, self.runtime)
        metrics.update(self.dev_metrics)
        if isinstance(self.scheduler, NewBobScheduler) and self.scheduler.observe(self.dev_metrics["dev/loss"]):
            log.info("step %d: NewBob annealed the learning rates (dev loss %.4f)", step, self.dev_metrics["dev/loss"])
        wer = self.dev_metrics["dev/wer"]
        improved = math.isfinite(wer) and (self.best_record is None or wer < self.best_record["dev_wer"])
        if improved:
            self.best_record = {"step": step, "dev_wer": wer}
        metrics["dev/best_wer"] = self.best_record["dev_wer"] if self.best_record else math.nan
        return improved

    def meta(self) -> dict[str, Any]:
        return {"dev": self.dev_metrics, "init": self.init_info, "tokenizer": self.tokenizer.kind,
                "best": self.best_record}

    def rank_state(self) -> dict[str, Any]:
        return {"augment": self.augmenters.state_dict()}

    def best(self) -> dict[str, Any] | None:
        return self.best_record

    def result(self, meta: dict[str, Any]) -> dict[str, Any]:
        return {"init": meta.get("init"), "best": meta.get("best")}


def finetune(config: RunConfig, **options: Any) -> dict[str, Any]:
    """Run (or resume, or skip when complete) CTC fine-tuning with greedy dev evaluation:
    :func:`run_stage` of a :class:`FinetuneObjective`; ``options`` are its ``report``,
    ``stop_after`` and ``resume_from``.

    Returns:
        ``{"step", "complete", "checkpoint", "metrics", "init", "best"}``; ``metrics`` are the
        last reported ones (with the last ``dev/wer``), ``init`` the pre-trained checkpoint and
        its loaded/skipped/missing key counts (``None`` for random init), ``best`` the step and
        dev WER of the best checkpoint (the one ``checkpoints/best.json`` names).
    """
    return run_stage(FinetuneObjective(config), **options)


def load_initial_weights(model: CTCModel, config: RunConfig, utterances, runtime: Runtime) -> dict[str, Any] | None:
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
        raise StageError(f"finetune.init: {source} is a {state.get('stage')!r} checkpoint, not a pre-training one")
    if not state.get("meta", {}).get("complete", True):
        log.warning("fine-tuning from %s, an incomplete pre-training run (step %d)", source, state["step"])
    result = model.load_pretrained(state["model"])
    if not model.normalizer.is_fitted:
        raise StageError(f"{source}: the pre-trained model has no normaliser statistics")
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

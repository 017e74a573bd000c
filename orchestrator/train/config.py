"""Typed, strict configuration of one run: data, pre-training, fine-tuning, evaluation.

Every section is a frozen keyword-only dataclass with a docstring per field and ``validate()``.
YAML is loaded strictly: an unknown key, a value of the wrong type or a value outside the
allowed set fails before anything runs, with one line that names the file, the dotted key and
what is allowed::

    error: runs/a.yaml: pretrain.precison: unknown key; allowed keys: accum_steps, betas, ...

A run file has the sections ``model`` (read by :func:`models.config.model_from_section`: a model
preset, a layer plan and section overrides), ``data``, ``pretrain``, ``finetune``, ``eval`` and
the scalars ``output_dir``/``device``; any of them may be left out. ``preset: cpu`` at the top
picks the run preset (:mod:`orchestrator.train.presets`) the file's keys are merged onto. The
loading rules (types, coercion, merging, errors) are :mod:`models.typed_config`'s.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from models.config import ModelConfig, make_config, model_from_section
from models.typed_config import ConfigError, coerce, fail, section_from_dict
from orchestrator.data.augment import AugmentConfig
from orchestrator.train.presets import run_preset_dict
from orchestrator.yamlio import apply_sets, blame_set, read_yaml_mapping

Precision = Literal["auto", "fp32", "bf16", "fp16"]
PRECISIONS = typing.get_args(Precision)
DEFAULT_SYNTH_ROOT = "data/synth"


# --------------------------------------------------------------------------------------------
# Sections


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Which corpus, which subsets, and how utterances are filtered."""

    root: str = DEFAULT_SYNTH_ROOT
    """Corpus root in LibriSpeech layout: a local folder or ``s3://bucket/prefix``."""

    generate: bool = True
    """Generate the synthetic corpus at ``root`` when ``root`` is a local folder that does not
    exist yet (``python -m orchestrator.data.synth``); off for real corpora."""

    synth_seed: int = 0
    """Seed of the generated corpus (only used when it is generated)."""

    synth_sizes: dict[str, int] = field(default_factory=dict)
    """Utterances per generated subset, e.g. ``{train-clean-100: 2000, dev-clean: 200}``
    (subsets left out get none); empty = the generator's defaults."""

    train_subsets: tuple[str, ...] = ("train-clean-100",)
    """Subsets for fine-tuning (and for pre-training unless ``pretrain_subsets`` is set)."""

    pretrain_subsets: tuple[str, ...] | None = None
    """Subsets for pre-training; ``None`` = ``train_subsets``."""

    dev_subsets: tuple[str, ...] = ("dev-clean",)
    """Subsets for validation during fine-tuning (greedy WER, reported per subset)."""

    test_subsets: tuple[str, ...] = ("test-clean", "test-other")
    """Subsets for the final evaluation (beam search, reported per subset)."""

    min_duration: float = 0.0
    """Shortest training utterance kept, in seconds (the paper: 2.0)."""

    max_duration: float = 60.0
    """Longest training utterance kept, in seconds (the paper: 60.0)."""

    cache_dir: str | None = None
    """Manifest and S3 download cache; ``None`` = ``$POM_ABLATIONS_CACHE`` or ``~/.cache``."""

    stats_utterances: int = 200
    """Training utterances sampled to estimate the feature normaliser's mean and variance."""

    num_workers: int = 0
    """DataLoader worker processes per rank (0 = load in the training process)."""

    def validate(self) -> None:
        _check(bool(self.root), "data.root", "must not be empty")
        _check("://" not in self.root or (self.root.startswith("s3://") and len(self.root) > 5), "data.root",
               f"{self.root!r} is neither a folder nor s3://bucket/prefix")
        for name in ("train_subsets", "dev_subsets", "test_subsets"):
            _check(len(getattr(self, name)) > 0, f"data.{name}", "must name at least one subset")
        _check(self.pretrain_subsets is None or len(self.pretrain_subsets) > 0, "data.pretrain_subsets",
               "must name at least one subset (or be null)")
        _check(0 <= self.min_duration < self.max_duration, "data.min_duration",
               f"need 0 <= min_duration < max_duration, got {self.min_duration} and {self.max_duration}")
        _check(self.stats_utterances >= 1, "data.stats_utterances", f"must be >= 1, got {self.stats_utterances}")
        _check(self.num_workers >= 0, "data.num_workers", f"must be >= 0, got {self.num_workers}")
        for subset, n in self.synth_sizes.items():
            _check(isinstance(n, int) and n >= 1, f"data.synth_sizes.{subset}", f"must be a positive integer, got {n!r}")

    @property
    def pretrain_subset_list(self) -> tuple[str, ...]:
        return self.pretrain_subsets if self.pretrain_subsets is not None else self.train_subsets


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """Fields shared by both training stages (optimiser, schedule, precision, bookkeeping)."""

    steps: int = 1000
    """Optimiser steps (the step budget). A run that has reached it is complete."""

    warmup_steps: int = 100
    """Linear warm-up to the peak learning rate over this many steps."""

    schedule: Literal["noam", "linear", "constant"] = "noam"
    """After the warm-up: ``noam`` (``step ** -0.5`` decay, the paper's), ``linear`` (to 0 at
    ``steps``) or ``constant``."""

    betas: tuple[float, float] = (0.9, 0.98)
    """AdamW betas."""

    eps: float = 1e-9
    """AdamW epsilon."""

    weight_decay: float = 0.1
    """AdamW (decoupled) weight decay."""

    clip_norm: float = 10.0
    """Gradient clipping by global L2 norm; 0 disables it."""

    accum_steps: int = 1
    """Micro-batches accumulated into one optimiser step."""

    max_batch_seconds: float = 60.0
    """Audio seconds per micro-batch per rank (dynamic batching)."""

    precision: Precision = "auto"
    """``auto`` (bf16 autocast on CUDA if supported else fp16 with a GradScaler; on a CPU bf16
    where the CPU computes it natively (AMX / AVX512-BF16), else fp32),
    ``fp32``, ``bf16`` (autocast, CPU or CUDA) or ``fp16`` (autocast + GradScaler, CUDA only)."""

    log_every: int = 10
    """Report training metrics every this many steps."""

    checkpoint_every: int = 200
    """Write a checkpoint every this many steps (and always at the end)."""

    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep (0 keeps all)."""

    seed: int = 0
    """Seed of model initialisation, masking, dropout and batch order."""

    deterministic: bool = False
    """``torch.use_deterministic_algorithms(True)``: bit-exact resume at some speed cost."""

    def validate(self, section: str) -> None:
        for name in ("steps", "accum_steps", "log_every", "checkpoint_every"):
            value = getattr(self, name)  # fine-tuning's steps may be null (a budget in epochs)
            _check(value is None or value >= 1, f"{section}.{name}", f"must be >= 1, got {value}")
        _check(self.keep_checkpoints >= 0, f"{section}.keep_checkpoints", f"must be >= 0 (0 = all), got {self.keep_checkpoints}")
        _check(self.warmup_steps >= 0, f"{section}.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _check(all(0.0 <= b < 1.0 for b in self.betas), f"{section}.betas", f"must lie in [0, 1), got {self.betas}")
        _check(self.eps > 0, f"{section}.eps", f"must be > 0, got {self.eps}")
        _check(self.weight_decay >= 0, f"{section}.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(self.clip_norm >= 0, f"{section}.clip_norm", f"must be >= 0 (0 = off), got {self.clip_norm}")
        _check(self.max_batch_seconds > 0, f"{section}.max_batch_seconds", f"must be > 0, got {self.max_batch_seconds}")


@dataclass(frozen=True, kw_only=True)
class PretrainConfig(OptimConfig):
    """BEST-RQ pre-training. Defaults are the paper's optimiser (AdamW 1e-3, (0.9, 0.98), 1e-9, 0.1)."""

    lr: float = 1e-3
    """Peak learning rate."""

    def validate(self, section: str = "pretrain") -> None:
        super().validate(section)
        _check(self.lr > 0, f"{section}.lr", f"must be > 0, got {self.lr}")


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig(OptimConfig):
    """CTC fine-tuning: two AdamW groups (CTC head, pre-trained encoder), the paper's rates."""

    steps: int | None = 1000
    """Optimiser steps (the step budget); null when the budget is ``epochs``."""

    epochs: int | None = None
    """Passes over ``data.train_subsets`` instead of ``steps`` (resolved to steps from the batch
    sampler; exactly one of the two is set, the other null; the paper: 30)."""

    schedule: Literal["noam", "linear", "constant", "newbob"] = "noam"
    """After the warm-up: ``noam``, ``linear``, ``constant`` (see pre-training) or ``newbob``
    (annealed on the dev loss at each evaluation; the paper's)."""

    newbob_head_factor: float = 0.5
    """NewBob: the CTC head's learning rate is multiplied by this at each annealing (the paper: 0.5)."""

    newbob_encoder_factor: float = 0.7
    """NewBob: the encoder's learning rate is multiplied by this at each annealing (the paper: 0.7)."""

    newbob_threshold: float = 0.0025
    """NewBob: a dev-loss improvement relative to the previous evaluation below this anneals."""

    newbob_patience: int = 0
    """NewBob: evaluations below the threshold tolerated before annealing (the paper: 0)."""

    init: str = "pretrain"
    """Where the encoder comes from: ``pretrain`` (the latest checkpoint of this run's
    ``pretrain`` stage), ``random``, or a path to a pre-training checkpoint or run folder."""

    head_lr: float = 3e-4
    """Peak learning rate of the CTC head."""

    encoder_lr: float = 5e-5
    """Peak learning rate of the front-end and encoder."""

    weight_decay: float = 0.01
    """AdamW (decoupled) weight decay, both groups (the paper: 1e-3)."""

    freeze_encoder_steps: int = 0
    """Steps at the start during which only the CTC head trains (the encoder gets no gradient)."""

    tokenizer: Literal["char", "bpe"] = "char"
    """``char``: the paper's 29 symbols; ``bpe``: sentencepiece trained on the training text."""

    vocab_size: int = 256
    """Sentencepiece vocabulary size, blank and unk included (``bpe`` only)."""

    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """Training augmentation: speed perturbation, DropFreq, DropChunk (waves), clean concat,
    SpecAugment (features)."""

    eval_every: int | Literal["epoch"] = 200
    """Greedy dev WER and loss every this many steps, or ``epoch`` (after each pass over the
    training data), and at the end. The best dev WER's checkpoint is the one tested."""

    def validate(self, section: str = "finetune") -> None:
        super().validate(section)
        _check(self.head_lr > 0, f"{section}.head_lr", f"must be > 0, got {self.head_lr}")
        _check(self.encoder_lr >= 0, f"{section}.encoder_lr", f"must be >= 0, got {self.encoder_lr}")
        _check(self.freeze_encoder_steps >= 0, f"{section}.freeze_encoder_steps",
               f"must be >= 0, got {self.freeze_encoder_steps}")
        _check(self.vocab_size >= 3, f"{section}.vocab_size", f"must be >= 3, got {self.vocab_size}")
        _check(self.eval_every == "epoch" or self.eval_every >= 1, f"{section}.eval_every",
               f"must be >= 1 or 'epoch', got {self.eval_every}")
        _check((self.steps is None) != (self.epochs is None), f"{section}.epochs",
               f"set exactly one of {section}.steps and {section}.epochs, the other null "
               f"(got steps={self.steps}, epochs={self.epochs}; e.g. --set {section}.epochs=30 --set {section}.steps=null)")
        _check(self.epochs is None or self.epochs >= 1, f"{section}.epochs", f"must be >= 1, got {self.epochs}")
        for name in ("newbob_head_factor", "newbob_encoder_factor"):
            _check(0 < getattr(self, name) <= 1, f"{section}.{name}", f"must be in (0, 1], got {getattr(self, name)}")
        _check(self.newbob_threshold >= 0, f"{section}.newbob_threshold", f"must be >= 0, got {self.newbob_threshold}")
        _check(self.newbob_patience >= 0, f"{section}.newbob_patience", f"must be >= 0, got {self.newbob_patience}")
        _check(bool(self.init), f"{section}.init", "must be 'pretrain', 'random' or a checkpoint path")
        _validate_part(self.augment, f"{section}.augment")


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Test-set evaluation: CTC beam search (optionally with an n-gram LM) and confidence intervals."""

    decoder: Literal["beam", "greedy"] = "beam"
    """``beam``: torchaudio's flashlight CTC beam search; ``greedy``: best path."""

    beam_size: int = 50
    """Hypotheses kept per frame."""

    beam_threshold: float = 50.0
    """Prune hypotheses scoring this far below the best (SpeechBrain's ``beam_prune_logp`` with
    the sign flipped: the paper's -10 is 10 here)."""

    beam_size_token: int | None = None
    """Tokens tried per frame, the most likely first; ``None`` = all."""

    token_prune_min_logp: float | None = None
    """Tokens below this frame log-probability are not tried (the frame's best always is), as
    SpeechBrain's ``token_prune_min_logp`` (the paper: -5); ``None`` = no pruning."""

    lm_path: str | None = None
    """KenLM n-gram file (ARPA or binary), e.g. LibriSpeech's 4-gram at paper scale. Without a
    lexicon the LM is over the tokenizer's tokens (``|`` separates words); with a lexicon it is
    a word LM. With an LM the test subsets are decoded twice, without and with it."""

    lm_from_train: bool = False
    """Estimate a word n-gram LM (interpolated Witten-Bell, ``orchestrator.data.ngram``) from the
    TRAINING transcripts only, written to ``<output_dir>/eval/lm.arpa``; needs a lexicon."""

    lm_order: int = 3
    """n of the n-gram built by ``lm_from_train``."""

    lexicon_path: str | None = None
    """Lexicon file (``word  t o k e n s |`` per line) for lexicon-constrained decoding; ``None``
    = lexicon-free."""

    lexicon_from_train: bool = False
    """Build the lexicon from the words of the training transcripts (written to
    ``<output_dir>/eval/lexicon.txt``): decoding then only produces words seen in training."""

    lexicon_from_lm: bool = False
    """With an LM and no other lexicon, spell the LM's words (an ARPA file's unigrams) into
    ``<output_dir>/eval/lexicon.txt``: what a word LM such as LibriSpeech's 4-gram needs, as
    flashlight decodes a word LM over a lexicon. Ignored without an LM."""

    lexicon_without_lm: bool = True
    """Constrain the decoding without LM to the lexicon too; off: that decoding is lexicon-free
    (the paper's no-LM columns) while the LM decoding keeps the lexicon."""

    lm_weight: float = 2.0
    """Weight of the LM score (the LM decoding only); see ``lm_score_base``."""

    lm_score_base: Literal["log10", "ln"] = "log10"
    """``log10``: ``lm_weight`` multiplies KenLM's log10 scores (flashlight's convention);
    ``ln``: it multiplies natural-log LM probabilities (SpeechBrain's alpha: the paper's 0.8)."""

    word_score: float = 0.0
    """Score added at each word boundary in the LM decoding (the paper's beta 1.2)."""

    bootstrap_samples: int = 1000
    """Resamples of the test utterances for the 95% WER confidence interval (0 = none)."""

    max_batch_seconds: float = 120.0
    """Audio seconds per evaluation batch."""

    seed: int = 0
    """Seed of the bootstrap."""

    def validate(self) -> None:
        _check(self.beam_size >= 1, "eval.beam_size", f"must be >= 1, got {self.beam_size}")
        _check(self.beam_threshold > 0, "eval.beam_threshold", f"must be > 0, got {self.beam_threshold}")
        _check(self.bootstrap_samples >= 0, "eval.bootstrap_samples", f"must be >= 0, got {self.bootstrap_samples}")
        _check(self.max_batch_seconds > 0, "eval.max_batch_seconds", f"must be > 0, got {self.max_batch_seconds}")
        _check(self.lexicon_path is None or self.decoder == "beam", "eval.lexicon_path", "needs decoder: beam")
        _check(not self.lexicon_from_train or self.decoder == "beam", "eval.lexicon_from_train", "needs decoder: beam")
        _check(not (self.lexicon_from_train and self.lexicon_path), "eval.lexicon_from_train",
               "give either lexicon_path or lexicon_from_train, not both")
        _check(self.lm_path is None or self.decoder == "beam", "eval.lm_path", "needs decoder: beam")
        _check(not (self.lm_from_train and self.lm_path), "eval.lm_from_train",
               "give either lm_path or lm_from_train, not both")
        _check(not self.lm_from_train or self.lexicon_from_train or self.lexicon_from_lm or self.lexicon_path is not None,
               "eval.lm_from_train", "builds a word LM: set lexicon_from_train: true (or lexicon_path)")
        _check(not (self.lexicon_from_lm and (self.lexicon_from_train or self.lexicon_path)), "eval.lexicon_from_lm",
               "give one lexicon source: lexicon_path, lexicon_from_train or lexicon_from_lm")
        _check(self.lm_order >= 2, "eval.lm_order", f"must be >= 2 (KenLM reads bigram models and up), got {self.lm_order}")
        _check(self.beam_size_token is None or self.beam_size_token >= 1, "eval.beam_size_token",
               f"must be >= 1 or null, got {self.beam_size_token}")
        _check(self.token_prune_min_logp is None or self.token_prune_min_logp < 0, "eval.token_prune_min_logp",
               f"must be < 0 or null, got {self.token_prune_min_logp}")


def _default_model_config() -> ModelConfig:
    return make_config("tiny")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """One run: a model, its data, the two training stages and the evaluation."""

    model: ModelConfig = field(default_factory=_default_model_config)
    """The encoder (``models.config.ModelConfig``; the ``model:`` section uses its loader)."""

    data: DataConfig = field(default_factory=DataConfig)
    """Corpus and subsets."""

    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    """BEST-RQ pre-training."""

    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    """CTC fine-tuning."""

    eval: EvalConfig = field(default_factory=EvalConfig)
    """Test evaluation."""

    output_dir: str = "runs/default"
    """Run folder: ``pretrain/``, ``finetune/``, ``eval/`` below it. Rerunning into the same
    folder resumes."""

    device: str = "auto"
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""

    def validate(self) -> None:
        _validate_part(self.model, "model")
        self.data.validate()
        self.pretrain.validate()
        self.finetune.validate()
        self.eval.validate()
        _check(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"), "device",
               f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")

    def to_dict(self) -> dict[str, Any]:
        """A plain dict that :func:`run_config_from_dict` reads back into an equal config."""
        from models.config import config_to_dict

        out = {f.name: _to_plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "model"}
        return {"model": config_to_dict(self.model), **out}


# --------------------------------------------------------------------------------------------
# Loading: the one strict loader (models.typed_config) over the run presets (train.presets)


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _validate_part(part: ModelConfig | AugmentConfig, key: str) -> None:
    """``part.validate()``; a plain ``ValueError`` it raises becomes a :class:`ConfigError` under ``key``."""
    try:
        part.validate()
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from None


_SECTIONS = {"data": DataConfig, "pretrain": PretrainConfig, "finetune": FinetuneConfig, "eval": EvalConfig}
_SCALARS = {"output_dir": str, "device": str}
TOP_KEYS = ("preset", "model", *_SECTIONS, *_SCALARS)
"""The keys of a run file (and the run part of a sweep spec)."""


def run_config_from_dict(data: Mapping[str, Any] | None, *, source: str | None = None) -> RunConfig:
    """Build and validate a :class:`RunConfig` from a plain dict (a parsed YAML file).

    Args:
        data: the file's content. ``preset`` (a run preset, ``orchestrator.train.presets.RUN_PRESETS``) gives the
            sections the other keys are merged onto (deeply, the ``model:`` section too).
        source: the file name (or ``--set ...``), named in errors.

    Raises:
        ConfigError: unknown keys, bad values or an invalid combination, as one line.
    """
    if data is not None and not isinstance(data, Mapping):
        raise fail(source, "", f"expected a mapping of sections at the top, got {type(data).__name__}")
    data = dict(data or {})
    for key in data:
        if key not in TOP_KEYS:
            raise fail(source, str(key), f"unknown key; allowed keys: {', '.join(sorted(TOP_KEYS))}")
    merged = run_preset_dict(data, source)
    kwargs: dict[str, Any] = {"model": model_from_section(merged.get("model"), source=source, path="model")}
    for name, cls in _SECTIONS.items():
        if name in merged:
            kwargs[name] = section_from_dict(cls, merged[name], source=source, path=name)
    for name, tp in _SCALARS.items():
        if name in merged:
            kwargs[name] = coerce(merged[name], tp, name, source)
    config = RunConfig(**kwargs)
    try:
        config.validate()
    except ValueError as exc:
        raise fail(source, "", str(exc)) from None
    return config


def load_run_config(path: str | Path | None, overrides: Sequence[str] | None = None, *, output_dir: str | None = None) -> RunConfig:
    """Read a run YAML file strictly, apply ``--set`` overrides and ``--out``, validate.

    Args:
        path: the YAML file; ``None`` = the ``default`` run preset.
        overrides: ``key.path=value`` strings; the value is YAML.
        output_dir: replaces ``output_dir`` when given.

    Raises:
        ConfigError: a missing, unreadable or binary file, bad YAML, unknown keys or bad values.
    """
    data = read_yaml_mapping(path, what="config file") if path is not None else {}
    data = apply_sets(data, overrides or [])
    if output_dir is not None:
        data["output_dir"] = str(output_dir)
    source = str(path) if path is not None else "<defaults>"
    try:
        return run_config_from_dict(data, source=source)
    except ConfigError as err:
        raise blame_set(err, source, overrides or []) from None


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): _to_plain(v) for k, v in obj.items()}
    return obj

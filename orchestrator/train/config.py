"""Typed, strict configuration of one run: data, pre-training, fine-tuning, evaluation.

Every section is a frozen keyword-only dataclass with a docstring per field and ``validate()``.
YAML is loaded strictly: an unknown key, a value of the wrong type or a value outside the
allowed set fails before anything runs, with one line that names the file, the dotted key and
what is allowed::

    error: runs/a.yaml: pretrain.precison: unknown key; allowed keys: accum_steps, betas, ...

A run file has the sections ``model`` (``models.config.ModelConfig``, loaded by its own strict
loader), ``data``, ``pretrain``, ``finetune``, ``eval`` and the scalar ``output_dir``/``device``;
any of them may be left out (defaults). ``preset: tiny`` at the top picks the starting point the
file then overrides (see :data:`PRESETS`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from models.config import ModelConfig, make_config
from orchestrator.yamlio import load_yaml
from orchestrator.data.augment import AugmentConfig

Precision = Literal["auto", "fp32", "bf16", "fp16"]
PRECISIONS = typing.get_args(Precision)
DEFAULT_SYNTH_ROOT = "data/synth"


class ConfigError(ValueError):
    """A configuration value or file is wrong. The message is one line: where, what, what is allowed."""


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
    """``auto`` (bf16 autocast on CUDA if supported else fp16 with a GradScaler; fp32 on CPU),
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
            _check(getattr(self, name) >= 1, f"{section}.{name}", f"must be >= 1, got {getattr(self, name)}")
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

    init: str = "pretrain"
    """Where the encoder comes from: ``pretrain`` (the latest checkpoint of this run's
    ``pretrain`` stage), ``random``, or a path to a pre-training checkpoint or run folder."""

    head_lr: float = 3e-4
    """Peak learning rate of the CTC head."""

    encoder_lr: float = 5e-5
    """Peak learning rate of the front-end and encoder."""

    weight_decay: float = 0.01
    """AdamW (decoupled) weight decay."""

    freeze_encoder_steps: int = 0
    """Steps at the start during which only the CTC head trains (the encoder gets no gradient)."""

    tokenizer: Literal["char", "bpe"] = "char"
    """``char``: the paper's 29 symbols; ``bpe``: sentencepiece trained on the training text."""

    vocab_size: int = 256
    """Sentencepiece vocabulary size, blank and unk included (``bpe`` only)."""

    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """SpecAugment and speed perturbation (training only)."""

    eval_every: int = 200
    """Greedy dev WER every this many steps (and at the end)."""

    def validate(self, section: str = "finetune") -> None:
        super().validate(section)
        _check(self.head_lr > 0, f"{section}.head_lr", f"must be > 0, got {self.head_lr}")
        _check(self.encoder_lr >= 0, f"{section}.encoder_lr", f"must be >= 0, got {self.encoder_lr}")
        _check(self.freeze_encoder_steps >= 0, f"{section}.freeze_encoder_steps",
               f"must be >= 0, got {self.freeze_encoder_steps}")
        _check(self.vocab_size >= 3, f"{section}.vocab_size", f"must be >= 3, got {self.vocab_size}")
        _check(self.eval_every >= 1, f"{section}.eval_every", f"must be >= 1, got {self.eval_every}")
        _check(bool(self.init), f"{section}.init", "must be 'pretrain', 'random' or a checkpoint path")
        if hasattr(self.augment, "validate"):
            try:
                self.augment.validate()
            except ConfigError:
                raise
            except ValueError as exc:
                raise ConfigError(f"{section}.augment: {exc}") from None


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Test-set evaluation: CTC beam search (optionally with an n-gram LM) and confidence intervals."""

    decoder: Literal["beam", "greedy"] = "beam"
    """``beam``: torchaudio's flashlight CTC beam search; ``greedy``: best path."""

    beam_size: int = 50
    """Hypotheses kept per frame."""

    beam_threshold: float = 50.0
    """Prune hypotheses scoring this far below the best."""

    lm_path: str | None = None
    """KenLM n-gram file (ARPA or binary). Without a lexicon the LM is over the tokenizer's
    tokens (``|`` separates words); with ``lexicon_path`` it is a word LM."""

    lexicon_path: str | None = None
    """Lexicon file (``word  t o k e n s |`` per line) for lexicon-constrained decoding; ``None``
    = lexicon-free."""

    lexicon_from_train: bool = False
    """Build the lexicon from the words of the training transcripts (written to
    ``<output_dir>/eval/lexicon.txt``): decoding then only produces words seen in training."""

    lm_weight: float = 2.0
    """Weight of the LM score."""

    word_score: float = 0.0
    """Score added at each word boundary."""

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
        if hasattr(self.model, "validate"):
            try:
                self.model.validate()
            except ConfigError:
                raise
            except ValueError as exc:
                raise ConfigError(f"model: {exc}") from None
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
# Presets


def _tiny_run() -> dict[str, Any]:
    """The tiny CPU learning setting (see benchmarks/learning.py for what it reaches).

    The ``tiny`` encoder (4 x d128 relative-position MHA) with two changes that make a step about
    40 % cheaper on a CPU and that short runs do not miss: no front-end dropout and front-end
    channels (32, 16) instead of (64, 16) (dropout on the large front-end activations was a
    quarter of the step time). No encoder dropout and no augmentation: a few epochs of a few
    hours of audio underfit, they do not overfit. Fine-tuning learning rates are higher than the
    paper's (3e-3 head, 1e-3 encoder, against 3e-4 and 5e-5 for 200k-step runs at 95M).
    """
    return {
        "model": {
            "preset": "tiny",
            "frontend": {"dropout_p": 0.0, "conv_channels": [32, 16]},
            "encoder": {"dropout_p": 0.0},
        },
        "data": {"stats_utterances": 100},
        "pretrain": {
            "steps": 600, "lr": 2e-3, "warmup_steps": 100, "max_batch_seconds": 60.0,
            "log_every": 20, "checkpoint_every": 200,
        },
        "finetune": {
            "steps": 800, "head_lr": 3e-3, "encoder_lr": 1e-3, "warmup_steps": 50, "max_batch_seconds": 30.0,
            "log_every": 20, "checkpoint_every": 400, "eval_every": 400,
            "augment": {"speed_factors": [1.0], "num_freq_masks": 0, "num_time_masks": 0},
        },
        # Greedy character output of a model this small misspells most words; a lexicon of the
        # training words (several hundred) turns that into whole words (dev WER 0.71 -> 0.28).
        "eval": {"beam_size": 32, "lexicon_from_train": True, "bootstrap_samples": 200},
        "output_dir": "runs/tiny",
    }


def _demo_run() -> dict[str, Any]:
    """The embedded sweep setting: ``tiny`` models with budgets that fit several trials into
    minutes on a laptop CPU (the shipped search spaces default to it)."""
    run = _tiny_run()
    run["pretrain"].update({"steps": 60, "warmup_steps": 20, "checkpoint_every": 30, "log_every": 10})
    run["finetune"].update({"steps": 100, "warmup_steps": 20, "eval_every": 50, "checkpoint_every": 50, "log_every": 10})
    run["eval"] = {"decoder": "greedy", "bootstrap_samples": 200}
    run["output_dir"] = "runs/demo"
    return run


def _paper_run() -> dict[str, Any]:
    """The paper's base setting (GPU cluster, LibriSpeech; give ``data.root``).

    BEST-RQ on LibriSpeech 960 h for 200k steps (AdamW 1e-3, betas (0.9, 0.98), eps 1e-9, weight
    decay 0.1, Noam warm-up 25k, clip 10, fp16 where the GPU has it), about 5600 s of audio per
    step (here: ``max_batch_seconds`` per worker x workers x ``accum_steps``; 8 workers x 700 s);
    CTC fine-tuning on train-clean-100 (head 3e-4, encoder 5e-5), dev-clean for validation,
    test-clean/test-other with beam search. Utterances of 2 s to 60 s.
    """
    return {
        "model": {"preset": "base"},
        "data": {
            "generate": False,
            "pretrain_subsets": ["train-clean-100", "train-clean-360", "train-other-500"],
            "train_subsets": ["train-clean-100"],
            "dev_subsets": ["dev-clean"],
            "test_subsets": ["test-clean", "test-other"],
            "min_duration": 2.0, "max_duration": 60.0, "stats_utterances": 2000, "num_workers": 4,
        },
        "pretrain": {
            "steps": 200_000, "lr": 1e-3, "warmup_steps": 25_000, "max_batch_seconds": 700.0,
            "clip_norm": 10.0, "precision": "auto", "log_every": 100, "checkpoint_every": 2000,
        },
        "finetune": {
            "steps": 60_000, "head_lr": 3e-4, "encoder_lr": 5e-5, "warmup_steps": 1000,
            "max_batch_seconds": 700.0, "precision": "auto", "log_every": 100, "checkpoint_every": 2000,
            "eval_every": 2000,
        },
        "eval": {"decoder": "beam", "beam_size": 50, "bootstrap_samples": 1000},
        "output_dir": "runs/paper",
    }


PRESETS: dict[str, Any] = {
    "default": lambda: {},
    "tiny": _tiny_run,
    "demo": _demo_run,
    "paper": _paper_run,
}
"""Named starting points for a run file's ``preset:`` key (the file's own keys override them)."""


# --------------------------------------------------------------------------------------------
# Loading


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _where(source: str | None, key: str) -> str:
    return f"{source}: {key}" if source else key


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return getattr(origin, "__name__", str(origin))
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, source: str | None) -> Any:
    """Convert a YAML value to the annotated type ``tp`` or raise a :class:`ConfigError`."""

    def fail(why: str) -> typing.NoReturn:
        raise ConfigError(f"{_where(source, key)}: {why}")

    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            fail("must not be null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as exc:
                errors.append(str(exc))
        fail(f"expected {_type_name(tp)}, got {value!r}")
    if value is None:
        fail(f"must not be null (expected {_type_name(tp)})")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            fail(f"{value!r} is not allowed; allowed values: {', '.join(map(str, allowed))}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return dataclass_from_dict(tp, value, source=source, prefix=key)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            fail(f"expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value))
        if len(value) != len(args):
            fail(f"expected a list of {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        kt, vt = typing.get_args(tp) or (Any, Any)
        if not isinstance(value, Mapping):
            fail(f"expected a mapping, got {value!r}")
        return {_coerce(k, kt, key, source): _coerce(v, vt, f"{key}.{k}", source) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        fail(f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        fail(f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        fail(f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        fail(f"expected a string, got {value!r}")
    return value


def dataclass_from_dict(cls: type, data: Any, *, source: str | None = None, prefix: str = "") -> Any:
    """Build the dataclass ``cls`` from ``data`` strictly (unknown keys and bad values raise).

    Args:
        cls: a dataclass type whose fields carry type annotations.
        data: a mapping (e.g. a YAML section); ``None`` means all defaults.
        source: the file the data came from, named in errors.
        prefix: the dotted key of this section, named in errors.

    Raises:
        ConfigError: an unknown key (the message lists the allowed ones) or a bad value.
    """
    data = {} if data is None else data
    section = prefix or cls.__name__
    if not isinstance(data, Mapping):
        raise ConfigError(f"{_where(source, section)}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            raise ConfigError(f"{_where(source, dotted)}: unknown key; allowed keys: {', '.join(sorted(fields))}")
        kwargs[key] = _coerce(value, hints[key], dotted, source)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{_where(source, '') if source else ''}{exc}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{_where(source, section)}: {exc}") from None


_MODEL_PRESET_KEYS = (
    "preset", "plan", "attention_layers", "model_dim", "num_heads", "lower", "plan_options", "lower_options", "param_budget",
)


def _load_model_config(data: Any, source: str | None):
    """The ``model:`` section: ``models.config.config_from_dict`` (every section spelled out), or,
    with a ``preset`` key, ``models.config.make_config(preset, plan=..., attention_layers=...,
    model_dim=..., num_heads=..., <section>={...})``."""
    from models.config import SECTIONS, config_from_dict, make_config

    data = dict(data or {})
    where = f"{source}: model" if source else "model"
    try:
        if "preset" not in data:
            return config_from_dict(data, source=where)
        allowed = sorted([*_MODEL_PRESET_KEYS, *SECTIONS])
        for key in data:
            if key not in allowed:
                raise ConfigError(f"{where}.{key}: unknown key; allowed keys with a preset: {', '.join(allowed)}")
        kwargs = {k: data[k] for k in _MODEL_PRESET_KEYS if k in data and k != "preset"}
        sections = {k: data[k] for k in SECTIONS if k in data}
        for name, value in sections.items():
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}.{name}: expected a mapping of keys, got {value!r}")
        if isinstance(kwargs.get("plan"), list):
            kwargs["plan"] = tuple(kwargs["plan"])
        return make_config(data["preset"], **kwargs, **sections)
    except ConfigError:
        raise
    except ValueError as exc:
        msg = " ".join(str(exc).split())
        raise ConfigError(msg if msg.startswith(where) else f"{where}: {msg}") from None


def _deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


_SECTIONS = {"data": DataConfig, "pretrain": PretrainConfig, "finetune": FinetuneConfig, "eval": EvalConfig}
_SCALARS = {"output_dir": str, "device": str}
_TOP_KEYS = sorted(["preset", "model", *_SECTIONS, *_SCALARS])


def run_config_from_dict(data: Mapping[str, Any] | None, *, source: str | None = None) -> RunConfig:
    """Build and validate a :class:`RunConfig` from a plain dict (a parsed YAML file).

    Args:
        data: the file's content. ``preset`` (a name in :data:`PRESETS`) gives the defaults the
            other keys override.
        source: the file name, named in errors.

    Raises:
        ConfigError: unknown keys, bad values or an invalid combination.
    """
    data = dict(data or {})
    for key in data:
        if key not in _TOP_KEYS:
            raise ConfigError(f"{_where(source, str(key))}: unknown key; allowed keys: {', '.join(_TOP_KEYS)}")
    preset = data.pop("preset", "default")
    if preset not in PRESETS:
        raise ConfigError(f"{_where(source, 'preset')}: {preset!r} is not a preset; allowed values: {', '.join(PRESETS)}")
    merged = _deep_merge(PRESETS[preset](), data)
    model = data.get("model")
    if isinstance(model, Mapping) and "preset" not in model and not (set(model) & set(_MODEL_PRESET_KEYS)):
        merged["model"] = data["model"]  # a full model section replaces the preset's, never merges
    kwargs: dict[str, Any] = {}
    if merged.get("model"):
        kwargs["model"] = _load_model_config(merged["model"], source)
    for name, cls in _SECTIONS.items():
        if name in merged:
            kwargs[name] = dataclass_from_dict(cls, merged[name], source=source, prefix=name)
    for name, tp in _SCALARS.items():
        if name in merged:
            kwargs[name] = _coerce(merged[name], tp, name, source)
    config = RunConfig(**kwargs)
    try:
        config.validate()
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}" if source else str(exc)) from None
    return config


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``key.path=value`` (the value is YAML: ``3``, ``1e-3``, ``true``, ``[a, b]``, ``null``)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected key.path=value, e.g. pretrain.steps=100")
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({' '.join(str(exc).split())})") from None
    return key.strip().split("."), value


def apply_overrides(data: Mapping[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return ``data`` with each ``key.path=value`` override set (creating sections as needed)."""
    out = _deep_merge({}, data)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return out


def load_run_config(path: str | Path | None, overrides: list[str] | None = None, *, output_dir: str | None = None) -> RunConfig:
    """Read a run YAML file strictly, apply ``--set`` overrides and ``--out``, validate.

    Args:
        path: the YAML file; ``None`` = defaults only.
        overrides: ``key.path=value`` strings (see :func:`parse_override`).
        output_dir: replaces ``output_dir`` when given.

    Raises:
        ConfigError: a missing or unreadable file, bad YAML, unknown keys or bad values.
    """
    source = str(path) if path is not None else None
    data: Any = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the config file ({exc.strerror})") from None
        try:
            data = load_yaml(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top, got {type(data).__name__}")
    data = apply_overrides(data, overrides or [])
    if output_dir is not None:
        data["output_dir"] = str(output_dir)
    if overrides:
        source = f"{source or '<defaults>'} with --set {' --set '.join(overrides)}"
    return run_config_from_dict(data, source=source)


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): _to_plain(v) for k, v in obj.items()}
    return obj


def tiny_run_config(**overrides: Any) -> RunConfig:
    """The ``tiny`` preset as a :class:`RunConfig`; ``overrides`` are ``section={key: value}``."""
    return run_config_from_dict({"preset": "tiny", **overrides})

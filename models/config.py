"""Typed, strict model configuration: sections, layer plans, presets and the dict round trip.

Dimensions: d model dim, f ffn dim, h heads, n mels, v codebook size, c codebook dim.

Every section is a frozen keyword-only dataclass that validates itself on construction (so an
invalid configuration cannot exist) and raises ``ValueError`` naming ``section.field`` and the
allowed values. :func:`config_from_dict` is the one way in from YAML/JSON: an unknown key or a
value of the wrong type fails with the source, the dotted key path and what is allowed.

Only :mod:`models.builder` turns a :class:`ModelConfig` into modules.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from models.typed_config import ConfigError, coerce, deep_merge, describe, fail, section_from_dict, where
from models.typed_config import is_int as _is_int
from models.typed_config import is_number as _is_number

Positional = Literal["auto", "absolute", "none"]
POSITIONALS: tuple[str, ...] = ("auto", "absolute", "none")
Fbank = Literal["unpadded", "speechbrain"]
FBANKS: tuple[str, ...] = ("unpadded", "speechbrain")
FrontendNorm = Literal["channels", "channels_freq"]
FRONTEND_NORMS: tuple[str, ...] = ("channels", "channels_freq")
Init = Literal["torch", "xavier_normal"]
INITS: tuple[str, ...] = ("torch", "xavier_normal")


# --------------------------------------------------------------------------------------------
# small checks shared by the sections
# --------------------------------------------------------------------------------------------


def _check_int(path: str, value: object, minimum: int) -> None:
    if not _is_int(value) or value < minimum:  # type: ignore[operator]
        raise ValueError(f"{path} must be an integer >= {minimum}, got {value!r}")


def _check_probability(path: str, value: object, *, low_open: bool = False, high_closed: bool = False) -> None:
    ok = _is_number(value) and (value > 0 if low_open else value >= 0) and (  # type: ignore[operator]
        value <= 1 if high_closed else value < 1  # type: ignore[operator]
    )
    if not ok:
        interval = f"{'(' if low_open else '['}0, 1{']' if high_closed else ')'}"
        raise ValueError(f"{path} must be a number in {interval}, got {value!r}")


def _mixer_registry() -> Mapping[str, type]:
    # Imported lazily: the registry pulls in every mixer implementation (and torch).
    from models.mixers import MIXERS

    return MIXERS


def mixer_class(name: str) -> type:
    """The mixer class registered under ``name``; ``ValueError`` listing the valid names
    (:func:`models.mixers.get_mixer_class`, imported lazily for the same reason as the registry)."""
    from models.mixers import get_mixer_class

    return get_mixer_class(name)


def mixer_parameters(name: str) -> dict[str, inspect.Parameter]:
    """Keyword options the mixer ``name`` accepts (its constructor's parameters but model_dim)."""
    signature = inspect.signature(mixer_class(name).__init__)
    return {
        key: p
        for key, p in signature.parameters.items()
        if key not in ("self", "model_dim") and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }


# --------------------------------------------------------------------------------------------
# mixer specs and layer plans
# --------------------------------------------------------------------------------------------


class FrozenOptions(Mapping[str, Any]):
    """An immutable, hashable, picklable ``str -> scalar`` mapping (the options of a mixer)."""

    def __init__(self, data: Mapping[str, Any] | Sequence[tuple[str, Any]] = ()) -> None:
        self._data = dict(data)

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._data.items())))

    def __repr__(self) -> str:
        return repr(self._data)


@dataclass(frozen=True, kw_only=True)
class MixerSpec:
    """One layer's token mixer: a registry name and the options of its constructor."""

    name: str
    """Registry name, a key of ``models.mixers.MIXERS`` (mha, mha_relpos, mha_rope, pom, ...)."""

    options: Mapping[str, Any] = field(default_factory=dict)
    """Keyword options of the mixer's constructor, e.g. ``num_heads`` and ``dropout_p`` for the
    attention mixers, ``degree``/``expand`` for PoM; scalars only (int, float, bool, str, None)."""

    def __post_init__(self) -> None:
        if isinstance(self.options, Mapping):
            object.__setattr__(self, "options", FrozenOptions(self.options))
        self.validate()

    @classmethod
    def from_config_value(cls, value: Any, path: str, source: str | None) -> MixerSpec:
        """A layer as written in a file: a mixer name or ``{name, options}`` (the loader's hook)."""
        return _spec_from_dict(value, path, source)

    def validate(self) -> None:
        """Check the name is registered and every option is a scalar the mixer accepts."""
        if not isinstance(self.name, str):
            raise ValueError(f"mixer name must be a string, got {self.name!r}")
        mixer_class(self.name)
        if not isinstance(self.options, Mapping):
            raise ValueError(f"mixer {self.name!r}: options must be a mapping, got {self.options!r}")
        accepted = mixer_parameters(self.name)
        for key, value in self.options.items():
            if key not in accepted:
                raise ValueError(
                    f"mixer {self.name!r} has no option {key!r}; its options: {', '.join(sorted(accepted))}"
                )
            if not (value is None or isinstance(value, (bool, int, float, str))):
                raise ValueError(
                    f"mixer {self.name!r}: option {key!r} must be a scalar "
                    f"(int, float, bool, str or null), got {type(value).__name__} {value!r}"
                )

    @property
    def is_attention(self) -> bool:
        """Whether this mixer is a form of softmax attention."""
        return bool(mixer_class(self.name).is_attention)

    @property
    def positional(self) -> str:
        """``"absolute"`` when the encoder must add sinusoidal positions for this mixer, else ``"none"``."""
        return str(mixer_class(self.name).positional)

    def resolved_options(self) -> dict[str, Any]:
        """The options with the mixer's own defaults filled in (what the module will actually use)."""
        defaults = {
            key: p.default for key, p in mixer_parameters(self.name).items() if p.default is not p.empty
        }
        return {**defaults, **self.options}


def _as_spec(item: str | MixerSpec, what: str) -> MixerSpec:
    if isinstance(item, MixerSpec):
        return item
    if isinstance(item, str):
        return MixerSpec(name=item)
    if isinstance(item, Mapping):  # {"name": ..., "options": {...}}, as written in YAML
        return _spec_from_dict(item, what, None)
    raise ValueError(f"{what} must be a mixer name, a {{name, options}} mapping or a MixerSpec, got {item!r}")


def uniform_plan(num_layers: int, name: str, options: Mapping[str, Any] | None = None) -> tuple[MixerSpec, ...]:
    """``num_layers`` layers of the same mixer."""
    _check_int("num_layers", num_layers, 1)
    spec = MixerSpec(name=name, options=dict(options or {}))
    return (spec,) * num_layers


def hybrid_plan(
    num_layers: int,
    attention_layers: int,
    lower: str = "mha_relpos",
    upper: str = "pom",
    lower_options: Mapping[str, Any] | None = None,
    upper_options: Mapping[str, Any] | None = None,
) -> tuple[MixerSpec, ...]:
    """A hybrid layer plan: the lower ``attention_layers`` layers use ``lower``, the rest ``upper``.

    Args:
        num_layers: total depth (>= 1).
        attention_layers: how many of the lowest layers use ``lower`` (0 .. num_layers); 0 gives a
            pure ``upper`` plan, ``num_layers`` a pure ``lower`` plan.
        lower, upper: mixer registry names.
        lower_options, upper_options: constructor options of each mixer.

    Returns:
        ``num_layers`` :class:`MixerSpec`, lowest layer first.
    """
    _check_int("num_layers", num_layers, 1)
    if not _is_int(attention_layers) or not 0 <= attention_layers <= num_layers:
        raise ValueError(
            f"attention_layers must be an integer in [0, num_layers={num_layers}], got {attention_layers!r}"
        )
    low = MixerSpec(name=lower, options=dict(lower_options or {}))
    high = MixerSpec(name=upper, options=dict(upper_options or {}))
    return (low,) * attention_layers + (high,) * (num_layers - attention_layers)


_LABEL_OPTIONS = (("degree", "k"), ("expand", "D"), ("parts", "p"), ("mode", ""))


def _layer_label(spec: MixerSpec) -> str:
    options = spec.resolved_options() if hasattr(spec, "resolved_options") else dict(spec.options)
    shown = [f"{short}{options[key]}" for key, short in _LABEL_OPTIONS if key in options and key in spec.options]
    return f"{spec.name}({','.join(shown)})" if shown else spec.name


def plan_label(layers: Sequence[MixerSpec]) -> str:
    """A short human label of a plan, e.g. ``"4xmha_relpos+8xpom(k2,D2)"``."""
    parts: list[tuple[int, str]] = []
    for spec in layers:
        label = _layer_label(spec)
        if parts and parts[-1][1] == label:
            parts[-1] = (parts[-1][0] + 1, label)
        else:
            parts.append((1, label))
    return "+".join(f"{count}x{label}" for count, label in parts)


# --------------------------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class FrontendConfig:
    """Log-mel features and the convolutional subsampling front-end."""

    sample_rate: int = 16000
    """Audio sample rate in Hz; the waveforms given to the model must already have it."""

    n_mels: int = 80
    """Number of log-mel filterbank channels."""

    win_ms: float = 25.0
    """Analysis window length in milliseconds (also the FFT size)."""

    hop_ms: float = 10.0
    """Hop between analysis windows in milliseconds (the fbank frame rate)."""

    conv_channels: tuple[int, ...] = (128, 32)
    """Output channels of each stride-2 Conv2d block; the time subsampling is 2 ** len(...)."""

    dropout_p: float = 0.1
    """Dropout after each front-end conv block."""

    positional: Positional = "auto"
    """Sinusoidal absolute positions after the front-end: ``"absolute"`` always, ``"none"`` never,
    ``"auto"`` when any layer's mixer asks for them (plain MHA, PoM, SummaryMixing)."""

    fbank: Fbank = "speechbrain"
    """How the log-mel features are computed. ``"speechbrain"`` (default; SpeechBrain ``Fbank``,
    what the released code used): centred frames over zero padding (``1 + s // hop``), Hamming
    window, SpeechBrain's triangles (centres evenly spaced in HTK mel over ``[0, sr / 2]``, each
    as wide on both sides as the gap to its lower neighbour), ``10 log10(max(mel, 1e-10))``
    floored at 80 dB below the utterance's maximum. ``"unpadded"`` (the ``tiny`` preset): Hann
    window, frames that lie inside the utterance only (``1 + (s - window) // hop``), HTK mel
    triangles over ``[0, sr / 2]``, ``log(mel + 1e-6)``."""

    norm: FrontendNorm = "channels_freq"
    """LayerNorm of each conv block: ``"channels_freq"`` (default; over the frequency x channel
    plane of each frame, with a per-(frequency, channel) gain and bias: SpeechBrain's
    ``ConvolutionFrontEnd``, the released code) or ``"channels"`` (the ``tiny`` preset; over
    the channels of each time-frequency point)."""

    proj_dropout_p: float = 0.1
    """Dropout after the front-end's Linear projection to ``d`` (before the positions). The
    released TransformerASR has one at the encoder dropout (0.1, the default); ``tiny``: 0."""

    def __post_init__(self) -> None:
        if isinstance(self.conv_channels, list):
            object.__setattr__(self, "conv_channels", tuple(self.conv_channels))
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        _check_int("frontend.sample_rate", self.sample_rate, 1000)
        _check_int("frontend.n_mels", self.n_mels, 1)
        for name in ("win_ms", "hop_ms"):
            value = getattr(self, name)
            if not _is_number(value) or value <= 0:
                raise ValueError(f"frontend.{name} must be a positive number of milliseconds, got {value!r}")
        if self.hop_length < 1 or self.win_length < 2:
            raise ValueError(
                f"frontend.win_ms/hop_ms give a window of {self.win_length} and a hop of "
                f"{self.hop_length} samples at {self.sample_rate} Hz; both must be >= 1 (window >= 2)"
            )
        if self.hop_length > self.win_length:
            raise ValueError(f"frontend.hop_ms ({self.hop_ms}) must not exceed frontend.win_ms ({self.win_ms})")
        if (
            not isinstance(self.conv_channels, tuple)
            or not 1 <= len(self.conv_channels) <= 4
            or not all(_is_int(c) and c >= 1 for c in self.conv_channels)
        ):
            raise ValueError(
                f"frontend.conv_channels must be 1 to 4 positive integers, got {self.conv_channels!r}"
            )
        _check_probability("frontend.dropout_p", self.dropout_p)
        if self.positional not in POSITIONALS:
            raise ValueError(f"frontend.positional must be one of {POSITIONALS}, got {self.positional!r}")
        if self.fbank not in FBANKS:
            raise ValueError(f"frontend.fbank must be one of {FBANKS}, got {self.fbank!r}")
        if self.norm not in FRONTEND_NORMS:
            raise ValueError(f"frontend.norm must be one of {FRONTEND_NORMS}, got {self.norm!r}")
        _check_probability("frontend.proj_dropout_p", self.proj_dropout_p)

    @property
    def win_length(self) -> int:
        """Window length in samples."""
        return int(round(self.sample_rate * self.win_ms / 1000))

    @property
    def hop_length(self) -> int:
        """Hop length in samples."""
        return int(round(self.sample_rate * self.hop_ms / 1000))

    @property
    def subsampling_factor(self) -> int:
        """Fbank frames per encoder frame."""
        return 2 ** len(self.conv_channels)


def _default_layers() -> tuple[MixerSpec, ...]:
    return uniform_plan(12, "mha_relpos", {"num_heads": 8, "dropout_p": 0.1, **RELEASED_MIXER_DEFAULTS["mha_relpos"]})


@dataclass(frozen=True, kw_only=True)
class EncoderConfig:
    """The Conformer encoder: width, depth and one token mixer per layer.

    Defaults are the paper's base relative-position MHA encoder as released (SpeechBrain's
    RelPosMHAXL options on every layer, xavier-normal init, no dropout on the mixer output).
    """

    model_dim: int = 576
    """``d``: width of every layer (a multiple of ``num_heads`` for attention mixers)."""

    num_layers: int = 12
    """Number of Conformer layers; ``layers`` has exactly this many entries."""

    ffn_dim: int = 2048
    """Hidden width of the two macaron feed-forward modules."""

    conv_kernel: int = 31
    """Depthwise convolution kernel size (odd, so the convolution is centred)."""

    dropout_p: float = 0.1
    """Dropout of the feed-forward, convolution and (with ``mixer_dropout``) mixer residual branches."""

    mixer_dropout: bool = False
    """Dropout (``dropout_p``) on each mixer's output before its residual sum. The released
    Conformer layer has none there (``False``, the default; its attention dropout is the mixer's
    own ``dropout_p`` option); the ``tiny`` preset keeps one (``True``)."""

    init: Init = "xavier_normal"
    """Initial weights: ``"xavier_normal"`` (default; the released ``_init_params``: xavier-normal
    on every parameter with more than one dimension of the encoder and of the front-end's Linear
    projection; the front-end's convolutions, the LayerNorms, biases and the heads keep their
    PyTorch defaults) or ``"torch"`` (every module's PyTorch default; the ``tiny`` preset)."""

    layers: tuple[MixerSpec, ...] = field(default_factory=_default_layers)
    """The layer plan: one :class:`MixerSpec` per layer, lowest layer first."""

    def __post_init__(self) -> None:
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        _check_int("encoder.model_dim", self.model_dim, 1)
        _check_int("encoder.num_layers", self.num_layers, 1)
        _check_int("encoder.ffn_dim", self.ffn_dim, 1)
        if not _is_int(self.conv_kernel) or self.conv_kernel < 1 or self.conv_kernel % 2 == 0:
            raise ValueError(f"encoder.conv_kernel must be an odd integer >= 1, got {self.conv_kernel!r}")
        _check_probability("encoder.dropout_p", self.dropout_p)
        if not isinstance(self.mixer_dropout, bool):
            raise ValueError(f"encoder.mixer_dropout must be true or false, got {self.mixer_dropout!r}")
        if self.init not in INITS:
            raise ValueError(f"encoder.init must be one of {INITS}, got {self.init!r}")
        if not isinstance(self.layers, tuple) or not all(isinstance(s, MixerSpec) for s in self.layers):
            raise ValueError(f"encoder.layers must be a tuple of MixerSpec, got {self.layers!r}")
        if len(self.layers) != self.num_layers:
            raise ValueError(
                f"encoder.layers has {len(self.layers)} entries but encoder.num_layers is "
                f"{self.num_layers}; give one mixer per layer"
            )
        checked: set[MixerSpec] = set()
        for index, spec in enumerate(self.layers):
            if spec in checked:
                continue
            checked.add(spec)
            options = spec.resolved_options()
            heads = options.get("num_heads")
            if _is_int(heads) and heads >= 1 and self.model_dim % heads != 0:
                raise ValueError(
                    f"encoder.model_dim={self.model_dim} must be divisible by num_heads={heads} "
                    f"(encoder.layers[{index}], mixer {spec.name!r})"
                )
            _check_mixer_builds(spec, self.model_dim, f"encoder.layers[{index}]")

    @property
    def mixer_names(self) -> tuple[str, ...]:
        """The mixer name of every layer."""
        return tuple(spec.name for spec in self.layers)


def _check_mixer_builds(spec: MixerSpec, model_dim: int, path: str) -> None:
    """Build the mixer on the meta device so bad option values fail at config time, not in a trial."""
    import torch

    from models.mixers import build_mixer

    try:
        with torch.device("meta"):
            build_mixer(spec.name, model_dim, **spec.options)
    except ValueError as err:
        raise ValueError(f"{path} (mixer {spec.name!r}): {err}") from None
    except (RuntimeError, NotImplementedError):  # a mixer whose init needs real values: checked when built
        pass


@dataclass(frozen=True, kw_only=True)
class BestRQConfig:
    """BEST-RQ pre-training (Chiu et al. 2022): masking, the frozen random quantizer and its heads."""

    mask_prob: float = 0.15
    """Probability that an fbank frame of the shortest utterance starts a masked span (the number of
    spans is ``mask_prob * shortest_length``, so about ``mask_prob * mask_span`` of it is masked)."""

    mask_span: int = 4
    """Length of a masked span in fbank frames (4 = one encoder frame)."""

    noise_std: float = 0.1
    """Standard deviation of the Gaussian noise that replaces masked (normalised) fbank frames."""

    codebook_size: int = 8192
    """``v``: entries per codebook (classes of each prediction head)."""

    codebook_dim: int = 16
    """``c``: dimension of the random projection and of the codebook entries."""

    num_codebooks: int = 1
    """Independent codebooks (and prediction heads); the loss averages over them."""

    stack_frames: int = 4
    """Fbank frames stacked into one quantizer input; equals the front-end's subsampling factor."""

    seed: int = 0
    """Seed of the generator that draws the frozen projection and codebooks."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        _check_probability("best_rq.mask_prob", self.mask_prob, low_open=True, high_closed=True)
        _check_int("best_rq.mask_span", self.mask_span, 1)
        if not _is_number(self.noise_std) or self.noise_std < 0:
            raise ValueError(f"best_rq.noise_std must be a number >= 0, got {self.noise_std!r}")
        _check_int("best_rq.codebook_size", self.codebook_size, 2)
        _check_int("best_rq.codebook_dim", self.codebook_dim, 1)
        _check_int("best_rq.num_codebooks", self.num_codebooks, 1)
        _check_int("best_rq.stack_frames", self.stack_frames, 1)
        _check_int("best_rq.seed", self.seed, 0)


@dataclass(frozen=True, kw_only=True)
class CTCConfig:
    """The CTC fine-tuning head."""

    hidden_dim: int = 1280
    """Width of each hidden layer of the head."""

    num_hidden_layers: int = 3
    """Number of ``Linear -> LayerNorm -> LeakyReLU -> Dropout`` layers before the output layer."""

    dropout_p: float = 0.15
    """Dropout after each hidden layer of the head."""

    vocab_size: int = 29
    """Output classes, blank included (29 = blank, apostrophe, space and 26 letters)."""

    blank: int = 0
    """Index of the CTC blank symbol."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        _check_int("ctc.hidden_dim", self.hidden_dim, 1)
        _check_int("ctc.num_hidden_layers", self.num_hidden_layers, 0)
        _check_probability("ctc.dropout_p", self.dropout_p)
        _check_int("ctc.vocab_size", self.vocab_size, 2)
        if not _is_int(self.blank) or not 0 <= self.blank < self.vocab_size:
            raise ValueError(f"ctc.blank must be an integer in [0, ctc.vocab_size={self.vocab_size}), got {self.blank!r}")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Everything that shapes the models: front-end, encoder, BEST-RQ and CTC head."""

    frontend: FrontendConfig = field(default_factory=FrontendConfig)
    """Features and convolutional front-end."""

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    """The Conformer encoder and its layer plan."""

    best_rq: BestRQConfig = field(default_factory=BestRQConfig)
    """BEST-RQ pre-training."""

    ctc: CTCConfig = field(default_factory=CTCConfig)
    """CTC fine-tuning head."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check each section and the rules that tie sections together."""
        for name, cls in SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                raise ValueError(f"{name} must be a {cls.__name__}, got {getattr(self, name)!r}")
        factor = self.frontend.subsampling_factor
        if self.best_rq.stack_frames != factor:
            raise ValueError(
                f"best_rq.stack_frames={self.best_rq.stack_frames} must equal the front-end's time "
                f"subsampling 2 ** len(frontend.conv_channels) = {factor}, so that each encoder frame "
                f"has one target"
            )


SECTIONS: dict[str, type] = {
    "frontend": FrontendConfig,
    "encoder": EncoderConfig,
    "best_rq": BestRQConfig,
    "ctc": CTCConfig,
}


# --------------------------------------------------------------------------------------------
# dict round trip
# --------------------------------------------------------------------------------------------


def config_to_dict(config: Any) -> Any:
    """A config (or any section, or a MixerSpec) as plain dicts, lists and scalars (YAML/JSON-ready)."""
    if isinstance(config, MixerSpec):
        return {"name": config.name, "options": dict(config.options)}
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: config_to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (tuple, list)):
        return [config_to_dict(item) for item in config]
    if isinstance(config, Mapping):
        return {key: config_to_dict(value) for key, value in config.items()}
    return config


def _spec_from_dict(value: Any, path: str, source: str | None) -> MixerSpec:
    if isinstance(value, str):  # shorthand: a bare mixer name
        value = {"name": value}
    if not isinstance(value, Mapping):
        raise fail(source, path, f"expected a mixer name or a mapping with keys name, options; got {describe(value)}")
    for key in value:
        if key not in ("name", "options"):
            raise fail(source, f"{path}.{key}", "unknown key; allowed keys: name, options")
    if "name" not in value:
        raise fail(source, f"{path}.name", f"missing; valid mixers: {', '.join(sorted(_mixer_registry()))}")
    name = coerce(value["name"], str, f"{path}.name", source)
    options = coerce(value.get("options") or {}, dict[str, Any], f"{path}.options", source)
    try:
        return MixerSpec(name=name, options=options)
    except ValueError as err:
        raise fail(source, path, str(err)) from None


def config_from_dict(data: Mapping[str, Any], source: str = "<dict>", *, path: str = "") -> ModelConfig:
    """Build a :class:`ModelConfig` from plain data with every section spelled out, strictly.

    Missing keys take the section defaults (the paper's base relative-position MHA model); the
    rules and the one-line errors are those of :mod:`models.typed_config`. A run file's
    ``model:`` section is read by :func:`model_from_section` instead (a preset plus overrides).

    Args:
        data: nested mapping, e.g. parsed YAML: ``{"encoder": {"model_dim": 256, ...}, ...}``.
        source: where the data came from (a file name), quoted in every error.
        path: the dotted key of ``data`` in its file (e.g. ``model``), quoted in every error.
    """
    return section_from_dict(ModelConfig, data, source=source, path=path)


MODEL_KEYS: dict[str, Any] = {
    "preset": str,
    "plan": str | tuple[Any, ...] | None,
    "attention_layers": int | None,
    "lower": str,
    "plan_options": dict[str, Any],
    "lower_options": dict[str, Any],
    "model_dim": int | None,
    "num_heads": int | None,
    "param_budget": float | None,
}
"""The keys of a ``model:`` section besides the sections: :func:`make_config`'s arguments."""


def model_from_section(data: Mapping[str, Any] | None, *, source: str | None = None, path: str = "model") -> ModelConfig:
    """The ``model:`` section of a run file or sweep spec: a preset, a layer plan, section overrides.

    ``{preset: tiny, plan: pom, attention_layers: 2, plan_options: {degree: 3}, encoder:
    {dropout_p: 0.2}}`` is ``make_config("tiny", plan="pom", attention_layers=2,
    plan_options={"degree": 3}, encoder={"dropout_p": 0.2})``: whatever the section leaves out
    keeps the preset's value (a section without ``preset`` uses ``base``; a run file's section is
    first merged onto its run preset's, which names one). ``encoder.model_dim`` may stand for
    ``model_dim``. With ``encoder.layers`` (every layer spelled out, as :func:`config_to_dict`
    writes them) the sections are merged onto the preset's sections as they are, without the
    plan keys, so a config's dict reads back equal.

    Raises:
        ConfigError: one line naming ``source``, the key under ``path`` and what is allowed.
    """
    if data is not None and not isinstance(data, Mapping):
        raise fail(source, path, f"expected a mapping of keys, got {describe(data)}")
    data = dict(data or {})
    kwargs: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {}
    for key, value in data.items():
        if key in SECTIONS:
            sections[key] = dict(coerce(value if value is not None else {}, dict[str, Any], f"{path}.{key}", source))
        elif key in MODEL_KEYS:
            kwargs[key] = coerce(value, MODEL_KEYS[key], f"{path}.{key}", source)
        else:
            raise fail(source, f"{path}.{key}", f"unknown key; allowed keys: {', '.join(sorted([*MODEL_KEYS, *SECTIONS]))}")
    preset = kwargs.pop("preset", "base")
    if preset not in PRESETS:
        raise fail(source, f"{path}.preset", f"{preset!r} is not a model preset; allowed values: {', '.join(PRESETS)}")
    encoder = sections.get("encoder", {})
    if "layers" in encoder:  # every layer spelled out (config_to_dict's form): the sections onto the preset's, as they are
        for key in kwargs:
            raise fail(source, f"{path}.{key}", f"give {path}.encoder.layers (every layer) or {path}.{key}, not both")
        return config_from_dict(deep_merge(config_to_dict(get_preset(preset).config), sections), source=source, path=path)
    if "model_dim" in encoder:
        if kwargs.get("model_dim") is not None or kwargs.get("param_budget") is not None:
            raise fail(source, f"{path}.encoder.model_dim", f"give {path}.encoder.model_dim, {path}.model_dim or "
                                                             f"{path}.param_budget, not two")
        kwargs["model_dim"] = encoder.pop("model_dim")
    plan = kwargs.get("plan")
    if isinstance(plan, tuple):  # the layers as written: name them by their key in the file
        kwargs["plan"] = tuple(_spec_from_dict(item, f"{path}.plan[{i}]", source) for i, item in enumerate(plan))
    try:
        return make_config(preset, source=source, path=path, **kwargs, **sections)
    except ValueError as err:
        if source and str(err).startswith(f"{source}: "):
            raise
        raise fail(source, path, str(err)) from None


# --------------------------------------------------------------------------------------------
# presets
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Preset:
    """A named model size: the sections for its default plan and how to size other plans."""

    name: str
    """Preset name (tiny, base, large)."""

    config: ModelConfig
    """The preset's configuration with its default (attention) plan."""

    num_heads: int
    """Heads given to attention mixers whose options do not set ``num_heads``."""

    param_budget: float | None
    """Front-end + encoder + BEST-RQ head parameters that other plans are matched to; ``None``
    means the count of ``config`` itself."""

    pom_k2d2_dim: int | None = None
    """The published ``model_dim`` of a pure PoM k=2 D=2 plan, when there is one."""

    mixer_defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """Per mixer name, options every layer of that mixer gets unless it sets them itself (e.g. the
    released code's RelPosMHAXL flags for every ``mha_relpos`` layer, hybrids' lower layers too)."""

    @property
    def attention_dim(self) -> int:
        """``model_dim`` of plans made only of attention mixers."""
        return self.config.encoder.model_dim


def _with_plan(
    config: ModelConfig,
    name: str,
    num_heads: int,
    mixer_defaults: Mapping[str, Mapping[str, Any]] | None = None,
    **encoder: Any,
) -> ModelConfig:
    fields = {**config_to_dict(config.encoder), **encoder}
    layers = _fill_options(
        uniform_plan(fields["num_layers"], name),
        num_heads=num_heads, dropout_p=fields["dropout_p"], mixer_defaults=mixer_defaults,
    )
    return dataclasses.replace(config, encoder=EncoderConfig(**{**fields, "layers": layers}))


def _fill_options(
    layers: Sequence[MixerSpec],
    *,
    num_heads: int,
    dropout_p: float,
    mixer_defaults: Mapping[str, Mapping[str, Any]] | None = None,
) -> tuple[MixerSpec, ...]:
    """Give every layer the preset's defaults for the options it does not set itself.

    Attention mixers get ``num_heads``; every mixer with a ``dropout_p`` option gets the encoder's
    dropout (the released Conformer passes one dropout to its attention, too); PoM-family mixers
    get the paper's ``degree=2, expand=2`` written out, so the config says what it trains; then
    the preset's ``mixer_defaults`` for that mixer name (:attr:`Preset.mixer_defaults`).
    """
    filled: list[MixerSpec] = []
    cache: dict[MixerSpec, MixerSpec] = {}
    for spec in layers:
        if spec not in cache:
            accepted = mixer_parameters(spec.name)
            defaults: dict[str, Any] = {}
            if spec.is_attention and "num_heads" in accepted:
                defaults["num_heads"] = num_heads
            if "dropout_p" in accepted:
                defaults["dropout_p"] = dropout_p
            for key in ("degree", "expand"):
                if key in accepted:
                    defaults[key] = 2
            defaults.update((mixer_defaults or {}).get(spec.name, {}))
            cache[spec] = MixerSpec(name=spec.name, options={**defaults, **spec.options})
        filled.append(cache[spec])
    return tuple(filled)


RELEASED_MIXER_DEFAULTS: dict[str, dict[str, Any]] = {
    # SpeechBrain RelPosMHAXL + RelPosEncXL: scores scaled by 1/sqrt(d), |i - j| embedded, fused
    # q/k/v projection without bias, output projection with one.
    "mha_relpos": {"score_scale": "model_dim", "symmetric_positions": True, "bias": False, "out_bias": True},
    # The released PoM averages its state over all frames, padding included.
    "pom": {"pad_mean": "all"},
    "pom_select": {"pad_mean": "all"},
    "pom_split": {"pad_mean": "all"},
}
"""What the released code does differently from our defaults, per mixer (the ``base`` preset)."""


def _base_preset() -> Preset:
    """The paper's ~95M encoder as released (MODEL-FACTS): 12 layers, ffn 2048, conv kernel 31,
    dropout 0.1, 8 heads; d 576 for attention plans (front-end + encoder + BEST-RQ head 94.0M
    with relpos MHA) and 488 for PoM k2 D2 (95.6M); any other plan is matched to 95M.

    The released code's details are the section defaults, each one ``--set`` away from its
    alternative: SpeechBrain fbank (``frontend.fbank``), front-end LayerNorm over frequency x
    channels (``frontend.norm``), dropout 0.1 after the front-end's Linear
    (``frontend.proj_dropout_p``), xavier-normal init (``encoder.init``), no dropout on the mixer
    output (``encoder.mixer_dropout``); and :data:`RELEASED_MIXER_DEFAULTS` for every layer of
    every plan (RelPosMHAXL flags, PoM time mean over all frames; override them with
    ``plan_options``/``lower_options``).
    """
    config = ModelConfig()  # the section defaults are the released base relpos-MHA encoder
    return Preset(
        name="base", config=config, num_heads=8, param_budget=95e6, pom_k2d2_dim=488,
        mixer_defaults=RELEASED_MIXER_DEFAULTS,
    )


def _tiny_preset() -> Preset:
    """A model that trains in seconds per step on a laptop CPU (smoke runs, CI, local sweeps).

    4 layers, d 128 (4 heads of 32) for attention plans, ffn 256, conv kernel 15, front-end
    channels (64, 16) (per 8 x 4 s batch the (128, 32) front-end costs ~0.7 GMAC, close to the
    4-layer encoder's ~1.1; (64, 16) costs ~0.2), codebook 1024 x 16, CTC head 2 x 256.
    Front-end + encoder + BEST-RQ head: 1.25M with relpos MHA; other plans are matched to that
    (PoM k2 D2 at d 104). One BEST-RQ step (forward, backward, AdamW) on 8 x 4 s of audio took
    0.43 s (relpos MHA) and 0.32 s (PoM) on 2 CPU threads.

    Not the released code's details but the choices the measured learning runs used (each one
    ``--set`` away): features without padding (``frontend.fbank: unpadded``, exact padding
    invariance), LayerNorm over channels, no dropout after the front-end's Linear, PyTorch init,
    dropout on the mixer output, the textbook relative attention and the PoM mean over real
    frames (no ``mixer_defaults``).
    """
    base = ModelConfig()
    config = ModelConfig(
        frontend=dataclasses.replace(
            base.frontend, conv_channels=(64, 16), fbank="unpadded", norm="channels", proj_dropout_p=0.0
        ),
        encoder=base.encoder,
        best_rq=dataclasses.replace(base.best_rq, codebook_size=1024),
        ctc=dataclasses.replace(base.ctc, hidden_dim=256, num_hidden_layers=2),
    )
    config = _with_plan(
        config, "mha_relpos", 4, model_dim=128, num_layers=4, ffn_dim=256, conv_kernel=15,
        init="torch", mixer_dropout=True,
    )
    return Preset(name="tiny", config=config, num_heads=4, param_budget=None)


def _large_preset() -> Preset:
    """Our estimate of a ~315M model; the paper's released code does not publish one.

    Reasoning: 315M is the size of the usual "large" self-supervised speech encoders (wav2vec 2.0
    and HuBERT Large: 24 layers, ~317M), so depth doubles to 24 as in every base -> large step of
    those families, and the front-end, kernel, dropout, BEST-RQ and CTC settings stay as in base.
    At wav2vec2-Large width (d 1024, ffn 4096) a macaron Conformer layer has ~25M parameters
    (two FFNs, attention with its position projection, convolution), i.e. ~600M for 24 layers,
    so the width is set by the budget instead: d 768 (16 heads of 48, a multiple of 8 for fused
    attention kernels) and ffn 2688, which keeps base's ffn/d ratio (2048/576 = 3.6 vs 3.5).
    Front-end + encoder + BEST-RQ head: 319.4M with relpos MHA (+1.4%); every other plan is
    matched to 315M (PoM k2 D2 lands at d 632, 313.5M).
    """
    base = _base_preset().config
    config = _with_plan(
        base, "mha_relpos", 16, RELEASED_MIXER_DEFAULTS, model_dim=768, num_layers=24, ffn_dim=2688
    )
    return Preset(
        name="large", config=config, num_heads=16, param_budget=315e6, mixer_defaults=RELEASED_MIXER_DEFAULTS
    )


PRESETS: dict[str, Any] = {"tiny": _tiny_preset, "base": _base_preset, "large": _large_preset}
"""Preset factories (tiny and large build on base); see each factory's docstring."""


def get_preset(name: str) -> Preset:
    """The preset called ``name``; ``ValueError`` listing the presets."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return PRESETS[name]()


def _is_pom_k2d2(layers: Sequence[MixerSpec]) -> bool:
    return all(
        spec.name == "pom"
        and spec.resolved_options().get("degree") == 2
        and spec.resolved_options().get("expand") == 2
        for spec in layers
    )


def resolve_plan(
    plan: str | Sequence[str | MixerSpec] | None,
    num_layers: int,
    *,
    attention_layers: int | None = None,
    lower: str = "mha_relpos",
    default: str = "mha_relpos",
    plan_options: Mapping[str, Any] | None = None,
    lower_options: Mapping[str, Any] | None = None,
) -> tuple[MixerSpec, ...]:
    """Turn the ``plan`` argument of :func:`make_config` into ``num_layers`` specs.

    ``plan`` is a mixer name (every layer, or the upper layers when ``attention_layers`` is
    given), a sequence with one name, ``{name, options}`` mapping or :class:`MixerSpec` per layer,
    or ``None`` for ``default``.
    """
    if plan is None:
        plan = default
    if isinstance(plan, str):
        if attention_layers is not None:
            return hybrid_plan(
                num_layers, attention_layers, lower=lower, upper=plan,
                lower_options=lower_options, upper_options=plan_options,
            )
        return uniform_plan(num_layers, plan, plan_options)
    if attention_layers is not None:
        raise ValueError("attention_layers applies to a plan given as one mixer name, not to a list of layers")
    if plan_options or lower_options:
        raise ValueError("plan_options/lower_options apply to a plan given as one mixer name; "
                         "give options per layer as {name, options} entries instead")
    if not isinstance(plan, Sequence):
        raise ValueError(f"plan must be a mixer name or a sequence of mixer names/MixerSpec, got {plan!r}")
    layers = tuple(_as_spec(item, f"plan[{i}]") for i, item in enumerate(plan))
    if len(layers) != num_layers:
        raise ValueError(
            f"plan has {len(layers)} layers but the encoder has num_layers={num_layers}; "
            f"override encoder num_layers or give one mixer per layer"
        )
    return layers


def make_config(
    preset: str = "base",
    *,
    plan: str | Sequence[str | MixerSpec] | None = None,
    model_dim: int | None = None,
    attention_layers: int | None = None,
    num_heads: int | None = None,
    lower: str = "mha_relpos",
    plan_options: Mapping[str, Any] | None = None,
    lower_options: Mapping[str, Any] | None = None,
    param_budget: float | None = None,
    source: str | None = None,
    path: str = "",
    **overrides: Mapping[str, Any],
) -> ModelConfig:
    """Build a validated :class:`ModelConfig` from a preset, a layer plan and overrides.

    Args:
        preset: ``"tiny"``, ``"base"`` or ``"large"``.
        plan: a mixer name for every layer (``"pom"``), a list with one name, ``{name, options}``
            mapping or :class:`MixerSpec` per layer (e.g. from :func:`hybrid_plan`), or ``None``
            for the preset's relative-position MHA plan.
        model_dim: ``d``. ``None`` picks the preset's: its attention width for plans made only of
            attention mixers, the published width for PoM k2 D2 where the preset has one, and
            otherwise the multiple of 8 (and of the heads) whose front-end + encoder + BEST-RQ head
            is closest to the preset's parameter budget (:func:`models.params.match_model_dim`).
        attention_layers: with ``plan`` a mixer name: the lower ``attention_layers`` layers use
            ``lower`` (default ``mha_relpos``) and the others ``plan`` (:func:`hybrid_plan`).
        lower: the attention mixer of the lower layers of a hybrid plan.
        plan_options: options of the ``plan`` mixer (e.g. ``{"degree": 3, "expand": 1}``).
        lower_options: options of the lower mixer.
        param_budget: with ``model_dim=None``, match ``model_dim`` to this many front-end +
            encoder + BEST-RQ head parameters whatever the plan (default: the preset's rules).
        num_heads: heads of the attention layers that do not set ``num_heads`` themselves
            (default: the preset's).
        source, path: the file and the key of the ``model:`` section the arguments come from
            (:func:`model_from_section`), named in errors; default ``make_config(preset=...)``.
        **overrides: section overrides, e.g. ``encoder={"dropout_p": 0.2}``,
            ``best_rq={"mask_prob": 0.1}``; keys checked strictly.

    Every layer without explicit options gets ``num_heads`` (attention), the encoder's
    ``dropout_p`` (mixers with a dropout), ``degree=2, expand=2`` (PoM family) and the preset's
    ``mixer_defaults`` (``base``/``large``: the released code's options).
    """
    spec = get_preset(preset)
    source = source or f"make_config(preset={preset!r})"

    def key(name: str) -> str:
        return f"{path}.{name}" if path else name

    for name in overrides:
        if name not in SECTIONS:
            raise fail(source, key(name), f"unknown override; allowed: {', '.join(SECTIONS)}")
    encoder_overrides = dict(overrides.get("encoder", {}) or {})
    for name in ("layers", "model_dim"):
        if name in encoder_overrides:
            raise fail(source, key(f"encoder.{name}"), f"give {'plan' if name == 'layers' else name}=..., not encoder overrides")
    # Sections other than the layers first, so the mixer defaults follow the final encoder dropout.
    base_dict = deep_merge(config_to_dict(spec.config), {k: dict(v or {}) for k, v in overrides.items()})
    base_dict["encoder"].pop("layers")
    num_layers = base_dict["encoder"].get("num_layers", spec.config.encoder.num_layers)
    dropout_p = base_dict["encoder"].get("dropout_p", spec.config.encoder.dropout_p)
    if not _is_int(num_layers) or num_layers < 1:
        raise fail(source, key("encoder.num_layers"), f"must be an integer >= 1, got {num_layers!r}")
    heads = spec.num_heads if num_heads is None else num_heads
    if not _is_int(heads) or heads < 1:
        raise fail(source, key("num_heads"), f"must be a positive integer, got {heads!r}")
    layers = _fill_options(
        resolve_plan(
            plan, num_layers, attention_layers=attention_layers, lower=lower,
            plan_options=plan_options, lower_options=lower_options,
        ),
        num_heads=heads, dropout_p=dropout_p, mixer_defaults=spec.mixer_defaults,
    )
    base_dict["encoder"]["layers"] = config_to_dict(layers)

    if param_budget is not None and (not _is_number(param_budget) or param_budget <= 0):
        raise fail(source, key("param_budget"), f"must be a positive number of parameters, got {param_budget!r}")
    if model_dim is not None and param_budget is not None:
        raise fail(source, key("param_budget"), f"give {key('model_dim')} or {key('param_budget')}, not both")
    if model_dim is None:
        if param_budget is not None:
            model_dim = _match_budget(base_dict, layers, float(param_budget), source, key("param_budget"))
        elif all(s.is_attention for s in layers) and heads == spec.num_heads:
            model_dim = spec.attention_dim
        elif spec.pom_k2d2_dim is not None and _is_pom_k2d2(layers):
            model_dim = spec.pom_k2d2_dim
        else:
            from models.params import count_budget, match_model_dim  # lazy: params builds models

            probe = dict(base_dict, encoder=dict(base_dict["encoder"], model_dim=_plan_multiple(layers)))
            budget = spec.param_budget if spec.param_budget is not None else count_budget(spec.config)
            model_dim = match_model_dim(config_from_dict(probe, source=source, path=path), budget)
    base_dict["encoder"]["model_dim"] = model_dim
    return config_from_dict(base_dict, source=source, path=path)


def _match_budget(base_dict: dict[str, Any], layers: Sequence[MixerSpec], budget: float, source: str, key: str) -> int:
    """``model_dim`` for ``param_budget``; a budget below the smallest model or above the largest fails."""
    from models.params import count_budget, match_model_dim  # lazy: params builds models (on the meta device)

    step = _plan_multiple(layers)
    probe = config_from_dict(dict(base_dict, encoder=dict(base_dict["encoder"], model_dim=step)), source=source)
    smallest = count_budget(probe)
    if budget < smallest:
        raise fail(source, key, f"{budget:.4g} parameters is below the smallest model of this plan "
                                f"({smallest:,} at model_dim={step}); give at least {smallest}")
    try:
        return match_model_dim(probe, budget)
    except ValueError as err:
        raise fail(source, key, f"{budget:.4g} parameters is more than this plan reaches ({err})") from None


def _plan_multiple(layers: Sequence[MixerSpec]) -> int:
    """Smallest step of ``model_dim`` every layer accepts: 8, the heads (x2 for rotary), PoM parts."""
    step = 8
    for spec in layers:
        options = spec.resolved_options()
        heads = options.get("num_heads")
        if _is_int(heads) and heads >= 1:
            step = math.lcm(step, heads * (2 if spec.name == "mha_rope" else 1))
        parts = options.get("parts")
        if _is_int(parts) and parts >= 1:
            step = math.lcm(step, parts)
    return step


__all__ = [
    "BestRQConfig",
    "CTCConfig",
    "EncoderConfig",
    "FrontendConfig",
    "FrozenOptions",
    "MixerSpec",
    "ModelConfig",
    "POSITIONALS",
    "PRESETS",
    "Preset",
    "ConfigError",
    "MODEL_KEYS",
    "SECTIONS",
    "config_from_dict",
    "config_to_dict",
    "get_preset",
    "hybrid_plan",
    "make_config",
    "mixer_class",
    "model_from_section",
    "plan_label",
    "resolve_plan",
    "uniform_plan",
]

"""Conformer encoder (macaron feed-forward, token mixer, convolution) with an injectable mixer.

Dimensions: b batch, t frames, d model dim, f ffn dim, k conv kernel.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

from models.frontend import SinusoidalPositions, lengths_to_padding_mask
from models.mixers import MIXERS, TokenMixer, build_mixer

if TYPE_CHECKING:
    from models.config import EncoderConfig, MixerSpec
    from models.frontend import ConvSubsampling, FilterbankFeatures, GlobalNormalizer


def xavier_normal_init_(module: nn.Module) -> nn.Module:
    """Xavier-normal on every parameter of ``module`` with more than one dimension (the released
    TransformerASR's ``_init_params``: linear and convolution weights, relative-position biases);
    vectors (biases, LayerNorm gains) keep their values. Returns ``module``."""
    for parameter in module.parameters():
        if parameter.dim() > 1:
            nn.init.xavier_normal_(parameter)
    return module


def _zero_padded(x: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
    return x if padding_mask is None else x.masked_fill(padding_mask.unsqueeze(-1), 0.0)


class FeedForward(nn.Module):
    """``LayerNorm -> Linear(d, f) -> GELU -> Dropout -> Linear(f, d) -> Dropout``; ``(b, t, d) -> (b, t, d)``."""

    def __init__(self, model_dim: int, ffn_dim: int, dropout_p: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(model_dim)
        self.inner = nn.Linear(model_dim, ffn_dim)
        self.activation = nn.GELU()
        self.inner_dropout = nn.Dropout(dropout_p)
        self.outer = nn.Linear(ffn_dim, model_dim)
        self.outer_dropout = nn.Dropout(dropout_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(b, t, d) -> (b, t, d)``."""
        x = self.inner_dropout(self.activation(self.inner(self.norm(x))))  # (b, t, f)
        return self.outer_dropout(self.outer(x))


class ConvModule(nn.Module):
    """Conformer convolution module.

    ``LayerNorm -> pointwise Conv1d(d, 2d) -> GLU -> depthwise Conv1d(k) -> LayerNorm -> GELU ->
    Linear(d, d) -> Dropout``. Padded frames are zeroed before the depthwise convolution, so real
    frames near the end of an utterance see zeros exactly as they would without padding.

    Args:
        model_dim: ``d``.
        kernel_size: ``k``, odd (the convolution is centred: ``k // 2`` frames each side).
        dropout_p: output dropout.
    """

    def __init__(self, model_dim: int, kernel_size: int, dropout_p: float) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"conv kernel_size must be odd and >= 1, got {kernel_size}")
        self.norm = nn.LayerNorm(model_dim)
        self.pointwise = nn.Conv1d(model_dim, 2 * model_dim, kernel_size=1)
        self.glu = nn.GLU(dim=1)
        self.depthwise = nn.Conv1d(
            model_dim, model_dim, kernel_size=kernel_size, padding=kernel_size // 2, groups=model_dim
        )
        self.depthwise_norm = nn.LayerNorm(model_dim)
        self.activation = nn.GELU()
        self.out = nn.Linear(model_dim, model_dim)
        self.dropout = nn.Dropout(dropout_p)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Convolve.

        Args:
            x: ``(b, t, d)``.
            padding_mask: ``(b, t)`` bool, ``True`` at padded frames (or ``None``).

        Returns:
            ``(b, t, d)``.
        """
        x = self.norm(x).transpose(1, 2)  # (b, d, t): Conv1d wants channels first
        x = self.glu(self.pointwise(x))  # (b, 2d, t) -> (b, d, t)
        if padding_mask is not None:
            x = x.masked_fill(padding_mask.unsqueeze(1), 0.0)
        x = self.depthwise(x).transpose(1, 2)  # (b, t, d)
        return self.dropout(self.out(self.activation(self.depthwise_norm(x))))


class ConformerBlock(nn.Module):
    """One macaron Conformer layer, assembled from injected modules.

    ::

        x = x + 0.5 * ffn1(x)
        x = x + Dropout(mixer(LayerNorm(x), padding_mask))    Dropout only with mixer_dropout
        x = x + conv(x, padding_mask)
        x = LayerNorm(x + 0.5 * ffn2(x))        padded frames zeroed

    Args:
        ffn1, ffn2: the two half-step feed-forward modules.
        mixer: any token mixer of the registry (the one contract of :class:`TokenMixer`).
        conv: the convolution module.
        dropout_p: dropout on the mixer's output.
        mixer_dropout: whether to apply it (the released Conformer layer does not: ``False``).
        mixer_name: registry name of ``mixer`` (for parameter reports); looked up when omitted.
    """

    def __init__(
        self,
        ffn1: FeedForward,
        mixer: TokenMixer,
        conv: ConvModule,
        ffn2: FeedForward,
        *,
        dropout_p: float,
        mixer_dropout: bool = True,
        mixer_name: str | None = None,
    ) -> None:
        super().__init__()
        model_dim = mixer.model_dim
        self.ffn1 = ffn1
        self.mixer_norm = nn.LayerNorm(model_dim)
        self.mixer = mixer
        self.mixer_dropout = nn.Dropout(dropout_p) if mixer_dropout else nn.Identity()
        self.conv = conv
        self.ffn2 = ffn2
        self.final_norm = nn.LayerNorm(model_dim)
        self.mixer_name = mixer_name or _registry_name(mixer)

    def extra_repr(self) -> str:
        return f"mixer_name={self.mixer_name!r}"

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        """Apply the layer.

        Args:
            x: ``(b, t, d)``.
            padding_mask: ``(b, t)`` bool, ``True`` at padded frames.

        Returns:
            ``(b, t, d)``, zero at padded frames.
        """
        x = x + 0.5 * self.ffn1(x)
        x = x + self.mixer_dropout(self.mixer(self.mixer_norm(x), padding_mask))
        x = x + self.conv(x, padding_mask)
        x = self.final_norm(x + 0.5 * self.ffn2(x))
        return _zero_padded(x, padding_mask)


def _registry_name(mixer: nn.Module) -> str:
    for name, cls in MIXERS.items():
        if type(mixer) is cls:
            return name
    return type(mixer).__name__


def build_conformer_block(
    spec: MixerSpec, *, model_dim: int, ffn_dim: int, conv_kernel: int, dropout_p: float, mixer_dropout: bool = True
) -> ConformerBlock:
    """The one factory of Conformer layers: the mixer comes from the registry by ``spec``."""
    return ConformerBlock(
        FeedForward(model_dim, ffn_dim, dropout_p),
        build_mixer(spec.name, model_dim, **spec.options),
        ConvModule(model_dim, conv_kernel, dropout_p),
        FeedForward(model_dim, ffn_dim, dropout_p),
        dropout_p=dropout_p,
        mixer_dropout=mixer_dropout,
        mixer_name=spec.name,
    )


def uses_absolute_positions(positional: str, mixer_names: tuple[str, ...]) -> bool:
    """Whether the encoder adds sinusoidal positions: ``"absolute"``, ``"none"`` or ``"auto"``
    (when any layer's mixer has ``positional == "absolute"``)."""
    if positional == "absolute":
        return True
    if positional == "none":
        return False
    if positional == "auto":
        return any(MIXERS[name].positional == "absolute" for name in mixer_names)
    raise ValueError(f"positional must be 'auto', 'absolute' or 'none', got {positional!r}")


class ConformerEncoder(nn.Module):
    """A stack of Conformer layers built from a per-layer mixer plan, then a final LayerNorm.

    Args:
        config: the encoder section (width, depth, ffn, conv kernel, dropout, mixer-output dropout,
            init, one MixerSpec per layer).
        positional: ``"absolute"``, ``"none"`` or ``"auto"`` (add sinusoidal positions to the input
            when any layer's mixer asks for them; relative/rotary attention encodes its own).
    """

    def __init__(self, config: EncoderConfig, *, positional: str = "auto") -> None:
        super().__init__()
        self.model_dim = config.model_dim
        self.positions = (
            SinusoidalPositions(config.model_dim) if uses_absolute_positions(positional, config.mixer_names) else None
        )
        self.blocks = nn.ModuleList(
            build_conformer_block(
                spec,
                model_dim=config.model_dim,
                ffn_dim=config.ffn_dim,
                conv_kernel=config.conv_kernel,
                dropout_p=config.dropout_p,
                mixer_dropout=config.mixer_dropout,
            )
            for spec in config.layers
        )
        self.final_norm = nn.LayerNorm(config.model_dim, eps=1e-6)  # the released ConformerEncoder's eps
        if config.init == "xavier_normal":
            xavier_normal_init_(self)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encode.

        Args:
            x: ``(b, t, d)`` front-end output.
            padding_mask: ``(b, t)`` bool, ``True`` at padded frames; ``None`` = no padding.

        Returns:
            ``(b, t, d)``, zero at padded frames.
        """
        if x.dim() != 3 or x.shape[-1] != self.model_dim:
            raise ValueError(f"x must have shape (batch, time, {self.model_dim}), got {tuple(x.shape)}")
        if padding_mask is None:
            padding_mask = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
        elif padding_mask.shape != x.shape[:2] or padding_mask.dtype != torch.bool:
            raise ValueError(
                f"padding_mask must be a bool tensor of shape {tuple(x.shape[:2])}, "
                f"got {padding_mask.dtype} {tuple(padding_mask.shape)}"
            )
        x = _zero_padded(x, padding_mask)
        if self.positions is not None:
            x = _zero_padded(self.positions(x), padding_mask)
        for block in self.blocks:
            x = block(x, padding_mask)
        return _zero_padded(self.final_norm(x), padding_mask)


class SpeechEncoderMixin:
    """Waveform -> encoder frames, shared by the pre-training and fine-tuning models.

    Both models own the same four submodules under the same names (``features``, ``normalizer``,
    ``frontend``, ``encoder``), so a pre-trained state dict loads into the fine-tuning model.
    """

    features: FilterbankFeatures
    normalizer: GlobalNormalizer
    frontend: ConvSubsampling
    encoder: ConformerEncoder

    @torch.no_grad()
    def estimate_normalizer(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> GlobalNormalizer:
        """Estimate the normaliser's statistics from ``(wave (b, s), wave_lengths (b,))`` batches
        (padding excluded); returns the normaliser. For several workers, all-reduce
        :meth:`GlobalNormalizer.statistics` sums instead."""
        return self.normalizer.estimate(self.features(wave, lengths) for wave, lengths in batches)

    def featurize(self, wave: torch.Tensor, wave_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(b, s)`` waveforms -> normalised ``(b, t, n)`` features and ``(b,)`` frame lengths."""
        with torch.no_grad():
            features, lengths = self.features(wave, wave_lengths)
        return self.normalizer(features, lengths), lengths

    def encode_features(
        self, features: torch.Tensor, feature_lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised ``(b, t, n)`` features -> ``(b, t', d)`` encoder output, ``(b,)`` lengths,
        ``(b, t')`` padding mask."""
        x, lengths = self.frontend(features, feature_lengths)
        padding_mask = lengths_to_padding_mask(lengths, x.shape[1])
        return self.encoder(x, padding_mask), lengths, padding_mask

    def encode(self, wave: torch.Tensor, wave_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(b, s)`` waveforms -> ``(b, t', d)`` encoder output and ``(b,)`` lengths (no masking)."""
        features, lengths = self.featurize(wave, wave_lengths)
        encoded, lengths, _ = self.encode_features(features, lengths)
        return encoded, lengths


__all__ = [
    "ConformerBlock",
    "ConformerEncoder",
    "ConvModule",
    "FeedForward",
    "SpeechEncoderMixin",
    "build_conformer_block",
    "uses_absolute_positions",
    "xavier_normal_init_",
]

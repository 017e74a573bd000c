"""Log-mel features, global mean/variance normalisation, conv subsampling and sinusoidal positions.

Dimensions: b batch, s samples, t fbank frames, t' encoder frames (t / 4), n mels, c channels,
d model dim.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
import torchaudio
from torch import nn

from models.mixers.base import needs_autograd


def lengths_to_padding_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """``(b,)`` lengths -> ``(b, max_len)`` bool mask, ``True`` at padded frames."""
    positions = torch.arange(max_len, device=lengths.device)
    return positions[None, :] >= lengths[:, None]


def _check_lengths(name: str, lengths: torch.Tensor, batch: int) -> None:
    # Shape and dtype only: checking values would synchronise the GPU every step.
    if lengths.dim() != 1 or lengths.shape[0] != batch:
        raise ValueError(f"{name} must have shape ({batch},), got {tuple(lengths.shape)}")
    if lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {lengths.dtype}")


FBANK_KINDS: tuple[str, ...] = ("unpadded", "speechbrain")


def speechbrain_mel_filters(n_freqs: int, n_mels: int, sample_rate: int, f_min: float = 0.0, f_max: float | None = None) -> torch.Tensor:
    """SpeechBrain ``Filterbank``'s triangular filters, ``(n_freqs, n)``.

    ``n + 2`` points evenly spaced on the HTK mel scale (``2595 log10(1 + f / 700)``) over
    ``[f_min, f_max]``; filter ``i`` is centred on point ``i + 1`` and falls to zero at
    ``centre -/+ band``, ``band`` the gap to point ``i`` (symmetric in Hz, unlike the HTK
    triangles that reach the next centre); frequencies ``linspace(0, sample_rate // 2, n_freqs)``.
    """
    f_max = sample_rate / 2 if f_max is None else f_max
    to_mel = lambda hz: 2595.0 * math.log10(1.0 + hz / 700.0)  # noqa: E731
    mel = torch.linspace(to_mel(f_min), to_mel(f_max), n_mels + 2, dtype=torch.float64)
    hz = 700.0 * (10.0 ** (mel / 2595.0) - 1.0)  # (n + 2,)
    centre, band = hz[1:-1], hz[1:-1] - hz[:-2]  # (n,)
    freqs = torch.linspace(0, sample_rate // 2, n_freqs, dtype=torch.float64)  # (n_freqs,)
    slope = (freqs[:, None] - centre[None, :]) / band[None, :]  # (n_freqs, n)
    return torch.clamp(torch.minimum(1.0 + slope, 1.0 - slope), min=0.0).float()


class FilterbankFeatures(nn.Module):
    """80-dim log-mel filterbank, batched, with lengths (no parameters, nothing in the state dict).

    ``kind="unpadded"``: power spectrogram of a Hann window, ``window = n_fft`` samples, HTK mel
    filters over ``[0, sample_rate / 2]``, then ``log(mel + floor)``. Frames are taken without
    centre padding (``t = 1 + (s - window) // hop``), so every real frame lies inside its utterance.

    ``kind="speechbrain"``: SpeechBrain's ``Fbank`` (the released code's features): frames centred
    on every hop over zero padding (``t = 1 + s // hop``), a Hamming window, power spectrum,
    :func:`speechbrain_mel_filters`, ``10 log10(max(mel, 1e-10))``, then everything below the
    utterance's maximum minus 80 dB raised to it (the maximum over its real frames, so padding
    never changes it; SpeechBrain takes it over the padded sequence, where padded frames sit at
    -100 dB). Samples beyond each length are zeroed first.

    Either way a padded batch gives each utterance exactly the frames it gets alone. Always
    computed in float32.

    Args:
        sample_rate: Hz.
        n_mels: ``n``.
        win_length: window (and FFT) length in samples (400 = 25 ms at 16 kHz).
        hop_length: hop in samples (160 = 10 ms at 16 kHz).
        log_floor: added to the mel energies before the log (``"unpadded"``).
        kind: ``"unpadded"`` (default) or ``"speechbrain"``.
        top_db: dynamic range kept below each utterance's maximum (``"speechbrain"``).
    """

    amin: float = 1e-10
    """SpeechBrain's floor of the mel energies before ``10 log10``."""

    def __init__(
        self,
        *,
        sample_rate: int = 16000,
        n_mels: int = 80,
        win_length: int = 400,
        hop_length: int = 160,
        log_floor: float = 1e-6,
        kind: str = "unpadded",
        top_db: float = 80.0,
    ) -> None:
        super().__init__()
        if hop_length < 1 or win_length < hop_length:
            raise ValueError(f"need 1 <= hop_length <= win_length, got hop_length={hop_length}, win_length={win_length}")
        if kind not in FBANK_KINDS:
            raise ValueError(f"kind must be one of {FBANK_KINDS}, got {kind!r}")
        self.kind = kind
        self.top_db = float(top_db)
        self.sample_rate = sample_rate
        self.n_mels = n_mels
        self.win_length = win_length
        self.hop_length = hop_length
        self.log_floor = log_floor
        # Deterministic functions of the arguments: kept out of the state dict.
        window = torch.hamming_window if kind == "speechbrain" else torch.hann_window
        self.register_buffer("window", window(win_length), persistent=False)
        with torch.device("cpu"):  # torchaudio inspects values: not possible on the meta device
            if kind == "speechbrain":
                fbank = speechbrain_mel_filters(win_length // 2 + 1, n_mels, sample_rate)
            else:
                fbank = torchaudio.functional.melscale_fbanks(
                    n_freqs=win_length // 2 + 1,
                    f_min=0.0,
                    f_max=sample_rate / 2,
                    n_mels=n_mels,
                    sample_rate=sample_rate,
                    norm=None,
                    mel_scale="htk",
                )  # (win/2 + 1, n)
        self.register_buffer("mel_fbank", fbank.to(torch.get_default_device()), persistent=False)

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind!r}, sample_rate={self.sample_rate}, n_mels={self.n_mels}, "
            f"win_length={self.win_length}, hop_length={self.hop_length}"
        )

    def output_lengths(self, wave_lengths: torch.Tensor) -> torch.Tensor:
        """Frames of a ``wave_lengths``-sample waveform: ``1 + (s - window) // hop`` (0 if shorter),
        ``1 + s // hop`` for centred (``"speechbrain"``) frames."""
        if self.kind == "speechbrain":
            return torch.div(wave_lengths, self.hop_length, rounding_mode="floor") + 1
        frames = torch.div(wave_lengths - self.win_length, self.hop_length, rounding_mode="floor") + 1
        return frames.clamp_min(0)

    def forward(self, wave: torch.Tensor, wave_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Compute features.

        Args:
            wave: ``(b, s)`` waveforms, zero-padded on the right.
            wave_lengths: ``(b,)`` number of real samples of each waveform.

        Returns:
            features: ``(b, t, n)`` log-mel features, zero at padded frames.
            lengths: ``(b,)`` number of real frames.
        """
        if wave.dim() != 2:
            raise ValueError(f"wave must have shape (batch, samples), got {tuple(wave.shape)}")
        _check_lengths("wave_lengths", wave_lengths, wave.shape[0])
        if self.kind == "speechbrain":
            return self._speechbrain(wave, wave_lengths)
        if wave.shape[1] < self.win_length:
            raise ValueError(
                f"waveforms must have at least {self.win_length} samples (one analysis window), "
                f"got {wave.shape[1]}"
            )
        lengths = self.output_lengths(wave_lengths)
        with torch.autocast(device_type=wave.device.type, enabled=False):
            spec = torch.stft(
                wave.float(),
                n_fft=self.win_length,
                hop_length=self.hop_length,
                win_length=self.win_length,
                window=self.window.float(),
                center=False,
                return_complex=True,
            )  # (b, win/2 + 1, t)
            power = spec.real.square() + spec.imag.square()
            mel = torch.matmul(power.transpose(1, 2), self.mel_fbank.float())  # (b, t, n)
            features = torch.log(mel + self.log_floor)
        pad = lengths_to_padding_mask(lengths, features.shape[1])
        return features.masked_fill(pad.unsqueeze(-1), 0.0), lengths

    def _speechbrain(self, wave: torch.Tensor, wave_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``"speechbrain"`` features (see the class docstring)."""
        lengths = self.output_lengths(wave_lengths)
        with torch.autocast(device_type=wave.device.type, enabled=False):
            wave = wave.float().masked_fill(lengths_to_padding_mask(wave_lengths, wave.shape[1]), 0.0)
            spec = torch.stft(
                wave,
                n_fft=self.win_length,
                hop_length=self.hop_length,
                win_length=self.win_length,
                window=self.window.float(),
                center=True,
                pad_mode="constant",
                return_complex=True,
            )  # (b, win/2 + 1, t)
            power = spec.real.square() + spec.imag.square()
            mel = torch.matmul(power.transpose(1, 2), self.mel_fbank.float())  # (b, t, n)
            features = 10.0 * torch.log10(mel.clamp_min(self.amin))
            pad = lengths_to_padding_mask(lengths, features.shape[1])
            peak = features.masked_fill(pad.unsqueeze(-1), float("-inf")).amax(dim=(1, 2))  # (b,)
            features = torch.maximum(features, (peak - self.top_db)[:, None, None])
        return features.masked_fill(pad.unsqueeze(-1), 0.0), lengths


class GlobalNormalizer(nn.Module):
    """Global per-channel mean/variance normalisation with its statistics in the state dict.

    ``mean``, ``std`` (both ``(n,)``) and ``count`` (frames the statistics were estimated on) are
    buffers, so they are saved with pre-training checkpoints and reused in fine-tuning. Before any
    estimate the normaliser is the identity (``mean = 0``, ``std = 1``, ``count = 0``).

    Estimating: :meth:`estimate` on an iterable of ``(features, lengths)`` batches; in distributed
    training, sum :meth:`statistics` over batches and workers (all-reduce) and pass the totals to
    :meth:`set_statistics`. Padding is always excluded.

    Args:
        num_channels: ``n``.
        std_floor: lower bound of ``std`` (constant channels, e.g. digital silence).
    """

    def __init__(self, num_channels: int, *, std_floor: float = 1e-5) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.std_floor = std_floor
        self.register_buffer("mean", torch.zeros(num_channels))
        self.register_buffer("std", torch.ones(num_channels))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        return f"num_channels={self.num_channels}, count={int(self.count)}"

    @property
    def is_fitted(self) -> bool:
        """Whether statistics have been estimated."""
        return bool(self.count > 0)

    @staticmethod
    def statistics(features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Summable float64 counters of real frames: ``(sum (n,), sum of squares (n,), count ())``."""
        real = ~lengths_to_padding_mask(lengths, features.shape[1])  # (b, t)
        x = features.detach().double()[real]  # (frames, n)
        return x.sum(0), x.square().sum(0), torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device)

    @torch.no_grad()
    def set_statistics(self, total: torch.Tensor, total_sq: torch.Tensor, count: torch.Tensor | float) -> None:
        """Set ``mean``/``std`` from summed counters (see :meth:`statistics`)."""
        count = float(count)
        if count <= 0:
            raise ValueError("cannot set normalisation statistics from zero frames")
        mean = total.double() / count
        var = (total_sq.double() / count - mean.square()).clamp_min(0.0)
        self.mean.copy_(mean)
        self.std.copy_(var.sqrt().clamp_min(self.std_floor))
        self.count.fill_(int(count))

    def estimate(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> GlobalNormalizer:
        """Estimate the statistics from ``(features (b, t, n), lengths (b,))`` batches; returns self."""
        total = total_sq = count = None
        for features, lengths in batches:
            s, sq, c = self.statistics(features, lengths)
            total, total_sq, count = (s, sq, c) if total is None else (total + s, total_sq + sq, count + c)
        if total is None:
            raise ValueError("GlobalNormalizer.estimate got no batches")
        self.set_statistics(total, total_sq, count)
        return self

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Normalise.

        Args:
            features: ``(b, t, n)``.
            lengths: ``(b,)`` real frames.

        Returns:
            ``(b, t, n)`` float32, ``(x - mean) / std`` at real frames and 0 at padded frames.
        """
        if features.dim() != 3 or features.shape[-1] != self.num_channels:
            raise ValueError(f"features must have shape (batch, time, {self.num_channels}), got {tuple(features.shape)}")
        x = (features.float() - self.mean.float()) / self.std.float()
        pad = lengths_to_padding_mask(lengths, features.shape[1])
        return x.masked_fill(pad.unsqueeze(-1), 0.0)


FRONTEND_NORMS: tuple[str, ...] = ("channels", "channels_freq")


class _ConvBlock(nn.Module):
    """Conv2d 3x3 stride 2 -> LayerNorm -> LeakyReLU -> Dropout, on ``(b, c, t, n)``.

    The LayerNorm normalises the channels of each time-frequency point (``norm="channels"``) or
    the whole frequency x channel plane of each frame (``"channels_freq"``, SpeechBrain's
    ``ConvolutionFrontEnd``; ``out_freq`` is then the block's output frequency size).
    """

    def __init__(
        self, in_channels: int, out_channels: int, dropout_p: float, norm: str = "channels", out_freq: int | None = None
    ) -> None:
        super().__init__()
        if norm not in FRONTEND_NORMS:
            raise ValueError(f"norm must be one of {FRONTEND_NORMS}, got {norm!r}")
        if norm == "channels_freq" and not out_freq:
            raise ValueError("norm='channels_freq' needs the block's output frequency size out_freq")
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1)
        self.norm = nn.LayerNorm(out_channels if norm == "channels" else (out_freq, out_channels))
        self.activation = nn.LeakyReLU()
        self.dropout = nn.Dropout(dropout_p)

    inference_chunk: int = 256
    """Frames per LayerNorm chunk of the in-place inference path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and not needs_autograd(self, x):
            return self._forward_inference(x)
        x = self.conv(x).permute(0, 2, 3, 1)  # (b, t, n, c): LayerNorm over c, or over (n, c)
        x = self.dropout(self.activation(self.norm(x)))
        return x.permute(0, 3, 1, 2)  # (b, c, t, n)

    def _forward_inference(self, x: torch.Tensor) -> torch.Tensor:
        """The same maths in the conv output's own memory (the front-end is the peak at 80 s).

        The convolution writes channels-last, so ``(b, t, n, c)`` is a contiguous view of its
        output; LayerNorm runs over time chunks written back in place and LeakyReLU is in place:
        one block holds one ``(b, c, t, n)`` activation instead of three.
        """
        y = self.conv(x.contiguous(memory_format=torch.channels_last))
        z = y.permute(0, 2, 3, 1)  # (b, t, n, c)
        if not z.is_contiguous():  # a backend that ignored channels-last
            z = z.contiguous()
        for start in range(0, z.shape[1], self.inference_chunk):
            part = z[:, start : start + self.inference_chunk]
            part.copy_(self.norm(part))
        return F.leaky_relu_(z, self.activation.negative_slope).permute(0, 3, 1, 2)  # (b, c, t, n)


class ConvSubsampling(nn.Module):
    """Convolutional front-end: ``len(channels)`` stride-2 conv blocks, flatten, Linear -> d.

    Each block halves time and frequency (``ceil``): 4x time subsampling (40 ms frames) with the
    default two blocks. Frames beyond each utterance's length are zeroed between blocks, so the
    real frames never see padding (padding invariance).

    Args:
        in_features: ``n`` input channels (mels).
        channels: output channels of each conv block, e.g. ``(128, 32)``.
        model_dim: ``d``.
        dropout_p: dropout after each block.
        norm: ``"channels"`` (default) or ``"channels_freq"`` (see :class:`_ConvBlock`).
        proj_dropout_p: dropout after the Linear projection (the released code: the encoder's 0.1).
    """

    def __init__(
        self,
        in_features: int,
        channels: Sequence[int],
        model_dim: int,
        dropout_p: float,
        *,
        norm: str = "channels",
        proj_dropout_p: float = 0.0,
    ) -> None:
        super().__init__()
        if not channels:
            raise ValueError("channels must name at least one conv block")
        self.in_features = in_features
        self.channels = tuple(channels)
        ins = (1,) + self.channels[:-1]
        freqs = []
        freq = in_features
        for _ in self.channels:
            freq = (freq + 1) // 2
            freqs.append(freq)
        self.blocks = nn.ModuleList(
            _ConvBlock(i, o, dropout_p, norm=norm, out_freq=f) for i, o, f in zip(ins, self.channels, freqs)
        )
        self.out_features = self.channels[-1] * freq
        self.proj = nn.Linear(self.out_features, model_dim)
        self.proj_dropout = nn.Dropout(proj_dropout_p)

    @property
    def subsampling_factor(self) -> int:
        """Input frames per output frame."""
        return 2 ** len(self.blocks)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """``ceil(t / 2)`` once per block."""
        for _ in self.blocks:
            lengths = torch.div(lengths + 1, 2, rounding_mode="floor")
        return lengths

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Subsample.

        Args:
            features: ``(b, t, n)``.
            lengths: ``(b,)`` real frames.

        Returns:
            x: ``(b, t', d)``, zero at padded frames.
            lengths: ``(b,)`` real encoder frames, ``ceil(t / 2)`` per block.
        """
        if features.dim() != 3 or features.shape[-1] != self.in_features:
            raise ValueError(f"features must have shape (batch, time, {self.in_features}), got {tuple(features.shape)}")
        pad = lengths_to_padding_mask(lengths, features.shape[1])
        x = features.masked_fill(pad.unsqueeze(-1), 0.0).unsqueeze(1)  # (b, 1, t, n)
        for block in self.blocks:
            x = block(x)  # (b, c, t/2, n/2)
            lengths = torch.div(lengths + 1, 2, rounding_mode="floor")
            pad = lengths_to_padding_mask(lengths, x.shape[2])
            if x.requires_grad:
                x = x.masked_fill(pad[:, None, :, None], 0.0)
            else:  # inference: the block's output is ours to overwrite
                x.masked_fill_(pad[:, None, :, None], 0.0)
        x = x.transpose(1, 2).flatten(2)  # (b, t', c * n'): channel-major flatten
        x = self.proj_dropout(self.proj(x)).masked_fill(pad.unsqueeze(-1), 0.0)  # (b, t', d)
        return x, lengths


def sinusoidal_positions(length: int, dim: int, *, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(length, dim)`` table: ``pe[p, 2i] = sin(p / 10000^(2i/dim))``, ``pe[p, 2i+1] = cos(...)``."""
    positions = torch.arange(length, device=device, dtype=torch.float64)[:, None]  # (t, 1)
    inv_freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float64) * (-math.log(10000.0) / dim))
    angles = positions * inv_freq  # (t, ceil(dim/2))
    table = torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1)[:, :dim]  # interleaved
    return table.to(dtype)


class SinusoidalPositions(nn.Module):
    """Adds absolute sinusoidal positions (Vaswani et al. 2017) to ``(b, t, d)`` inputs."""

    def __init__(self, model_dim: int) -> None:
        super().__init__()
        self.model_dim = model_dim

    def extra_repr(self) -> str:
        return f"model_dim={self.model_dim}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(b, t, d) -> (b, t, d)``: ``x + pe[:t]``."""
        return x + sinusoidal_positions(x.shape[1], self.model_dim, device=x.device, dtype=x.dtype)


__all__ = [
    "ConvSubsampling",
    "FilterbankFeatures",
    "GlobalNormalizer",
    "SinusoidalPositions",
    "lengths_to_padding_mask",
    "sinusoidal_positions",
    "speechbrain_mel_filters",
]

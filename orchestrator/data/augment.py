"""Fine-tuning augmentation: speed perturbation, DropFreq and DropChunk on waves, SpecAugment on
features.

Dimensions: b batch, s audio samples, t feature frames, f feature channels (mel bins).

Every module runs on the collated batch inside the loop (on its device), is seeded from
:class:`AugmentConfig` (and the rank), and is an identity in ``eval()``. Its random generator
state is part of ``module.state_dict()`` (the ``_extra_state`` entry), so a resumed run draws
the same augmentations as an uninterrupted one.

Order in a fine-tuning step (:class:`WaveAugment` is the first three, in sequence)::

    waves, wave_lengths = speed_perturb(batch["waves"], batch["wave_lengths"])   # (b, s'), (b,)
    waves = drop_freq(waves, wave_lengths)                                      # (b, s')
    waves = drop_chunk(waves, wave_lengths)                                     # (b, s')
    waves, wave_lengths = cat([waves, clean]) if concat_clean                   # (2b, s''), (2b,)
    feats, frame_lengths = fbank(waves, wave_lengths)                           # (.., t, f), (..,)
    feats = spec_augment(feats, frame_lengths)                                  # (.., t, f)

The paper's released recipe is the wave chain with the clean batch concatenated (speed
{95, 100, 105} %, DropFreq 1-3 bands of width 0.05, DropChunk 1-5 chunks of 1000-2000 samples)
and no SpecAugment; the defaults here are the earlier speed {0.9, 1.1} + SpecAugment LD policy.

Speed factors below 1 lengthen the audio (0.9 -> +11 %): leave that headroom in the sampler's
``max_batch_seconds``, which counts the original durations.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torchaudio
from torch import nn

__all__ = ["AugmentConfig", "DropChunk", "DropFreq", "SpecAugment", "SpeedPerturb", "WaveAugment"]


@dataclass(frozen=True, kw_only=True)
class AugmentConfig:
    """Fine-tuning augmentation settings. Zero masks, or ``speed_factors=(1.0,)``, turn a part off."""

    speed_factors: tuple[float, ...] = (0.9, 1.0, 1.1)
    """Speed factors; each utterance draws one uniformly (> 1 is faster and shorter)."""

    num_freq_masks: int = 2
    """Frequency masks per utterance (SpecAugment LD policy: 2)."""

    freq_mask_width: int = 27
    """Largest frequency-mask width in channels; each width is drawn from 0..this (LD: 27 of 80)."""

    num_time_masks: int = 2
    """Time masks per utterance (LD: 2)."""

    time_mask_width: int = 100
    """Largest time-mask width in frames, 10 ms each (LD: 100)."""

    time_mask_max_ratio: float = 0.2
    """Cap on one time mask as a fraction of the utterance's real length, so short utterances are
    not wiped out (SpecAugment's p; the LD policy uses 1.0)."""

    mask_value: float = 0.0
    """Value written into masked features; 0 is the mean of the globally normalised features."""

    drop_freq_bands: tuple[int, int] = (0, 0)
    """DropFreq: fewest and most frequency bands removed per utterance, each count equally
    likely (the paper: 1 to 3; ``(0, 0)`` = off)."""

    drop_freq_width: float = 0.05
    """DropFreq: width of each removed band as a fraction of the Nyquist frequency (the paper:
    0.05, 400 Hz at 16 kHz); band centres are uniform over (0, 1) of Nyquist."""

    drop_chunk_count: tuple[int, int] = (0, 0)
    """DropChunk: fewest and most chunks zeroed per utterance (the paper: 1 to 5; ``(0, 0)`` = off)."""

    drop_chunk_length: tuple[int, int] = (1000, 2000)
    """DropChunk: shortest and longest chunk in samples (the paper: 1000 to 2000)."""

    concat_clean: bool = False
    """Train on the augmented batch and the clean batch concatenated (the effective batch doubles;
    the paper: on)."""

    seed: int = 0
    """Seed of the augmentation generators (combined with the rank)."""

    def __post_init__(self) -> None:
        for name in ("speed_factors", "drop_freq_bands", "drop_chunk_count", "drop_chunk_length"):
            if isinstance(getattr(self, name), list):  # YAML gives lists; keep the config hashable
                object.__setattr__(self, name, tuple(getattr(self, name)))

    def validate(self) -> None:
        """Raises ``ValueError`` naming the first bad field."""

        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"AugmentConfig.{name}={getattr(self, name)!r}: {rule}")

        if not isinstance(self.speed_factors, tuple):
            raise bad("speed_factors", "must be a list of factors, e.g. [0.9, 1.0, 1.1]")
        if not self.speed_factors:
            raise bad("speed_factors", "needs at least one factor (use (1.0,) to turn speed perturbation off)")
        for f in self.speed_factors:
            if not (isinstance(f, (int, float)) and math.isfinite(f) and 0.5 <= f <= 2.0):
                raise bad("speed_factors", "every factor must be a number in [0.5, 2.0]")
        for name in ("num_freq_masks", "freq_mask_width", "num_time_masks", "time_mask_width", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise bad(name, "must be an int >= 0")
        if not (isinstance(self.time_mask_max_ratio, (int, float)) and 0.0 < self.time_mask_max_ratio <= 1.0):
            raise bad("time_mask_max_ratio", "must be in (0, 1]")
        if not (isinstance(self.mask_value, (int, float)) and math.isfinite(self.mask_value)):
            raise bad("mask_value", "must be a finite number")
        for name, least in (("drop_freq_bands", 0), ("drop_chunk_count", 0), ("drop_chunk_length", 1)):
            pair = getattr(self, name)
            if not (isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in pair)
                    and least <= pair[0] <= pair[1]):
                raise bad(name, f"must be [low, high], integers with {least} <= low <= high")
        if not (isinstance(self.drop_freq_width, (int, float)) and 0.0 < self.drop_freq_width <= 0.5):
            raise bad("drop_freq_width", "must be in (0, 0.5] (a fraction of the Nyquist frequency)")
        if not isinstance(self.concat_clean, bool):
            raise bad("concat_clean", "must be true or false")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> AugmentConfig:
        """Builds and validates a config; an unknown key raises and lists the valid ones."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ValueError(f"AugmentConfig: unknown key(s) {unknown}; valid keys: {names}")
        config = cls(**values)
        config.validate()
        return config


def _seeded_generator(seed: int, rank: int, salt: int) -> torch.Generator:
    g = torch.Generator()
    # Distinct, well-separated streams per (seed, rank, module).
    g.manual_seed((seed * 1_000_003 + rank * 7919 + salt) % (2**63))
    return g


class _SeededAugment(nn.Module):
    """A module with its own CPU generator, saved in ``state_dict()``."""

    def __init__(self, seed: int, rank: int, salt: int) -> None:
        super().__init__()
        self.generator = _seeded_generator(seed, rank, salt)

    def get_extra_state(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])

    def _rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=self.generator)


class SpecAugment(_SeededAugment):
    """Frequency and time masking of a padded feature batch, within each utterance's real frames.

    Each utterance gets ``num_freq_masks`` bands ``[f0, f0 + w)`` with ``w`` uniform in
    ``0..freq_mask_width`` and ``num_time_masks`` spans ``[t0, t0 + w)`` with ``w`` uniform in
    ``0..min(time_mask_width, floor(time_mask_max_ratio * length))``, placed so that
    ``t0 + w <= length``. Padded frames are never touched, so the batch's padding stays exactly
    what the encoder expects. (``torchaudio.functional.mask_along_axis_iid`` draws positions over
    the padded length and from the global RNG; the sampling here is the same, per utterance
    length and from the module's own generator.)

    Args:
        config: the augmentation settings (validated here).
        rank: DDP rank, so that ranks draw different masks.
    """

    def __init__(self, config: AugmentConfig, *, rank: int = 0) -> None:
        config.validate()
        super().__init__(config.seed, rank, salt=1)
        self.config = config

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"freq_masks={c.num_freq_masks}x{c.freq_mask_width}, time_masks={c.num_time_masks}x{c.time_mask_width}, "
            f"time_mask_max_ratio={c.time_mask_max_ratio}"
        )

    def masks(self, lengths: torch.Tensor, num_frames: int, num_channels: int) -> torch.Tensor:
        """Draws the masks of one batch.

        Args:
            lengths: (b,) real frames per utterance.
            num_frames: t, the padded length.
            num_channels: f.

        Returns:
            (b, t, f) bool, True = masked; always False on padded frames.
        """
        c = self.config
        b = lengths.shape[0]
        lengths = lengths.detach().to("cpu", torch.long).clamp(0, num_frames)  # (b,)
        frames = torch.arange(num_frames)  # (t,)
        channels = torch.arange(num_channels)  # (f,)
        freq = torch.zeros(b, num_channels, dtype=torch.bool)  # (b, f)
        width_max = min(c.freq_mask_width, num_channels)
        for _ in range(c.num_freq_masks):
            w = (self._rand(b) * (width_max + 1)).long()  # (b,) in 0..width_max
            f0 = (self._rand(b) * (num_channels - w + 1)).long()  # (b,) in 0..f-w
            freq |= (channels >= f0[:, None]) & (channels < (f0 + w)[:, None])
        time = torch.zeros(b, num_frames, dtype=torch.bool)  # (b, t)
        per_utt_max = torch.clamp(
            torch.floor(lengths.double() * c.time_mask_max_ratio).long(), max=c.time_mask_width
        )  # (b,)
        for _ in range(c.num_time_masks):
            w = (self._rand(b).double() * (per_utt_max + 1)).long()  # (b,) in 0..per_utt_max
            t0 = (self._rand(b).double() * (lengths - w + 1)).long()  # (b,) in 0..length-w
            time |= (frames >= t0[:, None]) & (frames < (t0 + w)[:, None])
        real = frames[None, :] < lengths[:, None]  # (b, t)
        return (time[:, :, None] | freq[:, None, :]) & real[:, :, None]  # (b, t, f)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Masks ``features`` in training; returns them unchanged (the same tensor) in eval.

        Args:
            features: (b, t, f) padded features.
            lengths: (b,) real frames per utterance; None = all ``t`` frames are real.

        Returns:
            (b, t, f) masked features.
        """
        if features.dim() != 3:
            raise ValueError(f"SpecAugment expects features (batch, time, channels), got shape {tuple(features.shape)}")
        if not self.training or (self.config.num_freq_masks == 0 and self.config.num_time_masks == 0):
            return features
        b, t, f = features.shape
        if lengths is None:
            lengths = torch.full((b,), t, dtype=torch.long)
        if lengths.shape != (b,):
            raise ValueError(f"SpecAugment: lengths has shape {tuple(lengths.shape)}, expected ({b},)")
        mask = self.masks(lengths, t, f).to(features.device)  # (b, t, f)
        return features.masked_fill(mask, self.config.mask_value)


class SpeedPerturb(_SeededAugment):
    """Speed perturbation of a padded wave batch, one factor per utterance, with new lengths.

    Each utterance draws a factor from ``config.speed_factors``; utterances sharing a factor are
    resampled together with ``torchaudio.functional.resample`` from ``round(factor * rate)`` to
    ``rate``, as ``torchaudio.transforms.Speed`` does (``SpeedPerturbation`` draws one factor for
    the whole batch from the global RNG, and ``Speed`` truncates ``factor * rate``, so 0.7 x 16000
    would become 11199 Hz and a 11199:16000 resampling kernel). The result is re-padded with
    zeros to the longest new length; the valid part of each row equals perturbing that utterance
    alone, and the new length is ``ceil(length / factor)`` in resampled samples.

    Args:
        config: the augmentation settings (validated here).
        sample_rate: the waves' sample rate.
        rank: DDP rank, so that ranks draw different factors.

    Raises:
        ValueError: a factor whose resampling ratio is not a small fraction (more than two
            decimals at 16 kHz), which would make resampling very slow.
    """

    def __init__(self, config: AugmentConfig, *, sample_rate: int = 16000, rank: int = 0) -> None:
        config.validate()
        super().__init__(config.seed, rank, salt=2)
        self.config = config
        self.sample_rate = sample_rate
        self.factors = config.speed_factors
        self.ratios: list[tuple[int, int]] = []  # (source, target) rates of each factor, reduced
        for f in self.factors:
            source = round(f * sample_rate)
            g = math.gcd(source, sample_rate)
            source, target = source // g, sample_rate // g
            if target > 100:
                raise ValueError(
                    f"SpeedPerturb: speed factor {f} at {sample_rate} Hz needs a {source}:{target} resampling "
                    "ratio, which is very slow; use factors with at most two decimals (e.g. 0.9, 1.0, 1.1)"
                )
            self.ratios.append((source, target))

    def extra_repr(self) -> str:
        return f"factors={self.factors}, sample_rate={self.sample_rate}"

    def forward(self, waves: torch.Tensor, lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Perturbs the speed of each utterance in training; identity in eval.

        Args:
            waves: (b, s) zero-padded waves.
            lengths: (b,) real samples per utterance; None = all ``s`` samples are real.

        Returns:
            ``(waves, lengths)``: (b, s') zero-padded perturbed waves and their (b,) int64
            lengths (in eval, the inputs unchanged, ``lengths`` filled in when None).
        """
        if waves.dim() != 2:
            raise ValueError(f"SpeedPerturb expects waves (batch, samples), got shape {tuple(waves.shape)}")
        b, s = waves.shape
        if lengths is None:
            lengths = torch.full((b,), s, dtype=torch.long, device=waves.device)
        if lengths.shape != (b,):
            raise ValueError(f"SpeedPerturb: lengths has shape {tuple(lengths.shape)}, expected ({b},)")
        if not self.training or all(f == 1.0 for f in self.factors):
            return waves, lengths
        lengths = lengths.long()
        choice = torch.randint(len(self.factors), (b,), generator=self.generator)  # (b,)
        parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (rows, waves, lengths)
        for k, (source, target) in enumerate(self.ratios):
            rows = (choice == k).nonzero().flatten().to(waves.device)
            if rows.numel() == 0:
                continue
            group_lengths = lengths[rows]  # (g,)
            # Only the group's own padding is kept: the output is as long as its longest row.
            group = waves[rows, : max(1, int(group_lengths.max()))]  # (g, s_g)
            if source != target:
                group = torchaudio.functional.resample(group, source, target)  # (g, ceil(s * target / source))
                group_lengths = (group_lengths * target + source - 1) // source  # ceil, in integers
            parts.append((rows, group, group_lengths))
        new_s = max(int(g.shape[1]) for _, g, _ in parts)
        out = waves.new_zeros(b, new_s)  # (b, s')
        new_lengths = torch.empty(b, dtype=torch.long, device=waves.device)
        for rows, group, group_lengths in parts:
            out[rows, : group.shape[1]] = group
            new_lengths[rows] = group_lengths
        # Resampling smears the end of the signal into the padding: restore exact zeros there.
        out.masked_fill_(torch.arange(new_s, device=waves.device)[None, :] >= new_lengths[:, None], 0.0)
        return out, new_lengths


DROP_FREQ_TAPS = 401
"""Length of DropFreq's FIR band-stop filter. With a Hamming window the transition band is
about 3.3 / 401 of the sample rate (130 Hz at 16 kHz), narrow beside a 400 Hz band, so the
middle of the band is attenuated by about 50 dB."""


def band_stop_filter(low: float, high: float, taps: int = DROP_FREQ_TAPS) -> torch.Tensor:
    """A linear-phase FIR band-stop filter removing ``[low, high]`` (fractions of Nyquist).

    Windowed-sinc design: a unit impulse minus the band-pass ``lowpass(high) - lowpass(low)``,
    where ``lowpass(c)[n] = c * sinc(c * n)`` (unit gain below ``c`` of Nyquist), the band-pass
    tapered by a Hamming window. Returns (taps,) float32, symmetric, centred on ``taps // 2``.
    """
    n = torch.arange(taps, dtype=torch.float64) - (taps - 1) / 2  # (taps,)
    band = high * torch.sinc(high * n) - low * torch.sinc(low * n)
    kernel = -band * torch.hamming_window(taps, periodic=False, dtype=torch.float64)
    kernel[taps // 2] += 1.0
    return kernel.float()


def _zero_padding(waves: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    return waves.masked_fill(torch.arange(waves.shape[1], device=waves.device)[None, :] >= lengths[:, None], 0.0)


def _check_waves(name: str, waves: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    if waves.dim() != 2:
        raise ValueError(f"{name} expects waves (batch, samples), got shape {tuple(waves.shape)}")
    b, s = waves.shape
    if lengths is None:
        return torch.full((b,), s, dtype=torch.long, device=waves.device)
    if lengths.shape != (b,):
        raise ValueError(f"{name}: lengths has shape {tuple(lengths.shape)}, expected ({b},)")
    return lengths.long()


class DropFreq(_SeededAugment):
    """Removes random frequency bands from each utterance with a band-stop filter on the wave.

    Each utterance draws a band count uniform in ``config.drop_freq_bands`` and, per band, a
    centre uniform in (0, 1) of Nyquist; the band ``[centre - width / 2, centre + width / 2]``
    (clipped to [0, 1]) is removed by :func:`band_stop_filter`, applied with FFT convolution
    (``torchaudio.functional.fftconvolve``, zero phase). Bands are applied in sequence; padding
    stays zero.
    """

    def __init__(self, config: AugmentConfig, *, rank: int = 0) -> None:
        config.validate()
        super().__init__(config.seed, rank, salt=3)
        self.bands = config.drop_freq_bands
        self.width = float(config.drop_freq_width)

    def extra_repr(self) -> str:
        return f"bands={self.bands}, width={self.width}"

    def draw(self, b: int) -> list[list[tuple[float, float]]]:
        """Per utterance, the bands ``(low, high)`` (fractions of Nyquist) it loses."""
        lo, hi = self.bands
        counts = torch.randint(lo, hi + 1, (b,), generator=self.generator).tolist()
        out = []
        for count in counts:
            centres = self._rand(count).tolist()
            out.append([(max(0.0, c - self.width / 2), min(1.0, c + self.width / 2)) for c in centres])
        return out

    def forward(self, waves: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """(b, s) waves with the drawn bands removed in training; the same tensor in eval."""
        lengths = _check_waves("DropFreq", waves, lengths)
        if not self.training or self.bands[1] == 0:
            return waves
        bands = self.draw(waves.shape[0])
        out = waves.clone()
        for k in range(max((len(row) for row in bands), default=0)):
            rows = [i for i, row in enumerate(bands) if len(row) > k]
            kernels = torch.stack([band_stop_filter(*bands[i][k]) for i in rows]).to(waves.device, waves.dtype)
            index = torch.tensor(rows, device=waves.device)
            out[index] = torchaudio.functional.fftconvolve(out[index], kernels, mode="same")  # (g, s)
        return _zero_padding(out, lengths)


class DropChunk(_SeededAugment):
    """Zeroes random chunks of each utterance's real samples.

    Each utterance draws a chunk count uniform in ``config.drop_chunk_count`` and, per chunk, a
    length uniform in ``config.drop_chunk_length`` (at most the utterance's length) and a start
    uniform over the positions where the chunk fits. Chunks may overlap.
    """

    def __init__(self, config: AugmentConfig, *, rank: int = 0) -> None:
        config.validate()
        super().__init__(config.seed, rank, salt=4)
        self.count = config.drop_chunk_count
        self.length = config.drop_chunk_length

    def extra_repr(self) -> str:
        return f"count={self.count}, length={self.length}"

    def draw(self, lengths: torch.Tensor) -> list[list[tuple[int, int]]]:
        """Per utterance, the chunks ``(start, width)`` it loses, inside ``[0, length)``."""
        lo, hi = self.count
        counts = torch.randint(lo, hi + 1, (lengths.shape[0],), generator=self.generator).tolist()
        out = []
        for n, count in zip(lengths.tolist(), counts):
            chunks = []
            for _ in range(count):
                width = min(int(torch.randint(self.length[0], self.length[1] + 1, (1,), generator=self.generator)), n)
                start = int(self._rand(1) * (n - width + 1))
                chunks.append((start, width))
            out.append(chunks)
        return out

    def forward(self, waves: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """(b, s) waves with the drawn chunks zeroed in training; the same tensor in eval."""
        lengths = _check_waves("DropChunk", waves, lengths)
        if not self.training or self.count[1] == 0:
            return waves
        keep = torch.ones_like(waves, dtype=torch.bool, device="cpu")  # (b, s)
        for row, chunks in enumerate(self.draw(lengths.cpu())):
            for start, width in chunks:
                keep[row, start : start + width] = False
        return waves * keep.to(waves.device)


class WaveAugment(nn.Module):
    """The wave chain in sequence: speed perturbation, DropFreq, DropChunk; then, with
    ``concat_clean``, the clean batch appended (rows ``[augmented..., clean...]``).

    Args:
        config: the augmentation settings.
        sample_rate: the waves' sample rate.
        rank: DDP rank, so that ranks draw different augmentations.
    """

    def __init__(self, config: AugmentConfig, *, sample_rate: int = 16000, rank: int = 0) -> None:
        super().__init__()
        self.speed = SpeedPerturb(config, sample_rate=sample_rate, rank=rank)
        self.drop_freq = DropFreq(config, rank=rank)
        self.drop_chunk = DropChunk(config, rank=rank)
        self.concat_clean = config.concat_clean

    def forward(self, waves: torch.Tensor, lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Augments a (b, s) batch in training.

        Returns:
            ``(waves, lengths, copies)``: (copies * b, s') waves zero-padded to the longest row,
            their lengths, and ``copies`` (2 with ``concat_clean`` in training, else 1): targets
            are repeated ``copies`` times to match the rows. In eval, the inputs and 1.
        """
        lengths = _check_waves("WaveAugment", waves, lengths)
        if not self.training:
            return waves, lengths, 1
        out, out_lengths = self.speed(waves, lengths)
        out = self.drop_chunk(self.drop_freq(out, out_lengths), out_lengths)
        if not self.concat_clean:
            return out, out_lengths, 1
        s = max(out.shape[1], waves.shape[1])
        both = out.new_zeros(2 * waves.shape[0], s)
        both[: out.shape[0], : out.shape[1]] = out
        both[out.shape[0] :, : waves.shape[1]] = _zero_padding(waves, lengths)
        return both, torch.cat([out_lengths, lengths]), 2

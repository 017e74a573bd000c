"""Fine-tuning augmentation: SpecAugment on features, speed perturbation on waves.

Dimensions: b batch, s audio samples, t feature frames, f feature channels (mel bins).

Both modules run on the collated batch inside the loop (on its device), are seeded from
:class:`AugmentConfig` (and the rank), and are identities in ``eval()``. Their random generator
state is part of ``module.state_dict()`` (the ``_extra_state`` entry), so a resumed run draws
the same augmentations as an uninterrupted one.

Order in a fine-tuning step::

    waves, wave_lengths = speed_perturb(batch["waves"], batch["wave_lengths"])   # (b, s'), (b,)
    feats, frame_lengths = fbank(waves, wave_lengths)                           # (b, t, f), (b,)
    feats = spec_augment(feats, frame_lengths)                                  # (b, t, f)

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

__all__ = ["AugmentConfig", "SpecAugment", "SpeedPerturb"]


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

    seed: int = 0
    """Seed of the augmentation generators (combined with the rank)."""

    def __post_init__(self) -> None:
        if isinstance(self.speed_factors, list):  # YAML gives lists; keep the config hashable
            object.__setattr__(self, "speed_factors", tuple(self.speed_factors))

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

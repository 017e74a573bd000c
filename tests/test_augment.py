"""AugmentConfig, SpecAugment and SpeedPerturb."""

from __future__ import annotations

import math

import pytest
import torch
import torchaudio

from orchestrator.data.augment import AugmentConfig, SpecAugment, SpeedPerturb


def padded_features(lengths: list[int], num_channels: int = 80, seed: int = 0) -> torch.Tensor:
    """(b, t, f) features; the padding holds a sentinel so any write to it shows."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(len(lengths), max(lengths), num_channels, generator=g) + 5.0  # never 0
    for row, n in enumerate(lengths):
        feats[row, n:] = -123.0
    return feats


# ---------------------------------------------------------------------- config


def test_config_validates_and_rejects_unknown_keys():
    AugmentConfig().validate()
    assert AugmentConfig.from_dict({"speed_factors": [0.95, 1.05]}).speed_factors == (0.95, 1.05)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['time_masks'\]; valid keys: \['speed_factors'"):
        AugmentConfig.from_dict({"time_masks": 3})
    for bad, field in [
        ({"speed_factors": ()}, "speed_factors"),
        ({"speed_factors": 0.9}, "speed_factors"),
        ({"speed_factors": (0.1,)}, "speed_factors"),
        ({"num_time_masks": -1}, "num_time_masks"),
        ({"freq_mask_width": 2.5}, "freq_mask_width"),
        ({"time_mask_max_ratio": 0.0}, "time_mask_max_ratio"),
        ({"mask_value": math.nan}, "mask_value"),
    ]:
        with pytest.raises(ValueError, match=f"AugmentConfig.{field}="):
            AugmentConfig(**bad).validate()
    with pytest.raises(ValueError, match="two decimals"):
        SpeedPerturb(AugmentConfig(speed_factors=(0.937,)))


# ---------------------------------------------------------------------- SpecAugment


def test_specaugment_is_identity_in_eval():
    aug = SpecAugment(AugmentConfig()).eval()
    feats = padded_features([300, 120])
    assert aug(feats, torch.tensor([300, 120])) is feats


def test_specaugment_masks_only_real_frames_and_changes_features():
    lengths = [400, 250, 37, 1]
    aug = SpecAugment(AugmentConfig(num_time_masks=4, time_mask_width=60, time_mask_max_ratio=0.5)).train()
    changed = False
    for _ in range(10):
        feats = padded_features(lengths)
        out = aug(feats, torch.tensor(lengths))
        masked = out != feats  # (b, t, f)
        assert torch.all(out[masked] == 0.0)  # mask_value
        for row, n in enumerate(lengths):
            assert not masked[row, n:].any(), "a mask reached the padded frames"
        changed |= bool(masked.any())
    assert changed


def test_specaugment_time_mask_widths_respect_the_length_ratio():
    config = AugmentConfig(num_freq_masks=0, num_time_masks=1, time_mask_width=100, time_mask_max_ratio=0.2)
    aug = SpecAugment(config)
    lengths = torch.tensor([500, 100, 30, 4])
    for _ in range(50):
        mask = aug.masks(lengths, num_frames=500, num_channels=8)  # (b, t, f)
        widths = mask[:, :, 0].sum(dim=1)
        assert torch.all(widths <= torch.tensor([100, 20, 6, 0]))
        assert torch.all(mask.all(dim=2) == mask.any(dim=2))  # time masks span every channel


def test_specaugment_is_seeded_and_resumable():
    config = AugmentConfig(seed=3)
    feats, lengths = padded_features([200, 150]), torch.tensor([200, 150])
    a, b = SpecAugment(config), SpecAugment(config)
    assert torch.equal(a(feats, lengths), b(feats, lengths))
    assert not torch.equal(a(feats, lengths), SpecAugment(config, rank=1)(feats, lengths))
    state = a.state_dict()
    expected = a(feats, lengths)
    c = SpecAugment(config)
    c.load_state_dict(state)
    assert torch.equal(c(feats, lengths), expected)


# ---------------------------------------------------------------------- SpeedPerturb


def padded_waves(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    waves = torch.zeros(len(lengths), max(lengths))
    for row, n in enumerate(lengths):
        waves[row, :n] = torch.randn(n, generator=g)
    return waves, torch.tensor(lengths)


def test_speed_perturb_is_identity_in_eval():
    sp = SpeedPerturb(AugmentConfig()).eval()
    waves, lengths = padded_waves([1600, 800])
    out, out_lengths = sp(waves, lengths)
    assert out is waves and out_lengths is lengths


def test_speed_perturb_lengths_match_each_utterance_perturbed_alone():
    lengths = [16000, 9000, 4001, 160, 12345, 7000]
    waves, lens = padded_waves(lengths)
    sp = SpeedPerturb(AugmentConfig(speed_factors=(0.9, 1.0, 1.1), seed=1))
    seen_factors = set()
    for _ in range(4):
        out, out_lengths = sp(waves, lens)
        assert out.shape == (len(lengths), int(out_lengths.max()))
        assert out_lengths.dtype == torch.long
        for row, n in enumerate(lengths):
            m = int(out_lengths[row])
            # Which factor was drawn: the one whose torchaudio speed() gives this length.
            matches = []
            for f in (0.9, 1.0, 1.1):
                alone, alone_len = torchaudio.functional.speed(waves[row : row + 1, :n], 16000, f, torch.tensor([n]))
                if int(alone_len) == m:
                    matches.append((f, alone))
            assert matches, f"length {m} matches no factor for an utterance of {n} samples"
            f, alone = matches[0]
            seen_factors.add(f)
            assert alone.shape[1] == m
            torch.testing.assert_close(out[row, :m], alone[0], atol=1e-5, rtol=1e-5)
            assert torch.all(out[row, m:] == 0)
    assert seen_factors == {0.9, 1.0, 1.1}


def test_speed_perturb_is_seeded_and_off_for_unit_factor():
    waves, lengths = padded_waves([8000, 5000, 3000])
    a, b = SpeedPerturb(AugmentConfig(seed=5)), SpeedPerturb(AugmentConfig(seed=5))
    for _ in range(3):
        (wa, la), (wb, lb) = a(waves, lengths), b(waves, lengths)
        assert torch.equal(la, lb) and torch.equal(wa, wb)
    out, out_lengths = SpeedPerturb(AugmentConfig(speed_factors=(1.0,)))(waves, lengths)
    assert out is waves and out_lengths is lengths

"""AugmentConfig, SpecAugment, SpeedPerturb, DropFreq, DropChunk and the wave chain with clean concat."""

from __future__ import annotations

import math

import pytest
import torch
import torchaudio

from orchestrator.data.augment import (
    AugmentConfig,
    DropChunk,
    DropFreq,
    SpecAugment,
    SpeedPerturb,
    WaveAugment,
    band_stop_filter,
)


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
        ({"drop_freq_bands": (3, 1)}, "drop_freq_bands"),
        ({"drop_freq_width": 0.0}, "drop_freq_width"),
        ({"drop_chunk_count": (1,)}, "drop_chunk_count"),
        ({"drop_chunk_length": (0, 10)}, "drop_chunk_length"),
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


# ---------------------------------------------------------------------- DropFreq, DropChunk, chain

PAPER = dict(speed_factors=(0.95, 1.0, 1.05), drop_freq_bands=(1, 3), drop_freq_width=0.05,
             drop_chunk_count=(1, 5), drop_chunk_length=(1000, 2000), concat_clean=True,
             num_freq_masks=0, num_time_masks=0)


def _band_energy_db(wave: torch.Tensor, low: float, high: float) -> float:
    """Mean power (dB) of ``wave``'s spectrum between ``low`` and ``high`` (fractions of Nyquist)."""
    power = torch.fft.rfft(wave.double()).abs().pow(2)
    freqs = torch.linspace(0.0, 1.0, power.shape[0], dtype=torch.float64)
    return float(10 * torch.log10(power[(freqs >= low) & (freqs <= high)].mean()))


def test_band_stop_filter_removes_the_band_only():
    noise = torch.randn(64000, generator=torch.Generator().manual_seed(0))
    out = torchaudio.functional.fftconvolve(noise, band_stop_filter(0.30, 0.35), mode="same")
    inner = _band_energy_db(out, 0.31, 0.34) - _band_energy_db(noise, 0.31, 0.34)
    assert inner < -35.0, inner  # the middle of the band is gone
    for low, high in ((0.05, 0.25), (0.40, 0.95)):  # away from the band: unchanged
        assert abs(_band_energy_db(out, low, high) - _band_energy_db(noise, low, high)) < 0.2


def test_drop_freq_removes_the_drawn_bands_and_keeps_shape_and_padding():
    config = AugmentConfig(drop_freq_bands=(1, 3), drop_freq_width=0.05, seed=3)
    aug = DropFreq(config).train()
    waves, lengths = padded_waves([48000, 30000, 20000])
    before = aug.generator.get_state()
    out = aug(waves, lengths)
    aug.generator.set_state(before)
    bands = aug.draw(3)
    assert out.shape == waves.shape and all(1 <= len(b) <= 3 for b in bands)
    for row, n in enumerate(lengths.tolist()):
        assert torch.all(out[row, n:] == 0)
        for low, high in bands[row]:
            width = high - low
            if width < 0.04:  # clipped at 0 or Nyquist: too narrow to measure its middle
                continue
            mid = (low + width * 0.3, high - width * 0.3)
            # the middle of each drawn band lost most of its energy (the edges of the utterance
            # are not filtered against a full window, so measure on its inner part)
            drop = _band_energy_db(out[row, 2000 : n - 2000], *mid) - _band_energy_db(waves[row, 2000 : n - 2000], *mid)
            assert drop < -20.0, (row, low, high, drop)
    assert DropFreq(config).eval()(waves, lengths) is waves


def test_drop_chunk_zeroes_exactly_the_drawn_chunks():
    config = AugmentConfig(drop_chunk_count=(1, 5), drop_chunk_length=(1000, 2000), seed=4)
    aug = DropChunk(config).train()
    lengths = torch.tensor([40000, 16000, 1500, 9000])
    waves = torch.zeros(4, 40000)
    for row, n in enumerate(lengths.tolist()):
        waves[row, :n] = 1.0
    for _ in range(5):
        before = aug.generator.get_state()
        out = aug(waves, lengths)
        aug.generator.set_state(before)
        chunks = aug.draw(lengths)  # the same draws, and the generator where forward left it
        for row, n in enumerate(lengths.tolist()):
            assert 1 <= len(chunks[row]) <= 5
            dropped = set()
            for start, width in chunks[row]:
                assert width == min(width, n) and (1000 <= width <= 2000 or width == n)
                assert 0 <= start and start + width <= n
                dropped |= set(range(start, start + width))
            zeros = (out[row, :n] == 0).nonzero().flatten().tolist()
            assert zeros == sorted(dropped)  # exactly the union of the chunks
            assert torch.all(out[row, n:] == 0)
    assert DropChunk(config).eval()(waves, lengths) is waves


def test_wave_chain_with_clean_concat_doubles_the_batch():
    waves, lengths = padded_waves([16000, 12000, 7000])
    chain = WaveAugment(AugmentConfig(**PAPER, seed=2)).train()
    out, out_lengths, copies = chain(waves, lengths)
    assert copies == 2 and out.shape[0] == 6 and out_lengths.shape == (6,)
    assert out.shape[1] == max(int(out_lengths.max()), waves.shape[1])
    # the second half is the clean batch, unchanged
    assert torch.equal(out_lengths[3:], lengths)
    assert torch.equal(out[3:, : waves.shape[1]], waves) and torch.all(out[3:, waves.shape[1] :] == 0)
    # the first half went through speed (lengths of 0.95, 1.0 or 1.05) and the drops
    for row, n in enumerate(lengths.tolist()):
        m = int(out_lengths[row])
        assert m in {n, -(-n * 20 // 19), -(-n * 20 // 21)}, (n, m)
        assert torch.all(out[row, m:] == 0)
        assert int((out[row, :m] == 0).sum()) >= 1000  # at least one chunk of 1000+ samples
    # eval: the inputs, one copy
    chain.eval()
    same, same_lengths, one = chain(waves, lengths)
    assert same is waves and torch.equal(same_lengths, lengths) and one == 1
    # without concat: the augmented batch only
    alone = WaveAugment(AugmentConfig(**{**PAPER, "concat_clean": False}, seed=2)).train()
    out1, lengths1, copies1 = alone(waves, lengths)
    assert copies1 == 1 and out1.shape[0] == 3
    assert torch.equal(out1, out[:3, : out1.shape[1]]) and torch.equal(lengths1, out_lengths[:3])


def test_wave_chain_resumes_from_its_state_dict():
    waves, lengths = padded_waves([16000, 9000])
    a = WaveAugment(AugmentConfig(**PAPER, seed=7)).train()
    a(waves, lengths)
    state = a.state_dict()
    b = WaveAugment(AugmentConfig(**PAPER, seed=99)).train()
    b.load_state_dict(state)
    for _ in range(3):
        (wa, la, _), (wb, lb, _) = a(waves, lengths), b(waves, lengths)
        assert torch.equal(wa, wb) and torch.equal(la, lb)

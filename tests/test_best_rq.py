"""BEST-RQ: span masking, the frozen seeded quantizer, targets, and a loss on masked frames only."""

from __future__ import annotations

import pytest
import torch

from models.best_rq import (
    BestRQModel,
    RandomProjectionQuantizer,
    code_perplexity,
    frames_to_encoder_mask,
    span_mask,
    stack_frames,
)
from models.builder import build_best_rq
from models.config import ModelConfig, make_config
from models.frontend import lengths_to_padding_mask


def _config(seed: int = 0, **best_rq) -> ModelConfig:
    return make_config(
        "tiny",
        plan="pom",
        model_dim=32,
        encoder={"num_layers": 2, "ffn_dim": 48},
        frontend={"conv_channels": [8, 4], "n_mels": 16},
        best_rq={"codebook_size": 64, "seed": seed, **best_rq},
    )


def _features(lengths: list[int], n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lengths)
    x = torch.randn(len(lengths), max(lengths), n, generator=g)
    return x.masked_fill(lengths_to_padding_mask(lens, x.shape[1]).unsqueeze(-1), 0.0), lens


# ------------------------------------------------------------------------------------ masking


def test_span_mask_is_shared_aligned_and_inside_the_shortest_utterance() -> None:
    lengths = torch.tensor([90, 41, 70])
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        mask = span_mask(lengths, 90, mask_prob=0.15, mask_span=4, generator=g)
        assert mask.shape == (3, 90) and mask.dtype == torch.bool
        assert torch.equal(mask[0], mask[1]) and torch.equal(mask[0], mask[2])
        assert not mask[:, 40:].any()  # 41 // 4 = 10 aligned spans: frames 0..39
        spans = mask[0, :40].view(10, 4)
        assert torch.all(spans.all(-1) == spans.any(-1))  # whole aligned spans only
        assert spans.any(-1).sum() >= 1


def test_span_mask_short_utterance_is_masked_whole() -> None:
    mask = span_mask(torch.tensor([3, 10]), 10, mask_prob=0.15, mask_span=4)
    assert mask[0].tolist() == [True] * 3 + [False] * 7


@pytest.mark.parametrize(("mask_prob", "mask_span"), [(0.15, 4), (0.05, 2), (0.3, 3)])
def test_observed_mask_fraction_matches_the_expectation(mask_prob: float, mask_span: int) -> None:
    """E[spans] = mask_prob * L, so E[masked fraction] = mask_prob * mask_span (when <= 1)."""
    length, draws = 120, 1500
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([length, 200])
    total = sum(
        int(span_mask(lengths, 200, mask_prob=mask_prob, mask_span=mask_span, generator=g)[0].sum())
        for _ in range(draws)
    )
    expected = min(1.0, mask_prob * mask_span)
    assert abs(total / (draws * length) - expected) < 0.01


def test_stacking_and_encoder_mask() -> None:
    x = torch.arange(2 * 6 * 3, dtype=torch.float).view(2, 6, 3)
    stacked = stack_frames(x, 4)
    assert stacked.shape == (2, 2, 12)
    torch.testing.assert_close(stacked[0, 0], x[0, :4].flatten())
    torch.testing.assert_close(stacked[0, 1], torch.cat([x[0, 4:].flatten(), torch.zeros(6)]))
    fmask = torch.zeros(1, 9, dtype=torch.bool)
    fmask[0, 5] = True
    assert frames_to_encoder_mask(fmask, 4).tolist() == [[False, True, False]]


# ---------------------------------------------------------------------------------- quantizer


def _quantizer(seed: int) -> RandomProjectionQuantizer:
    return RandomProjectionQuantizer(input_dim=24, codebook_dim=5, codebook_size=50, num_codebooks=2, seed=seed)


def test_quantizer_is_seeded_frozen_and_saved() -> None:
    a, b, c = _quantizer(3), _quantizer(3), _quantizer(4)
    assert set(a.state_dict()) == {"projection", "codebooks"}
    assert list(a.parameters()) == []
    assert torch.equal(a.projection, b.projection) and torch.equal(a.codebooks, b.codebooks)
    assert not torch.equal(a.projection, c.projection)
    torch.testing.assert_close(a.codebooks.norm(dim=-1), torch.ones(2, 50))
    bound = (6 / (24 + 5)) ** 0.5  # xavier uniform
    assert a.projection.abs().max() <= bound


def test_quantizer_codes_are_the_nearest_normalised_entry() -> None:
    q = _quantizer(0)
    q.chunk_size = 7  # exercise chunking
    x = torch.randn(3, 10, 24)
    codes = q(x)
    assert codes.shape == (3, 10, 2) and codes.dtype == torch.long
    z = torch.nn.functional.normalize(x @ q.projection, dim=-1)  # (3, 10, 5)
    for book in range(2):
        distance = torch.cdist(z.reshape(-1, 5), q.codebooks[book])  # naive reference
        assert torch.equal(codes[..., book].reshape(-1), distance.argmin(-1))


def test_targets_same_for_same_seed_and_input_and_differ_for_another_seed() -> None:
    x, lengths = _features([40, 33])
    t0 = build_best_rq(_config(seed=0)).targets(x, lengths)
    t0_again = build_best_rq(_config(seed=0)).targets(x, lengths)
    t1 = build_best_rq(_config(seed=1)).targets(x, lengths)
    assert t0.shape == (2, 10, 1)
    assert torch.equal(t0, t0_again)
    assert not torch.equal(t0, t1)


def test_quantizer_buffers_are_in_the_model_state_dict() -> None:
    model = build_best_rq(_config(seed=0))
    state = model.state_dict()
    assert {"quantizer.projection", "quantizer.codebooks", "normalizer.mean", "normalizer.std"} <= set(state)
    other = build_best_rq(_config(seed=5))
    other.load_state_dict(state)
    assert torch.equal(other.quantizer.codebooks, model.quantizer.codebooks)


# ------------------------------------------------------------------------------------- model


def test_forward_features_outputs_and_counters() -> None:
    model = build_best_rq(_config())
    x, lengths = _features([40, 33, 37])
    out = model.forward_features(x, lengths, generator=torch.Generator().manual_seed(0))
    assert out.mask.shape == (3, 10) and out.feature_mask.shape == (3, 40)
    assert int(out.num_masked) == int(out.mask.sum()) >= 3
    assert out.targets.shape == (int(out.num_masked), 1)
    assert int(out.target_counts.sum()) == int(out.num_masked)
    assert 0.0 <= float(out.accuracy) <= 1.0
    # targets come from the clean (unmasked) features
    assert torch.equal(out.targets, model.targets(x, lengths)[out.mask])
    perplexity = code_perplexity(out.target_counts)
    assert perplexity.shape == (1,) and 1.0 <= float(perplexity) <= 64.0


def test_masked_frames_are_replaced_by_noise_and_others_untouched() -> None:
    model = build_best_rq(_config(noise_std=0.5))
    seen = {}

    def keep(_module, args):
        seen["input"] = args[0].detach()

    model.frontend.register_forward_pre_hook(keep)
    x, lengths = _features([80, 72])
    out = model.forward_features(x, lengths, generator=torch.Generator().manual_seed(0))
    masked = out.feature_mask.unsqueeze(-1).expand_as(x)
    assert torch.equal(seen["input"][~masked], x[~masked])
    noise = seen["input"][masked]
    assert not torch.equal(noise, x[masked])
    assert abs(float(noise.std()) - 0.5) < 0.1


def test_loss_depends_only_on_masked_frames() -> None:
    model = build_best_rq(_config())
    captured = {}

    def keep(_module, _args, output):
        output.retain_grad()
        captured["encoded"] = output

    model.encoder.register_forward_hook(keep)
    x, lengths = _features([48, 44])
    out = model.forward_features(x, lengths, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    grad = captured["encoded"].grad.abs().sum(-1)  # (b, t')
    assert torch.all(grad[~out.mask] == 0)
    assert torch.all(grad[out.mask] > 0)


def test_loss_ignores_perturbed_logits_of_unmasked_frames() -> None:
    model = build_best_rq(_config())
    x, lengths = _features([40, 40])
    out = model.forward_features(x, lengths, generator=torch.Generator().manual_seed(0))
    encoded = torch.randn(2, 10, 32)
    base = model.loss(encoded, out.mask, out.targets).loss
    perturbed = encoded.clone()
    perturbed[~out.mask] += 100.0 * torch.randn_like(perturbed[~out.mask])
    torch.testing.assert_close(model.loss(perturbed, out.mask, out.targets).loss, base)


def test_forward_from_waveforms_trains_and_is_reproducible() -> None:
    torch.manual_seed(0)
    model = build_best_rq(_config())
    assert isinstance(model, BestRQModel)
    wave, lengths = torch.randn(2, 5000), torch.tensor([5000, 3800])
    model.eval()  # dropout off: the generator alone fixes the mask and the noise
    first = model(wave, lengths, generator=torch.Generator().manual_seed(3))
    again = model(wave, lengths, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(first.loss, again.loss)
    assert torch.equal(first.mask, again.mask)
    model.train()
    out = model(wave, lengths)
    out.loss.backward()
    assert model.heads[0].weight.grad is not None
    assert all(p.grad is not None for p in model.encoder.parameters())
    assert model.frontend.proj.weight.grad is not None


def test_multiple_codebooks() -> None:
    model = build_best_rq(_config(num_codebooks=3))
    x, lengths = _features([40, 36])
    out = model.forward_features(x, lengths)
    assert len(model.heads) == 3 and out.targets.shape[1] == 3 and out.target_counts.shape == (3, 64)
    assert int(out.num_correct) <= 3 * int(out.num_masked)


def test_estimate_normalizer_from_waveforms() -> None:
    model = build_best_rq(_config())
    batches = [(torch.randn(2, 3000), torch.tensor([3000, 2000])), (torch.randn(1, 1000), torch.tensor([1000]))]
    norm = model.estimate_normalizer(batches)
    assert norm is model.normalizer and int(norm.count) == 17 + 11 + 4  # frames of 3000, 2000 and 1000 samples
    features, lengths = model.featurize(*batches[0])
    real = features[0, : lengths[0]]
    assert abs(float(real.mean())) < 1.0 and torch.all(features[1, lengths[1] :] == 0)


def test_runs_under_autocast_with_float32_loss() -> None:
    model = build_best_rq(_config())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3000), torch.tensor([3000, 2500]))
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()

"""Front-end, normaliser, subsampling and Conformer encoder: shapes, lengths, padding invariance,
and every configuration field reaching its module. Tiny sizes throughout."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from models.builder import build_best_rq, build_ctc, build_encoder
from models.config import (
    BestRQConfig,
    CTCConfig,
    EncoderConfig,
    FrontendConfig,
    MixerSpec,
    ModelConfig,
    make_config,
)
from models.conformer import ConformerBlock, ConformerEncoder, ConvModule, FeedForward
from models.frontend import (
    ConvSubsampling,
    FilterbankFeatures,
    GlobalNormalizer,
    SinusoidalPositions,
    lengths_to_padding_mask,
    sinusoidal_positions,
)
from models.mixers import MIXERS

D, HEADS = 32, 4


def _spec(name: str) -> MixerSpec:
    return MixerSpec(name=name, options={"num_heads": HEADS} if MIXERS[name].is_attention else {})


def _encoder_config(*names: str, **fields) -> EncoderConfig:
    layers = tuple(_spec(n) for n in names)
    values = dict(model_dim=D, num_layers=len(layers), ffn_dim=48, conv_kernel=5, dropout_p=0.1, layers=layers)
    values.update(fields)
    return EncoderConfig(**values)


def _padded_batch(lengths: list[int], dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), max(lengths), dim, generator=g)
    lens = torch.tensor(lengths)
    return x.masked_fill(lengths_to_padding_mask(lens, x.shape[1]).unsqueeze(-1), 0.0), lens


# ------------------------------------------------------------------------------------ features


def test_filterbank_shapes_lengths_and_padding() -> None:
    feats = FilterbankFeatures(sample_rate=16000, n_mels=80, win_length=400, hop_length=160)
    wave = torch.randn(3, 4000)
    lengths = torch.tensor([4000, 3000, 1000])
    features, out_lengths = feats(wave * (~lengths_to_padding_mask(lengths, 4000)), lengths)
    assert features.shape == (3, 1 + (4000 - 400) // 160, 80)
    assert out_lengths.tolist() == [1 + (n - 400) // 160 for n in (4000, 3000, 1000)]
    assert torch.all(features[1, out_lengths[1] :] == 0) and torch.all(features[2, out_lengths[2] :] == 0)
    # Without centre padding a real frame never sees padding: each utterance alone gives the same.
    for i, n in enumerate(lengths.tolist()):
        alone, alone_len = feats(wave[i : i + 1, :n], lengths[i : i + 1])
        assert alone_len.item() == out_lengths[i].item()
        torch.testing.assert_close(alone[0], features[i, : out_lengths[i]])
    assert feats.state_dict() == {}  # window and mel filters are not checkpoint material


def test_filterbank_is_float32_under_autocast() -> None:
    feats = FilterbankFeatures()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features, _ = feats(torch.randn(1, 1600), torch.tensor([1600]))
    assert features.dtype == torch.float32


# ---------------------------------------------------------------------------------- normaliser


def test_normalizer_estimates_without_padding_and_lives_in_state_dict() -> None:
    x, lengths = _padded_batch([9, 5, 3], 6)
    x = x * 3 + 2
    x[1, 5:] = 1e6  # padding must not leak into the statistics
    norm = GlobalNormalizer(6)
    assert not norm.is_fitted
    torch.testing.assert_close(norm(x, lengths)[0], x[0])  # identity before estimation
    real = torch.cat([x[i, :n] for i, n in enumerate(lengths.tolist())]).double()
    norm.estimate([(x[:2], lengths[:2]), (x[2:], lengths[2:])])  # statistics sum over batches
    torch.testing.assert_close(norm.mean, real.mean(0).float())
    torch.testing.assert_close(norm.std, real.std(0, unbiased=False).float())
    assert int(norm.count) == 17 and norm.is_fitted
    assert set(norm.state_dict()) == {"mean", "std", "count"}
    y = norm(x, lengths)
    assert torch.all(y[1, 5:] == 0)
    fresh = GlobalNormalizer(6)
    fresh.load_state_dict(norm.state_dict())
    torch.testing.assert_close(fresh(x, lengths), y)


def test_normalizer_statistics_are_summable_counters() -> None:
    x, lengths = _padded_batch([4, 6], 3)
    s, sq, c = GlobalNormalizer.statistics(x, lengths)
    s0, sq0, c0 = GlobalNormalizer.statistics(x[:1], lengths[:1])
    s1, sq1, c1 = GlobalNormalizer.statistics(x[1:], lengths[1:])
    torch.testing.assert_close(s, s0 + s1)
    torch.testing.assert_close(sq, sq0 + sq1)
    assert c.item() == c0.item() + c1.item() == 10


# --------------------------------------------------------------------------------- subsampling


@pytest.mark.parametrize("t", [1, 2, 3, 4, 5, 7, 8, 9, 13])
def test_conv_subsampling_lengths_are_ceil_half_twice(t: int) -> None:
    sub = ConvSubsampling(16, (8, 4), model_dim=D, dropout_p=0.0)
    x, lengths = _padded_batch([t, max(1, t - 1)], 16)
    y, out = sub(x, lengths)
    expected = [math.ceil(math.ceil(n / 2) / 2) for n in lengths.tolist()]
    assert out.tolist() == expected == sub.output_lengths(lengths).tolist()
    assert y.shape == (2, expected[0], D)
    assert sub.proj.in_features == 4 * 4  # channels[-1] * ceil(ceil(16 / 2) / 2)


@pytest.mark.parametrize("norm", ["channels", "channels_freq"])
def test_conv_subsampling_padding_invariance(norm: str) -> None:
    torch.manual_seed(0)
    sub = ConvSubsampling(16, (8, 4), model_dim=D, dropout_p=0.1, norm=norm).eval()
    x, lengths = _padded_batch([13, 9, 6, 1], 16)
    y, out = sub(x, lengths)
    for i, n in enumerate(lengths.tolist()):
        yi, oi = sub(x[i : i + 1, :n], lengths[i : i + 1])
        # float32 convolutions of different batch shapes may take different kernels: 1e-5, not 1e-6
        torch.testing.assert_close(yi[0], y[i, : oi[0]], atol=1e-5, rtol=0)
        assert torch.all(y[i, oi[0] :] == 0)


@pytest.mark.parametrize("norm", ["channels", "channels_freq"])
def test_conv_subsampling_inference_path_equals_autograd_path(monkeypatch, norm: str) -> None:
    """Without autograd the blocks run channels-last, LayerNorm in chunks in place: same output."""
    from models.frontend import _ConvBlock

    monkeypatch.setattr(_ConvBlock, "inference_chunk", 3)  # several chunks, a ragged last one
    calls = []
    original = _ConvBlock._forward_inference
    monkeypatch.setattr(_ConvBlock, "_forward_inference", lambda self, x: calls.append(1) or original(self, x))
    sub = ConvSubsampling(16, (8, 4), model_dim=D, dropout_p=0.1, norm=norm).eval()
    for block in sub.blocks:  # gains and shifts that differ per (freq, channel)
        torch.nn.init.normal_(block.norm.weight, 1.0, 0.3)
        torch.nn.init.normal_(block.norm.bias, 0.0, 0.3)
    x, lengths = _padded_batch([13, 9, 6, 1], 16)
    trained, out = sub(x, lengths)  # autograd path (parameters require grad)
    assert trained.requires_grad and not calls
    with torch.inference_mode():
        inferred, out_i = sub(x, lengths)
    assert len(calls) == 2
    torch.testing.assert_close(inferred, trained.detach(), atol=1e-6, rtol=1e-5)
    assert torch.equal(out, out_i)
    for i, n in enumerate(lengths.tolist()):  # padding invariance holds on this path too
        with torch.no_grad():
            yi, oi = sub(x[i : i + 1, :n], lengths[i : i + 1])
        torch.testing.assert_close(yi[0], inferred[i, : oi[0]], atol=1e-6, rtol=0)
        assert torch.all(inferred[i, oi[0] :] == 0)


def test_sinusoidal_positions_table() -> None:
    table = sinusoidal_positions(5, 6)
    assert table.shape == (5, 6)
    torch.testing.assert_close(table[0], torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0]))
    torch.testing.assert_close(table[3, 0], torch.tensor(math.sin(3.0)))
    torch.testing.assert_close(table[3, 3], torch.tensor(math.cos(3.0 / 10000 ** (2 / 6))))
    x = torch.zeros(2, 5, 6)
    torch.testing.assert_close(SinusoidalPositions(6)(x), table.expand(2, -1, -1))


# ----------------------------------------------------------------------------------- conformer


def test_conv_module_zeroes_padding_before_depthwise() -> None:
    conv = ConvModule(D, 5, dropout_p=0.0).eval()
    x, lengths = _padded_batch([6, 3], D)
    pad = lengths_to_padding_mask(lengths, 6)
    garbage = x.masked_fill(pad.unsqueeze(-1), 7.0)  # padded frames hold junk
    torch.testing.assert_close(conv(garbage, pad)[1, :3], conv(x[1:, :3], None)[0])


def test_conformer_block_is_built_by_injection() -> None:
    ffn1, ffn2 = FeedForward(D, 48, 0.0), FeedForward(D, 48, 0.0)
    mixer, conv = MIXERS["pom"](D), ConvModule(D, 3, 0.0)
    block = ConformerBlock(ffn1, mixer, conv, ffn2, dropout_p=0.0)
    assert block.ffn1 is ffn1 and block.mixer is mixer and block.conv is conv and block.ffn2 is ffn2
    assert block.mixer_name == "pom"
    x, lengths = _padded_batch([5, 2], D)
    y = block(x, lengths_to_padding_mask(lengths, 5))
    assert y.shape == x.shape and torch.all(y[1, 2:] == 0)


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_encoder_shapes_and_gradients(name: str) -> None:
    encoder = ConformerEncoder(_encoder_config(name, name))
    x, lengths = _padded_batch([7, 4], D)
    x.requires_grad_(True)
    y = encoder(x, lengths_to_padding_mask(lengths, 7))
    assert y.shape == (2, 7, D)
    assert torch.all(y[1, 4:] == 0)
    y.square().sum().backward()
    assert x.grad is not None and torch.all(x.grad[1, 4:] == 0)
    assert all(p.grad is not None for p in encoder.parameters() if p.requires_grad)


PLANS = {
    "mha": ("mha", "mha"),
    "pom": ("pom", "pom"),
    "hybrid_relpos_pom": ("mha_relpos", "pom"),
    "mha_relpos": ("mha_relpos", "mha_relpos"),
    "mha_rope": ("mha_rope", "mha_rope"),
    "pom_select": ("pom_select", "pom_select"),
    "pom_split": ("pom_split", "pom_split"),
    "summary_mixing": ("summary_mixing", "summary_mixing"),
}


@pytest.mark.parametrize("plan", sorted(PLANS))
def test_encoder_padding_invariance(plan: str) -> None:
    """A padded batch gives each utterance exactly what it gets alone (eval mode)."""
    torch.manual_seed(0)
    encoder = ConformerEncoder(_encoder_config(*PLANS[plan])).eval()
    x, lengths = _padded_batch([11, 7, 4, 1], D, seed=1)
    with torch.no_grad():
        y = encoder(x, lengths_to_padding_mask(lengths, 11))
        for i, n in enumerate(lengths.tolist()):
            alone = encoder(x[i : i + 1, :n])
            torch.testing.assert_close(alone[0], y[i, :n], atol=1e-5, rtol=0)


@pytest.mark.parametrize("plan", ["pom", "hybrid", "released"])
def test_whole_model_padding_invariance_from_waveforms(plan: str) -> None:
    """``released``: the base preset's SpeechBrain fbank (centred frames), front-end LayerNorm over
    (freq, channels) and RelPosMHAXL options, with SummaryMixing (PoM's released mean over all
    frames depends on the padding by design)."""
    torch.manual_seed(0)
    config = make_config(
        "base" if plan == "released" else "tiny",
        plan={"hybrid": ("mha_relpos", "pom"), "released": ("mha_relpos", "summary_mixing")}.get(plan, "pom"),
        model_dim=32,
        encoder={"num_layers": 2, "ffn_dim": 48},
        frontend={"conv_channels": [8, 4]},
        ctc={"hidden_dim": 32},
    )
    assert (config.frontend.fbank == "speechbrain") is (plan == "released")
    model = build_ctc(config).eval()
    wave = torch.randn(3, 6000)
    lengths = torch.tensor([6000, 4100, 1000])
    wave = wave * (~lengths_to_padding_mask(lengths, 6000))
    with torch.no_grad():
        out = model(wave, lengths)
        for i, n in enumerate(lengths.tolist()):
            alone = model(wave[i : i + 1, :n], lengths[i : i + 1])
            m = int(alone.lengths[0])
            assert m == int(out.lengths[i])
            torch.testing.assert_close(alone.log_probs[0], out.log_probs[i, :m], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("names", "positional", "expected"),
    [
        (("mha_relpos", "mha_relpos"), "auto", False),
        (("mha_rope", "mha_rope"), "auto", False),
        (("mha", "mha"), "auto", True),
        (("pom", "pom"), "auto", True),
        (("mha_relpos", "pom"), "auto", True),
        (("pom", "pom"), "none", False),
        (("mha_relpos", "mha_relpos"), "absolute", True),
    ],
)
def test_absolute_positions_follow_the_mixers(names: tuple[str, ...], positional: str, expected: bool) -> None:
    encoder = ConformerEncoder(_encoder_config(*names), positional=positional)
    assert (encoder.positions is not None) is expected


def test_encoder_rejects_bad_inputs() -> None:
    encoder = ConformerEncoder(_encoder_config("pom"))
    with pytest.raises(ValueError, match="shape"):
        encoder(torch.randn(2, 5, D + 1))
    with pytest.raises(ValueError, match="padding_mask"):
        encoder(torch.randn(2, 5, D), torch.zeros(2, 5))


# ------------------------------------------------------------- every field reaches its module


def _distinct_config() -> ModelConfig:
    return ModelConfig(
        frontend=FrontendConfig(
            sample_rate=8000, n_mels=24, win_ms=20.0, hop_ms=12.5, conv_channels=(6, 5), dropout_p=0.123, positional="none",
            fbank="speechbrain", norm="channels_freq", proj_dropout_p=0.111,
        ),
        encoder=EncoderConfig(
            model_dim=40,
            num_layers=2,
            ffn_dim=72,
            conv_kernel=7,
            dropout_p=0.234,
            mixer_dropout=False,
            init="xavier_normal",
            layers=(
                MixerSpec(name="mha", options={"num_heads": 5, "dropout_p": 0.345}),
                MixerSpec(name="pom", options={"degree": 3, "expand": 1}),
            ),
        ),
        best_rq=BestRQConfig(
            mask_prob=0.2, mask_span=3, noise_std=0.3, codebook_size=37, codebook_dim=6, num_codebooks=2, stack_frames=4, seed=7
        ),
        ctc=CTCConfig(hidden_dim=48, num_hidden_layers=2, dropout_p=0.456, vocab_size=31, blank=3),
    )


def _dropouts(module: nn.Module) -> set[float]:
    return {m.p for m in module.modules() if isinstance(m, nn.Dropout)}


def test_every_config_field_reaches_its_module() -> None:
    config = _distinct_config()
    rq_model, ctc_model = build_best_rq(config), build_ctc(config)
    for model in (rq_model, ctc_model):
        feats = model.features
        assert (feats.sample_rate, feats.n_mels, feats.win_length, feats.hop_length) == (8000, 24, 160, 100)
        assert feats.mel_fbank.shape == (160 // 2 + 1, 24)
        assert feats.kind == "speechbrain" and torch.equal(feats.window, torch.hamming_window(160))
        assert model.normalizer.mean.shape == (24,)
        front = model.frontend
        assert [b.conv.out_channels for b in front.blocks] == [6, 5]
        assert [b.norm.normalized_shape for b in front.blocks] == [(12, 6), (6, 5)]  # (freq, channels)
        assert {b.dropout.p for b in front.blocks} == {0.123} and front.proj_dropout.p == 0.111
        assert front.proj.in_features == 5 * 6 and front.proj.out_features == 40
        enc = model.encoder
        assert enc.positions is None  # positional="none" overrides the mha/pom request
        assert len(enc.blocks) == 2 and enc.final_norm.normalized_shape == (40,)
        for block in enc.blocks:
            assert block.ffn1.inner.out_features == block.ffn2.inner.out_features == 72
            assert block.conv.depthwise.kernel_size == (7,) and block.conv.depthwise.groups == 40
            assert _dropouts(block) == {0.234}
            assert isinstance(block.mixer_dropout, nn.Identity)  # mixer_dropout=False
        mha, pom = enc.blocks[0].mixer, enc.blocks[1].mixer
        assert (type(mha), mha.num_heads, mha.dropout_p) == (MIXERS["mha"], 5, 0.345)
        assert (type(pom), pom.degree, pom.expand) == (MIXERS["pom"], 3, 1)
    rq = rq_model
    assert (rq.mask_prob, rq.mask_span, rq.noise_std, rq.stack) == (0.2, 3, 0.3, 4)
    assert rq.quantizer.projection.shape == (4 * 24, 6)
    assert rq.quantizer.codebooks.shape == (2, 37, 6) and rq.quantizer.seed == 7
    assert [(h.in_features, h.out_features) for h in rq.heads] == [(40, 37), (40, 37)]
    head = ctc_model.head
    linears = [m for m in head.hidden.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(40, 48), (48, 48)]
    assert _dropouts(head) == {0.456}
    assert (head.output.in_features, head.output.out_features) == (48, 31)
    assert ctc_model.blank == 3 and ctc_model.vocab_size == 31


def test_released_options_and_their_alternatives_reach_the_modules() -> None:
    """Each released-code option and today's alternative, one field at a time."""
    base = make_config("tiny", plan="mha", model_dim=32, encoder={"num_layers": 1})
    model = build_best_rq(base)
    assert model.features.kind == "unpadded" and torch.equal(model.features.window, torch.hann_window(400))
    assert [b.norm.normalized_shape for b in model.frontend.blocks] == [(64,), (16,)]
    assert isinstance(model.encoder.blocks[0].mixer_dropout, nn.Dropout)
    assert model.encoder.blocks[0].mixer_dropout.p == base.encoder.dropout_p
    assert model.frontend.proj_dropout.p == 0.0
    wave, lengths = torch.randn(2, 4000), torch.tensor([4000, 3000])
    assert model.features(wave, lengths)[1].tolist() == [1 + (4000 - 400) // 160, 1 + (3000 - 400) // 160]
    sb = build_best_rq(make_config("tiny", plan="mha", model_dim=32, encoder={"num_layers": 1}, frontend={"fbank": "speechbrain"}))
    assert sb.features(wave, lengths)[1].tolist() == [1 + 4000 // 160, 1 + 3000 // 160]


def test_distinct_config_runs_end_to_end() -> None:
    config = _distinct_config()
    model = build_best_rq(config)
    wave = torch.randn(2, 2400)
    out = model(wave, torch.tensor([2400, 1800]), generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert out.target_counts.shape == (2, 37) and torch.isfinite(out.loss)


def test_build_encoder_uses_frontend_positional() -> None:
    config = make_config("tiny", plan="pom", model_dim=32, frontend={"positional": "none"}, encoder={"num_layers": 1})
    assert build_encoder(config).positions is None

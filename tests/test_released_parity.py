"""Released-code parity: our modules in the ``paper`` configuration against restatements of the
released computation (SpeechBrain's Fbank, ConvolutionFrontEnd, RelPosMHAXL and Conformer layer,
the released PoM, SummaryMixing from its paper's equations).

Each restatement is written here from the description in shared/DESIGN.md (MODEL-FACTS) and
issue 11, shares no code with ``models/``, runs in float64 on one utterance at a time (no
batching, loops where the released code has a formula), and is compared with our module run
on a padded batch whose padding holds garbage. Weights are copied from our module, so the
comparison is of computations, not of initial values.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from models.builder import build_best_rq, build_encoder, build_features, build_frontend
from models.config import make_config
from models.mixers import build_mixer

D, H = 16, 2  # model dim and heads of the small mixers (head dim 8)
LENGTHS = [9, 6, 3]


def padded(lengths: list[int], t: int, d: int = D, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A float64 ``(b, t, d)`` batch with garbage (x100) in the padding, and its ``(b, t)`` mask."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), t, d, generator=g, dtype=torch.float64)
    mask = torch.arange(t)[None, :] >= torch.tensor(lengths)[:, None]
    return torch.where(mask[..., None], 100.0 * torch.randn(x.shape, generator=g, dtype=torch.float64), x), mask


# ------------------------------------------------------------------------ scalar building blocks


def gelu(v: torch.Tensor) -> torch.Tensor:
    return 0.5 * v * (1.0 + torch.erf(v / math.sqrt(2.0)))


def dense(weight: torch.Tensor, bias: torch.Tensor | None, v: torch.Tensor) -> torch.Tensor:
    y = weight.double() @ v
    return y if bias is None else y + bias.double()


def layernorm(v: torch.Tensor, gain: torch.Tensor, shift: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over every element of ``v`` (any shape), elementwise gain and shift."""
    mu = v.mean()
    var = ((v - mu) ** 2).mean()
    return (v - mu) / torch.sqrt(var + eps) * gain.double() + shift.double()


# ------------------------------------------------------------------------ SpeechBrain Fbank


def speechbrain_fbank(wave: torch.Tensor, *, sr=16000, n_fft=400, hop=160, n_mels=80, top_db=80.0) -> torch.Tensor:
    """SpeechBrain ``Fbank`` defaults: centred frames over zero padding (``n_fft // 2`` each side),
    periodic Hamming window, power spectrum, triangles centred on ``n_mels + 2`` HTK-mel points
    over [0, sr/2] with half-width the gap to the lower point, 10 log10 with amin 1e-10, then
    floored at the utterance's maximum minus ``top_db``. One utterance, ``(t, n_mels)``."""
    x = torch.cat([torch.zeros(n_fft // 2), wave.double(), torch.zeros(n_fft // 2)])
    frames = 1 + wave.numel() // hop
    n = torch.arange(n_fft, dtype=torch.float64)
    window = 0.54 - 0.46 * torch.cos(2 * math.pi * n / n_fft)
    k = torch.arange(n_fft // 2 + 1, dtype=torch.float64)
    cos = torch.cos(2 * math.pi * k[:, None] * n[None, :] / n_fft)
    sin = torch.sin(2 * math.pi * k[:, None] * n[None, :] / n_fft)
    mel = lambda f: 2595.0 * math.log10(1.0 + f / 700.0)  # noqa: E731
    points = [mel(0.0) + (mel(sr / 2) - mel(0.0)) * i / (n_mels + 1) for i in range(n_mels + 2)]
    hz = [700.0 * (10 ** (m / 2595.0) - 1.0) for m in points]
    freqs = [i * (sr // 2) / (n_fft // 2) for i in range(n_fft // 2 + 1)]
    filters = torch.zeros(n_fft // 2 + 1, n_mels, dtype=torch.float64)
    for j in range(n_mels):
        centre, band = hz[j + 1], hz[j + 1] - hz[j]
        for i, f in enumerate(freqs):
            filters[i, j] = max(0.0, 1.0 - abs(f - centre) / band)
    out = torch.empty(frames, n_mels, dtype=torch.float64)
    for t in range(frames):
        seg = x[t * hop : t * hop + n_fft] * window
        power = (cos @ seg) ** 2 + (sin @ seg) ** 2
        out[t] = 10.0 * torch.log10(torch.clamp(power @ filters, min=1e-10))
    return torch.maximum(out, out.max() - top_db)


def test_fbank_matches_speechbrain_restatement() -> None:
    features = build_features(make_config("base"))
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, generator=g)
    b = torch.randn(2500, generator=g)
    b[1200:] *= 1e-6  # quiet enough that the top_db floor applies
    wave = torch.full((2, 4000), 0.0)
    wave[0], wave[1, :2500] = a, b
    wave[1, 2500:] = 5.0  # garbage past the length must not leak into centred frames
    ours, lengths = features(wave, torch.tensor([4000, 2500]))
    for i, utt in enumerate((a, b)):
        ref = speechbrain_fbank(utt)
        assert int(lengths[i]) == ref.shape[0]
        torch.testing.assert_close(ours[i, : ref.shape[0]].double(), ref, atol=2e-3, rtol=1e-4)
    assert (ours[1, lengths[1] :] == 0).all()
    ref_b = speechbrain_fbank(b)
    assert (ref_b == ref_b.max() - 80.0).any()  # the floor was exercised


def test_fbank_power_spectrum_is_torchaudios_centred_hamming_spectrogram() -> None:
    """The same features from torchaudio's pieces: a centred, zero-padded Hamming power
    spectrogram, SpeechBrain's filters, 10 log10 with amin 1e-10, an 80 dB floor."""
    import torchaudio

    from models.frontend import speechbrain_mel_filters

    wave = torch.randn(1, 3300, generator=torch.Generator().manual_seed(3))
    spec = torchaudio.transforms.Spectrogram(
        n_fft=400, hop_length=160, window_fn=torch.hamming_window, power=2.0, center=True, pad_mode="constant"
    )(wave)  # (1, 201, t)
    mel = spec.transpose(1, 2) @ speechbrain_mel_filters(201, 80, 16000)
    db = 10 * torch.log10(mel.clamp_min(1e-10))
    expected = torch.maximum(db, db.amax() - 80.0)
    ours, lengths = build_features(make_config("base"))(wave, torch.tensor([3300]))
    assert int(lengths[0]) == expected.shape[1]
    torch.testing.assert_close(ours, expected, atol=1e-3, rtol=1e-4)
    # SpeechBrain's triangles are not torchaudio's HTK ones (those reach the next centre)
    htk = torchaudio.functional.melscale_fbanks(201, 0.0, 8000.0, 80, 16000, norm=None, mel_scale="htk")
    assert (htk > 0).sum() > (speechbrain_mel_filters(201, 80, 16000) > 0).sum()


# ------------------------------------------------------------------------ SpeechBrain ConvolutionFrontEnd


def conv2d_same_stride2(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """3x3 stride-2 convolution with one zero each side; ``(c_in, t, f) -> (c_out, ceil(t/2), ceil(f/2))``."""
    c_in, t, f = x.shape
    xp = torch.zeros(c_in, t + 2, f + 2, dtype=torch.float64)
    xp[:, 1:-1, 1:-1] = x
    out = torch.empty(weight.shape[0], (t + 1) // 2, (f + 1) // 2, dtype=torch.float64)
    for i in range(out.shape[1]):
        for j in range(out.shape[2]):
            patch = xp[:, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3]
            out[:, i, j] = (weight.double() * patch).sum(dim=(1, 2, 3)) + bias.double()
    return out


def released_frontend(front: nn.Module, feats: torch.Tensor) -> torch.Tensor:
    """ConvolutionFrontEnd (2 x [conv -> LayerNorm over (freq, channels) -> LeakyReLU]) then the
    TransformerASR input Linear, one utterance ``(t, n) -> (t / 4, d)``. SpeechBrain flattens
    (freq, channel); ours flattens (channel, freq): a fixed permutation of the Linear's inputs,
    so we restate with our order and our copied weight."""
    x = feats.double()[None]  # (1, t, n)
    for block in front.blocks:
        x = conv2d_same_stride2(x, block.conv.weight, block.conv.bias)  # (c, t, f)
        frames = []
        for t in range(x.shape[1]):
            plane = x[:, t, :].T  # (f, c)
            y = layernorm(plane, block.norm.weight, block.norm.bias, block.norm.eps)
            frames.append(torch.where(y > 0, y, 0.01 * y).T)  # LeakyReLU
        x = torch.stack(frames, dim=1)
    flat = x.permute(1, 0, 2).reshape(x.shape[1], -1)  # (t', c * f)
    return torch.stack([dense(front.proj.weight, front.proj.bias, v) for v in flat])


def test_frontend_matches_convolution_frontend_restatement() -> None:
    config = make_config("base", plan="pom", model_dim=32, encoder={"num_layers": 1}, frontend={"conv_channels": [4, 3], "n_mels": 10})
    front = build_frontend(config).double().eval()
    assert [b.norm.normalized_shape for b in front.blocks] == [(5, 4), (3, 3)]
    for block in front.blocks:  # non-trivial LayerNorm gains, as after training
        nn.init.normal_(block.norm.weight, 1.0, 0.3)
        nn.init.normal_(block.norm.bias, 0.0, 0.3)
    lengths = [13, 8]
    feats, mask = padded(lengths, 13, d=10)
    ours, out_lengths = front(feats, torch.tensor(lengths))
    for i, length in enumerate(lengths):
        ref = released_frontend(front, feats[i, :length])
        assert int(out_lengths[i]) == ref.shape[0]
        torch.testing.assert_close(ours[i, : ref.shape[0]], ref)


# ------------------------------------------------------------------------ mixers


def sinusoid(n: float, d: int) -> torch.Tensor:
    """RelPosEncXL's embedding of an offset: interleaved sin/cos of n / 10000^(2i/d)."""
    e = torch.empty(d, dtype=torch.float64)
    for i in range(d // 2):
        angle = n / 10000.0 ** (2 * i / d)
        e[2 * i], e[2 * i + 1] = math.sin(angle), math.cos(angle)
    return e


def released_relpos(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """SpeechBrain RelPosMHAXL with RelPosEncXL's legacy symmetric table, one utterance ``(t, d)``:
    fused in-projection without bias, score (q+u).k + (q+v).W_pos e(|i-j|) scaled by 1/sqrt(d),
    softmax over the utterance's keys, output projection with bias."""
    t, d = x.shape
    h = m.num_heads
    c = d // h
    w_in = m.qkv.weight.double()  # (3d, d): rows q, k, v
    assert m.qkv.bias is None
    q, k, v = (x.double() @ w_in[i * d : (i + 1) * d].T for i in range(3))  # (t, d) each
    u, vb = m.pos_bias_u.double(), m.pos_bias_v.double()  # (h, c)
    out = torch.zeros(t, d, dtype=torch.float64)
    for head in range(h):
        sl = slice(head * c, (head + 1) * c)
        for i in range(t):
            scores = []
            for j in range(t):
                p = (m.linear_pos.weight.double() @ sinusoid(abs(i - j), d))[sl]
                scores.append(((q[i, sl] + u[head]) @ k[j, sl] + (q[i, sl] + vb[head]) @ p) / math.sqrt(d))
            weights = torch.softmax(torch.stack(scores), dim=0)
            out[i, sl] = sum(weights[j] * v[j, sl] for j in range(t))
    return torch.stack([dense(m.out_proj.weight, m.out_proj.bias, out[i]) for i in range(t)])


def released_pom(m: nn.Module, x_padded: torch.Tensor, length: int) -> torch.Tensor:
    """The released PoM on one row of a padded batch ``(T, d)``: padded frames zeroed, the state
    is the mean over all T frames (padding included), then out(sigmoid(se(x)) * state), LayerNorm."""
    T = x_padded.shape[0]
    x = x_padded.double().clone()
    x[length:] = 0.0
    k = m.degree
    state = 0.0
    for t in range(T):
        hvec = gelu(dense(m.po.weight, m.po.bias, x[t]))
        chunks = hvec.chunk(k)
        prods = [chunks[0]]
        for g in chunks[1:]:
            prods.append(prods[-1] * g)
        state = state + torch.cat(prods) / T
    rows = []
    for t in range(length):
        gate = torch.sigmoid(dense(m.se.weight, m.se.bias, x[t]))
        rows.append(layernorm(dense(m.out.weight, m.out.bias, gate * state), m.norm.weight, m.norm.bias, m.norm.eps))
    return torch.stack(rows)


def paper_summary_mixing(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """SummaryMixing from the paper's equations, one utterance ``(t, d)``: per head, f and s are
    perceptrons (dense + GELU per layer) of that head's slice of x_t; s_bar = mean_t s(x_t); the
    combiner c = GELU(W [f(x_t); s_bar] + b) over all heads."""
    t, d = x.shape
    h = m.num_heads

    def perceptron(layers: nn.ModuleList, v: torch.Tensor) -> torch.Tensor:
        for layer in layers:
            w = layer.weight.double()  # (out, in / h): rows of head g are g*out/h .. (g+1)*out/h
            o, i = w.shape[0] // h, v.numel() // h
            v = torch.cat([w[g * o : (g + 1) * o] @ v[g * i : (g + 1) * i] for g in range(h)])
            v = gelu(v + layer.bias.double())
        return v

    s_bar = sum(perceptron(m.summary, x[i].double()) for i in range(t)) / t
    (combiner,) = m.combiner
    return torch.stack(
        [gelu(dense(combiner.weight, combiner.bias, torch.cat([perceptron(m.local, x[i].double()), s_bar]))) for i in range(t)]
    )


def paper_mixer(name: str, **options) -> nn.Module:
    """A mixer with the options the ``base`` (paper) preset gives it."""
    spec = next(s for s in make_config("base", plan=name, model_dim=D).encoder.layers)
    torch.manual_seed(0)
    return build_mixer(name, D, **{**spec.options, **options}).double().eval()


def test_relpos_matches_relposmhaxl_restatement() -> None:
    m = paper_mixer("mha_relpos", num_heads=H)
    assert (m.score_scale, m.symmetric_positions, m.qkv.bias is None, m.out_proj.bias is not None) == (
        "model_dim", True, True, True,
    )
    nn.init.normal_(m.out_proj.bias)
    x, mask = padded(LENGTHS, max(LENGTHS))
    ours = m(x, mask)
    for i, length in enumerate(LENGTHS):
        torch.testing.assert_close(ours[i, :length], released_relpos(m, x[i, :length]))


def test_pom_matches_released_restatement_with_padding_in_the_mean() -> None:
    m = paper_mixer("pom")
    assert m.pad_mean == "all"
    x, mask = padded(LENGTHS, max(LENGTHS))
    ours = m(x, mask)
    for i, length in enumerate(LENGTHS):
        torch.testing.assert_close(ours[i, :length], released_pom(m, x[i], length))
    with torch.no_grad():  # the chunked inference path computes the same thing
        torch.testing.assert_close(m(x, mask)[0, : LENGTHS[0]], ours[0, : LENGTHS[0]].detach())
    # padding enters the released mean: the same utterance in a longer batch changes
    longer, longer_mask = padded(LENGTHS, max(LENGTHS) + 4)
    longer[:, : max(LENGTHS)] = x
    assert not torch.allclose(m(longer, longer_mask)[2, :3], ours[2, :3])


@pytest.mark.parametrize("heads", [1, 2])
def test_summary_mixing_matches_paper_equations(heads: int) -> None:
    m = paper_mixer("summary_mixing", num_heads=heads)
    assert (m.local_hidden_dim, m.summary_hidden_dim, m.combiner_dim) == (D, D, 0)
    x, mask = padded(LENGTHS, max(LENGTHS))
    ours = m(x, mask)
    for i, length in enumerate(LENGTHS):
        torch.testing.assert_close(ours[i, :length], paper_summary_mixing(m, x[i, :length]))


# ------------------------------------------------------------------------ the Conformer layer


def released_ffn(ffn: nn.Module, v: torch.Tensor) -> torch.Tensor:
    y = layernorm(v, ffn.norm.weight, ffn.norm.bias, ffn.norm.eps)
    return dense(ffn.outer.weight, ffn.outer.bias, gelu(dense(ffn.inner.weight, ffn.inner.bias, y)))


def released_conv(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """LN -> pointwise (2d) -> GLU -> depthwise over the utterance (zeros outside) -> LN -> GELU -> Linear."""
    t, d = x.shape
    glu = []
    for i in range(t):
        y = layernorm(x[i], conv.norm.weight, conv.norm.bias, conv.norm.eps)
        z = dense(conv.pointwise.weight[:, :, 0], conv.pointwise.bias, y)
        glu.append(z[:d] * torch.sigmoid(z[d:]))
    k = conv.depthwise.kernel_size[0]
    out = []
    for i in range(t):
        acc = conv.depthwise.bias.double().clone()
        for j in range(k):
            src = i + j - k // 2
            if 0 <= src < t:
                acc = acc + conv.depthwise.weight[:, 0, j].double() * glu[src]
        y = gelu(layernorm(acc, conv.depthwise_norm.weight, conv.depthwise_norm.bias, conv.depthwise_norm.eps))
        out.append(dense(conv.out.weight, conv.out.bias, y))
    return torch.stack(out)


def released_block(block: nn.Module, x: torch.Tensor, mixer) -> torch.Tensor:
    """SpeechBrain's ConformerEncoderLayer (macaron, no dropout on the mixer output), one utterance."""
    x = torch.stack([v + 0.5 * released_ffn(block.ffn1, v) for v in x.double()])
    normed = torch.stack([layernorm(v, block.mixer_norm.weight, block.mixer_norm.bias) for v in x])
    x = x + mixer(normed)
    x = x + released_conv(block.conv, x)
    return torch.stack(
        [layernorm(v + 0.5 * released_ffn(block.ffn2, v), block.final_norm.weight, block.final_norm.bias) for v in x]
    )


@pytest.mark.parametrize("plan", ["mha_relpos", "pom", "summary_mixing"])
def test_conformer_block_matches_released_layer(plan: str) -> None:
    config = make_config(
        "base", plan=plan, model_dim=D, num_heads=H,
        encoder={"num_layers": 1, "ffn_dim": 24, "conv_kernel": 5},
    )
    assert config.encoder.mixer_dropout is False and config.encoder.init == "xavier_normal"
    torch.manual_seed(0)
    block = build_encoder(config).blocks[0].double().eval()
    assert not any(isinstance(mod, nn.Dropout) for mod in block.mixer_dropout.modules())
    for norm in (block.mixer_norm, block.final_norm, block.conv.norm, block.conv.depthwise_norm):
        nn.init.normal_(norm.weight, 1.0, 0.3)
        nn.init.normal_(norm.bias, 0.0, 0.3)
    x, mask = padded(LENGTHS, max(LENGTHS))
    x = x.masked_fill(mask[..., None], 0.0)  # the encoder hands the block zeros at padding
    ours = block(x, mask)
    for i, length in enumerate(LENGTHS):
        if plan == "mha_relpos":
            mixer = lambda v: released_relpos(block.mixer, v)  # noqa: E731
        elif plan == "pom":  # the released mean sees the whole padded row
            def mixer(v, i=i, length=length):
                row = torch.zeros(max(LENGTHS), D, dtype=torch.float64)
                row[:length] = v
                return released_pom(block.mixer, row, length)
        else:
            mixer = lambda v: paper_summary_mixing(block.mixer, v)  # noqa: E731
        torch.testing.assert_close(ours[i, :length], released_block(block, x[i, :length], mixer))
    assert (ours[mask] == 0).all()
    assert build_encoder(config).final_norm.eps == 1e-6  # SpeechBrain's ConformerEncoder norm


# ------------------------------------------------------------------------ init and the presets


def _xavier_std(p: torch.Tensor) -> float:
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(p)
    return math.sqrt(2.0 / (fan_in + fan_out))


def test_xavier_normal_on_every_encoder_matrix_only() -> None:
    config = make_config("base", plan="pom", model_dim=128, attention_layers=1, encoder={"num_layers": 2, "ffn_dim": 256})
    torch.manual_seed(0)
    model = build_best_rq(config)
    checked = 0
    named = [("encoder." + n, p) for n, p in model.encoder.named_parameters()] + [("frontend.proj.weight", model.frontend.proj.weight)]
    for name, p in named:
        if p.dim() > 1 and p.numel() >= 4000:
            ratio = p.detach().std().item() / _xavier_std(p)
            assert 0.93 < ratio < 1.07, (name, ratio)  # PoM projections included
            assert abs(p.detach().mean().item()) < 0.1 * _xavier_std(p) + 1e-3, name
            checked += 1
    assert checked >= 10
    assert any("mixer.po" in n for n, p in named if p.numel() >= 4000)
    # the front-end's convolutions and the BEST-RQ head keep PyTorch's defaults (uniform)
    head = model.heads[0].weight.detach()
    assert head.abs().max() <= 1 / math.sqrt(head.shape[1]) + 1e-6
    conv = model.frontend.blocks[1].conv.weight.detach()
    assert conv.abs().max() <= 1 / math.sqrt(conv[0].numel()) + 1e-6
    # and the torch default is one field away
    torch.manual_seed(0)
    plain = build_best_rq(make_config("base", plan="pom", model_dim=128, encoder={"num_layers": 1, "ffn_dim": 256, "init": "torch"}))
    w = plain.encoder.blocks[0].mixer.po.weight.detach()
    assert w.abs().max() <= 1 / math.sqrt(w.shape[1]) + 1e-6


def test_base_preset_carries_the_released_options_on_every_layer() -> None:
    config = make_config("base", plan="pom", attention_layers=4, model_dim=488)  # no budget matching: fast
    fe, enc = config.frontend, config.encoder
    assert (fe.fbank, fe.norm, fe.proj_dropout_p) == ("speechbrain", "channels_freq", 0.1)
    assert (enc.init, enc.mixer_dropout, enc.dropout_p) == ("xavier_normal", False, 0.1)
    for spec in enc.layers[:4]:  # the hybrid's lower layers: SpeechBrain's RelPosMHAXL
        assert spec.name == "mha_relpos"
        assert {k: spec.options[k] for k in ("score_scale", "symmetric_positions", "bias", "out_bias")} == {
            "score_scale": "model_dim", "symmetric_positions": True, "bias": False, "out_bias": True,
        }
    assert all(spec.options["pad_mean"] == "all" for spec in enc.layers[4:])
    # each one --set away: the better maths for the upper layers, today's relpos for the lower ones
    other = make_config("base", plan="pom", attention_layers=4, model_dim=488, plan_options={"pad_mean": "masked"},
                        lower_options={"symmetric_positions": False})
    assert other.encoder.layers[4].options["pad_mean"] == "masked"
    assert other.encoder.layers[0].options["symmetric_positions"] is False
    # tiny keeps the CPU-friendly, padding-exact choices
    tiny = make_config("tiny", plan="pom", attention_layers=1)
    assert (tiny.frontend.fbank, tiny.frontend.norm, tiny.encoder.init, tiny.encoder.mixer_dropout) == (
        "unpadded", "channels", "torch", True,
    )
    assert "pad_mean" not in tiny.encoder.layers[1].options and "score_scale" not in tiny.encoder.layers[0].options


def test_paper_run_preset_resolves_to_the_released_encoder_on_a_hybrid() -> None:
    from orchestrator.train.config import run_config_from_dict

    run = run_config_from_dict({"preset": "paper", "model": {"plan": "pom", "attention_layers": 2}})
    enc = run.model.encoder
    assert enc.model_dim % 8 == 0 and enc.init == "xavier_normal" and not enc.mixer_dropout
    assert [s.options.get("score_scale") for s in enc.layers[:2]] == ["model_dim", "model_dim"]
    assert {s.options.get("pad_mean") for s in enc.layers[2:]} == {"all"}
    assert run.model.frontend.fbank == "speechbrain"

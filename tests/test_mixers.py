"""Token mixers: contract, padding invariance, naive references, validation, linear memory.

Dimensions: b batch, t frames, d model dim, h heads, c head dim.

Every test parametrized over ``MIXERS`` covers a newly registered mixer automatically; the naive
references below are written from the equations with Python loops over time, heads and chunks
and share no code with the implementations.
"""

from __future__ import annotations

import math

import pytest
import torch

from models.mixers import MIXERS, build_mixer, get_mixer_class
from models.mixers.attention import rel_shift, sinusoidal_relative_embeddings
from models.mixers.pom import masked_time_mean, polynomial_features, polynomial_features_general

D = 12  # divisible by 2 and 3 (pom_split), head dim 6 with 2 heads (even, for rope)

# Small options so every mixer is cheap; a mixer not listed is built with its defaults.
SMALL: dict[str, dict] = {
    "mha": {"num_heads": 2},
    "mha_relpos": {"num_heads": 2},
    "mha_rope": {"num_heads": 2},
}

# Every registered mixer with small options, plus variants that take other code paths.
VARIANTS: list[tuple[str, dict]] = [(name, SMALL.get(name, {})) for name in sorted(MIXERS)] + [
    ("pom", {"degree": 1}),
    ("pom", {"degree": 3, "expand": 1}),
    ("pom", {"degree": 4, "expand": 1, "bias": False}),
    ("pom_select", {"degree": 3}),
    ("pom_split", {"parts": 3}),
    ("summary_mixing", {"mode": "lite"}),
    ("summary_mixing", {"local_dim": 5, "summary_dim": 7, "combiner_dim": 9}),
    ("summary_mixing", {"local_hidden_dim": 0, "summary_hidden_dim": 0, "combiner_dim": 12}),
    ("summary_mixing", {"num_heads": 3, "local_hidden_dim": 6, "summary_dim": 9}),
    ("summary_mixing", {"num_heads": 2, "mode": "lite", "bias": False}),
    ("mha_relpos", {"num_heads": 3, "score_scale": "model_dim", "symmetric_positions": True}),
    ("mha_rope", {"num_heads": 1, "rope_base": 100.0}),
]
VARIANT_IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in opts.items()) or 'default'}" for name, opts in VARIANTS]


def make(name: str, model_dim: int = D, dtype: torch.dtype = torch.float32, **options):
    torch.manual_seed(0)
    return build_mixer(name, model_dim, **{**SMALL.get(name, {}), **options}).to(dtype)


def lengths_to_mask(lengths: list[int], t: int) -> torch.Tensor:
    """(b, t) bool, True = pad."""
    return torch.arange(t)[None, :] >= torch.tensor(lengths)[:, None]


def padded_batch(lengths: list[int], t: int, d: int = D, dtype=torch.float32, seed: int = 1):
    """Random batch whose padded frames hold large garbage (they must not matter)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), t, d, generator=g, dtype=dtype)
    mask = lengths_to_mask(lengths, t)
    garbage = 100.0 * torch.randn(x.shape, generator=g, dtype=dtype)
    return torch.where(mask[..., None], garbage, x), mask


# --------------------------------------------------------------------------- naive building blocks


def lin(layer: torch.nn.Linear, v: torch.Tensor) -> torch.Tensor:
    y = layer.weight @ v
    return y if layer.bias is None else y + layer.bias


def gelu(v: torch.Tensor) -> torch.Tensor:
    return 0.5 * v * (1.0 + torch.erf(v / math.sqrt(2.0)))


def sigmoid(v: torch.Tensor) -> torch.Tensor:
    return 1.0 / (1.0 + torch.exp(-v))


def layer_norm(norm: torch.nn.LayerNorm, v: torch.Tensor) -> torch.Tensor:
    mean = v.sum() / v.numel()
    var = ((v - mean) ** 2).sum() / v.numel()
    return (v - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def softmax(scores: list[torch.Tensor]) -> list[torch.Tensor]:
    top = max(s for s in scores)
    exps = [torch.exp(s - top) for s in scores]
    total = sum(exps)
    return [e / total for e in exps]


# --------------------------------------------------------------------------- naive PoM family


def naive_poly_state(po, frames, degree, count):
    """mean of [g1, g1*g2, ...] over ``frames`` (list of (d,) vectors), divided by ``count``."""
    state = None
    for x_t in frames:
        h = gelu(lin(po, x_t))
        width = h.numel() // degree
        prod, feats = torch.ones(width, dtype=h.dtype), []
        for i in range(degree):
            prod = prod * h[i * width : (i + 1) * width]
            feats.append(prod)
        term = torch.cat(feats)
        state = term if state is None else state + term
    return state / max(count, 1)


def state_frames(x_seq, length, t, pad_mean):
    """Frames entering the mean: real ones ("masked") or all t with padding zeroed ("all")."""
    real = [x_seq[i] for i in range(length)]
    if pad_mean == "masked":
        return real, length
    return real + [torch.zeros_like(x_seq[0])] * (t - length), t


def naive_pom(m, x_seq, length, t):
    frames, count = state_frames(x_seq, length, t, m.pad_mean)
    state = naive_poly_state(m.po, frames, m.degree, count)
    return [layer_norm(m.norm, lin(m.out, sigmoid(lin(m.se, x_seq[i])) * state)) for i in range(length)]


def naive_pom_select(m, x_seq, length, t):
    frames, count = state_frames(x_seq, length, t, m.pad_mean)
    state = sum(torch.relu(lin(m.po, f)) ** m.degree for f in frames) / max(count, 1)
    return [layer_norm(m.norm, lin(m.out, sigmoid(lin(m.se, x_seq[i])) * state)) for i in range(length)]


def naive_pom_split(m, x_seq, length, t):
    frames, count = state_frames(x_seq, length, t, m.pad_mean)
    c = m.model_dim // m.parts
    states = [
        naive_poly_state(m.po[p], [f[p * c : (p + 1) * c] for f in frames], m.degree, count)
        for p in range(m.parts)
    ]
    out = []
    for i in range(length):
        gated = [sigmoid(lin(m.se[p], x_seq[i][p * c : (p + 1) * c])) * states[p] for p in range(m.parts)]
        out.append(layer_norm(m.norm, lin(m.out, torch.cat(gated))))
    return out


def head_lin(layer, v: torch.Tensor) -> torch.Tensor:
    """A head-split (block-diagonal) layer, one head at a time: weight rows ``(out, in / h)``."""
    h = layer.groups
    i, o = v.numel() // h, layer.weight.shape[0] // h
    parts = [layer.weight[g * o : (g + 1) * o] @ v[g * i : (g + 1) * i] for g in range(h)]
    y = torch.cat(parts)
    return y if layer.bias is None else y + layer.bias


def naive_summary_mixing(m, x_seq, length, t):
    def branch(layers, v):
        for layer in layers:
            v = gelu(head_lin(layer, v))
        return v

    def combine(z):
        if len(m.combiner) == 1:
            return gelu(lin(m.combiner[0], z))
        return lin(m.combiner[1], gelu(lin(m.combiner[0], z)))

    summary = sum(branch(m.summary, x_seq[i]) for i in range(length)) / max(length, 1)
    out = []
    for i in range(length):
        z = summary if m.mode == "lite" else torch.cat([branch(m.local, x_seq[i]), summary])
        out.append(combine(z))
    return out


# --------------------------------------------------------------------------- naive attention


def naive_attention(m, x_seq, length, score_fn):
    """Loop over heads, queries and keys of one sequence's real frames; score_fn(h, i, j, q, k)."""
    h_num, c, d = m.num_heads, m.head_dim, m.model_dim
    qkv = [lin(m.qkv, x_seq[i]) for i in range(length)]
    q = [[v[hh * c : (hh + 1) * c] for hh in range(h_num)] for v in (r[:d] for r in qkv)]
    k = [[v[hh * c : (hh + 1) * c] for hh in range(h_num)] for v in (r[d : 2 * d] for r in qkv)]
    v = [[w[hh * c : (hh + 1) * c] for hh in range(h_num)] for w in (r[2 * d :] for r in qkv)]
    out = []
    for i in range(length):
        heads = []
        for hh in range(h_num):
            probs = softmax([score_fn(hh, i, j, q, k) for j in range(length)])
            heads.append(sum(p * v[j][hh] for j, p in enumerate(probs)))
        out.append(lin(m.out_proj, torch.cat(heads)))
    return out


def naive_mha(m, x_seq, length, t):
    return naive_attention(m, x_seq, length, lambda hh, i, j, q, k: (q[i][hh] @ k[j][hh]) / math.sqrt(m.head_dim))


def offset_embedding(n: int, d: int, symmetric: bool) -> torch.Tensor:
    """Sinusoidal embedding of one relative offset n, element by element."""
    n = abs(n) if symmetric else n
    e = torch.zeros(d, dtype=torch.float64)
    for i in range(0, d, 2):
        angle = n / (10000.0 ** (i / d))
        e[i], e[i + 1] = math.sin(angle), math.cos(angle)
    return e


def naive_relpos(m, x_seq, length, t):
    scale = 1.0 / math.sqrt(m.head_dim if m.score_scale == "head_dim" else m.model_dim)
    c = m.head_dim
    u, v = m.pos_bias_u, m.pos_bias_v

    def score(hh, i, j, q, k):
        p = (m.linear_pos.weight @ offset_embedding(i - j, m.model_dim, m.symmetric_positions).to(x_seq.dtype))
        p = p[hh * c : (hh + 1) * c]
        return ((q[i][hh] + u[hh]) @ k[j][hh] + (q[i][hh] + v[hh]) @ p) * scale

    return naive_attention(m, x_seq, length, score)


def rotation_matrix(pos: int, c: int, base: float) -> torch.Tensor:
    """Block-diagonal RoFormer rotation R_pos (c x c)."""
    r = torch.zeros(c, c, dtype=torch.float64)
    for i in range(c // 2):
        angle = pos * base ** (-2.0 * i / c)
        cs, sn = math.cos(angle), math.sin(angle)
        r[2 * i, 2 * i], r[2 * i, 2 * i + 1] = cs, -sn
        r[2 * i + 1, 2 * i], r[2 * i + 1, 2 * i + 1] = sn, cs
    return r


def naive_rope(m, x_seq, length, t):
    c = m.head_dim

    def score(hh, i, j, q, k):
        qi = rotation_matrix(i, c, m.rope_base).to(x_seq.dtype) @ q[i][hh]
        kj = rotation_matrix(j, c, m.rope_base).to(x_seq.dtype) @ k[j][hh]
        return (qi @ kj) / math.sqrt(c)

    return naive_attention(m, x_seq, length, score)


NAIVE = {
    "mha": naive_mha,
    "mha_relpos": naive_relpos,
    "mha_rope": naive_rope,
    "pom": naive_pom,
    "pom_select": naive_pom_select,
    "pom_split": naive_pom_split,
    "summary_mixing": naive_summary_mixing,
}


# --------------------------------------------------------------------------- contract tests


def test_every_mixer_has_a_naive_reference():
    assert set(NAIVE) == set(MIXERS), "add a naive reference for the new mixer to NAIVE"


def test_class_attributes():
    expected = {
        "mha": ("absolute", True),
        "mha_relpos": ("none", True),
        "mha_rope": ("none", True),
        "pom": ("absolute", False),
        "pom_select": ("absolute", False),
        "pom_split": ("absolute", False),
        "summary_mixing": ("absolute", False),
    }
    for name, cls in MIXERS.items():
        assert cls.positional in ("absolute", "none")
        assert isinstance(cls.is_attention, bool)
        if name in expected:
            assert (cls.positional, cls.is_attention) == expected[name], name


@pytest.mark.parametrize(("name", "options"), VARIANTS, ids=VARIANT_IDS)
def test_shape_and_finite_with_empty_sequence(name, options):
    m = make(name, **options).eval()
    x, mask = padded_batch([7, 4, 0], t=7)  # the last utterance is all padding
    y = m(x, mask)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.isfinite(y).all()
    assert m(x, None).shape == x.shape  # no mask = no padding


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_gradients_reach_every_parameter(name):
    m = make(name).train()
    x, mask = padded_batch([6, 3], t=6)
    x.requires_grad_(True)
    y = m(x, mask)
    (y * torch.randn_like(y)).masked_fill(mask[..., None], 0.0).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for pname, p in m.named_parameters():
        assert p.grad is not None, f"{name}.{pname} gets no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}.{pname} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name}.{pname} has an all-zero gradient"


@pytest.mark.parametrize(("name", "options"), VARIANTS, ids=VARIANT_IDS)
def test_padding_invariance(name, options):
    """A padded batch gives each utterance, at its real frames, what it gets alone."""
    m = make(name, **options).eval()
    lengths = [9, 5, 2, 1]
    x, mask = padded_batch(lengths, t=9)
    with torch.no_grad():
        y = m(x, mask)
        for b, length in enumerate(lengths):
            alone = m(x[b : b + 1, :length], torch.zeros(1, length, dtype=torch.bool))
            torch.testing.assert_close(y[b, :length], alone[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("name", "options"), VARIANTS, ids=VARIANT_IDS)
def test_matches_naive_reference(name, options):
    """Vectorised implementation == per-sequence loop written from the equations (float64)."""
    m = make(name, dtype=torch.float64, **options).eval()
    lengths, t = [6, 4, 1], 6
    x, mask = padded_batch(lengths, t=t, dtype=torch.float64)
    with torch.no_grad():
        y = m(x, mask)
        for b, length in enumerate(lengths):
            ref = NAIVE[name](m, x[b], length, t)
            torch.testing.assert_close(y[b, :length], torch.stack(ref), atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("pad_mean", ["masked", "all"])
@pytest.mark.parametrize("degree", [1, 2, 3])
@pytest.mark.parametrize("t", [5, 40])  # t < d: gating product; t >= d: state folded into W_out
def test_pom_training_and_chunked_inference_paths_match_reference(t, degree, pad_mean, monkeypatch):
    """PoM's autograd path and its chunked, in-place inference path both equal the equations."""
    from models.mixers.pom import PolynomialMixer

    monkeypatch.setattr(PolynomialMixer, "inference_chunk", 7)  # several chunks, a ragged last one
    m = make("pom", model_dim=12, degree=degree, expand=2, pad_mean=pad_mean, dtype=torch.float64).eval()
    lengths = [t, t // 2, 1]
    x, mask = padded_batch(lengths, t=t, d=12, dtype=torch.float64)
    x.requires_grad_(True)
    trained = m(x, mask)  # autograd path
    assert trained.requires_grad
    with torch.inference_mode():
        inferred = m(x, mask)
    for b, length in enumerate(lengths):
        ref = torch.stack(NAIVE["pom"](m, x[b].detach(), length, t))
        torch.testing.assert_close(trained[b, :length].detach(), ref, atol=1e-10, rtol=1e-9)
        torch.testing.assert_close(inferred[b, :length], ref, atol=1e-10, rtol=1e-9)
    (trained.masked_fill(mask[..., None], 0.0) ** 2).sum().backward()
    x_ref = x.detach().requires_grad_(True)
    sum((torch.stack(NAIVE["pom"](m, x_ref[b], length, t)) ** 2).sum() for b, length in enumerate(lengths)).backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-9, rtol=1e-8)
    assert torch.isfinite(x.grad).all() and x.grad[mask].abs().sum() == 0


@pytest.mark.parametrize("name", ["mha", "mha_relpos", "mha_rope"])
def test_attention_zeroes_padded_frames(name):
    m = make(name).eval()
    x, mask = padded_batch([5, 2], t=5)
    y = m(x, mask)
    assert (y[mask] == 0).all()


# --------------------------------------------------------------------------- PoM specifics


@pytest.mark.parametrize("degree", [1, 2, 3, 4, 5])
def test_polynomial_fast_path_equals_general(degree):
    torch.manual_seed(0)
    h = torch.randn(2, 3, degree * 4, dtype=torch.float64)
    general = polynomial_features_general(h, degree)
    torch.testing.assert_close(polynomial_features(h, degree), general)
    chunks = h.chunk(degree, dim=-1)
    torch.testing.assert_close(general[..., -4:], math.prod(chunks))  # last block: g1*...*gk


@pytest.mark.parametrize("name", ["pom", "pom_select", "pom_split"])
def test_pad_mean_all_averages_padding_too(name):
    """``"all"`` reproduces the released code: padding frames (zeroed inputs) enter the mean."""
    lengths, t = [6, 3], 6
    x, mask = padded_batch(lengths, t=t, dtype=torch.float64)
    masked = make(name, dtype=torch.float64, pad_mean="masked").eval()
    all_frames = make(name, dtype=torch.float64, pad_mean="all").eval()
    with torch.no_grad():
        y_masked, y_all = masked(x, mask), all_frames(x, mask)
        # The full-length utterance has no padding: both agree there.
        torch.testing.assert_close(y_all[0], y_masked[0])
        assert not torch.allclose(y_all[1, :3], y_masked[1, :3], atol=1e-6)
        # "all" == the naive mean over all t frames with padded inputs zeroed.
        ref = NAIVE[name](all_frames, x[1], 3, t)
        torch.testing.assert_close(y_all[1, :3], torch.stack(ref), atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("pad_mean", ["masked", "all"])
def test_time_mean_does_not_overflow_in_fp16(pad_mean):
    """4000 frames of 1000: the fp16 sum (4e6) would overflow; the mean (1000) must not."""
    h = torch.full((2, 4000, 3), 1000.0, dtype=torch.float16)
    valid = torch.ones(2, 4000, dtype=torch.bool)
    valid[1, 2000:] = False
    mean = masked_time_mean(h, valid, pad_mean)
    assert mean.dtype == torch.float16 and mean.shape == (2, 1, 3)
    torch.testing.assert_close(mean.float(), torch.full((2, 1, 3), 1000.0))
    zero = masked_time_mean(h, torch.zeros(2, 4000, dtype=torch.bool), "masked")
    assert (zero == 0).all()  # an empty utterance gets a zero state, not NaN


def test_pom_hyperparameters_reach_modules():
    m = make("pom", degree=3, expand=4, bias=False, pad_mean="all")
    assert (m.degree, m.expand, m.pad_mean) == (3, 4, "all")
    assert m.po.out_features == m.se.out_features == m.out.in_features == 3 * 4 * D
    assert m.po.bias is None and m.se.bias is None and m.out.bias is None
    s = make("pom_select", degree=3, expand=4)
    assert s.po.out_features == s.se.out_features == s.out.in_features == 4 * D
    p = make("pom_split", parts=3, degree=2, expand=3)
    assert len(p.po) == len(p.se) == 3
    assert p.po[0].in_features == D // 3 and p.po[0].out_features == 2 * 3 * (D // 3)
    assert p.out.in_features == 2 * 3 * D


def test_pom_parameter_count_paper_config():
    """PoM k=2 D=2 at d=488 (the paper's base): po, se (d -> 4d) and out (4d -> d) + LayerNorm."""
    d, k, e = 488, 2, 2
    w = k * e * d
    expected = 2 * (d * w + w) + (w * d + d) + 2 * d  # = 3*k*e*d^2 + 2*k*e*d + 3*d
    assert expected == 2_863_096
    m = build_mixer("pom", d, degree=k, expand=e)
    assert sum(p.numel() for p in m.parameters()) == expected


def test_attention_parameter_count_paper_config():
    d = 576
    mha = build_mixer("mha", d, num_heads=8)
    assert sum(p.numel() for p in mha.parameters()) == 4 * d * d + 4 * d  # q, k, v, out (+ biases)
    relpos = build_mixer("mha_relpos", d, num_heads=8)
    # + linear_pos (no bias) + pos_bias_u, pos_bias_v (h x c each)
    assert sum(p.numel() for p in relpos.parameters()) == 5 * d * d + 4 * d + 2 * d


@pytest.mark.parametrize("name", sorted(n for n, cls in MIXERS.items() if not cls.is_attention))
def test_linear_mixers_never_build_a_t_by_t_tensor(name):
    """t = 20000: a t x t tensor would hold 4e8 elements; every saved or output tensor stays O(t)."""
    t, d = 20_000, 6
    m = make(name, model_dim=d)
    x = torch.randn(1, t, d, requires_grad=True)
    mask = torch.zeros(1, t, dtype=torch.bool)
    mask[0, t - 100 :] = True
    largest = 0

    def pack(saved: torch.Tensor) -> torch.Tensor:
        nonlocal largest
        largest = max(largest, saved.numel())
        return saved

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda saved: saved):
        y = m(x, mask)
    y.sum().backward()
    width = max(p.numel() for p in m.parameters())  # bounds every per-frame feature width
    assert largest <= t * width < t * t // 100
    assert torch.isfinite(x.grad).all()


# --------------------------------------------------------------------------- attention specifics


def test_rel_shift_against_index_definition():
    torch.manual_seed(0)
    t = 5
    scores = torch.randn(2, 3, t, 2 * t - 1)
    shifted = rel_shift(scores)
    assert shifted.shape == (2, 3, t, t)
    for i in range(t):
        for j in range(t):
            # column m of row i holds offset t - 1 - m; out[i, j] must hold offset i - j.
            torch.testing.assert_close(shifted[..., i, j], scores[..., i, t - 1 - (i - j)])


@pytest.mark.parametrize("symmetric", [False, True])
def test_relative_embeddings_rows_and_cache(symmetric):
    m = make("mha_relpos", dtype=torch.float64, symmetric_positions=symmetric)
    long = m.relative_embeddings(7, torch.device("cpu"), torch.float64)
    short = m.relative_embeddings(3, torch.device("cpu"), torch.float64)  # sliced from the cache
    assert long.shape == (13, D) and short.shape == (5, D)
    for length, table in ((7, long), (3, short)):
        for row in range(2 * length - 1):
            torch.testing.assert_close(table[row], offset_embedding(length - 1 - row, D, symmetric))
    torch.testing.assert_close(short, sinusoidal_relative_embeddings(3, D, symmetric=symmetric, dtype=torch.float64))


def test_relpos_distinguishes_past_from_future_unless_symmetric():
    e = sinusoidal_relative_embeddings(4, D)
    assert not torch.allclose(e[0], e[-1])  # offsets +3 and -3
    e = sinusoidal_relative_embeddings(4, D, symmetric=True)
    torch.testing.assert_close(e[0], e[-1])


def test_rope_scores_depend_on_relative_position_only():
    """Shifting every frame by s positions leaves rotated q.k unchanged (RoFormer property)."""
    m = make("mha_rope", dtype=torch.float64)
    torch.manual_seed(0)
    q, k = torch.randn(2, 1, 1, m.head_dim, dtype=torch.float64).unbind(0)
    cos, sin = m.rotary_tables(20, torch.device("cpu"), torch.float64)
    from models.mixers.attention import rotate_pairs

    def dot(pos_q, pos_k):
        rq = rotate_pairs(q, cos[pos_q : pos_q + 1], sin[pos_q : pos_q + 1])
        rk = rotate_pairs(k, cos[pos_k : pos_k + 1], sin[pos_k : pos_k + 1])
        return (rq * rk).sum()

    torch.testing.assert_close(dot(3, 1), dot(15, 13))
    assert not torch.allclose(dot(3, 1), dot(1, 3))


@pytest.mark.parametrize("name", ["mha", "mha_relpos", "mha_rope", "summary_mixing"])
def test_dropout_applied_in_training_only(name):
    m = make(name, dropout_p=0.5)
    assert m.dropout_p == 0.5
    x, mask = padded_batch([6, 6], t=6)
    m.train()
    torch.manual_seed(1)
    first = m(x, mask)
    second = m(x, mask)
    assert not torch.allclose(first, second)
    m.eval()
    torch.testing.assert_close(m(x, mask), m(x, mask))


def test_attention_hyperparameters_reach_modules():
    m = make("mha_relpos", num_heads=3, bias=False, score_scale="model_dim")
    assert (m.num_heads, m.head_dim) == (3, D // 3)
    assert m.qkv.bias is None and m.out_proj.bias is None and m.linear_pos.bias is None
    assert m.pos_bias_u.shape == m.pos_bias_v.shape == (3, D // 3)
    assert m.scale == pytest.approx(1 / math.sqrt(D))
    assert make("mha_relpos").scale == pytest.approx(1 / math.sqrt(D // 2))
    assert make("mha_rope", rope_base=500).rope_base == 500.0
    released = make("mha_relpos", bias=False, out_bias=True)  # SpeechBrain RelPosMHAXL
    assert released.qkv.bias is None and released.out_proj.bias is not None
    assert make("mha", out_bias=False).out_proj.bias is None and make("mha", out_bias=False).qkv.bias is not None


def test_summary_mixing_hyperparameters_reach_modules():
    m = make(
        "summary_mixing", num_heads=2, local_dim=6, local_hidden_dim=10, summary_dim=8,
        summary_hidden_dim=4, combiner_dim=14, dropout_p=0.25, bias=False,
    )
    shapes = lambda layers: [(layer.in_features, layer.out_features, layer.groups) for layer in layers]  # noqa: E731
    assert shapes(m.local) == [(D, 10, 2), (10, 6, 2)]
    assert shapes(m.summary) == [(D, 4, 2), (4, 8, 2)]
    assert [tuple(layer.weight.shape) for layer in m.local] == [(10, D // 2), (6, 5)]  # block-diagonal
    assert [(c.in_features, c.out_features) for c in m.combiner] == [(6 + 8, 14), (14, D)]
    assert m.dropout.p == 0.25 and all(layer.bias is None for layer in [*m.local, *m.summary, *m.combiner])
    paper = make("summary_mixing")  # the paper's widths: d everywhere, one head, one-layer combiner
    assert shapes(paper.local) == shapes(paper.summary) == [(D, D, 1), (D, D, 1)]
    assert [(c.in_features, c.out_features) for c in paper.combiner] == [(2 * D, D)]
    lite = make("summary_mixing", mode="lite", summary_hidden_dim=0)
    assert lite.local is None and shapes(lite.summary) == [(D, D, 1)]


# --------------------------------------------------------------------------- validation


BAD_ARGS = [
    ("pom", D, {"degree": 0}, "degree"),
    ("pom", D, {"degree": -2}, "degree"),
    ("pom", D, {"degree": 2.5}, "degree"),
    ("pom", D, {"expand": 0}, "expand"),
    ("pom", D, {"pad_mean": "mean"}, "pad_mean"),
    ("pom_select", D, {"degree": 0}, "degree"),
    ("pom_select", D, {"expand": 0}, "expand"),
    ("pom_select", D, {"pad_mean": "none"}, "pad_mean"),
    ("pom_split", D, {"parts": 4}, "parts"),
    ("pom_split", D, {"parts": 1}, "parts"),
    ("pom_split", 10, {"parts": 3}, "parts"),
    ("pom_split", D, {"degree": 0}, "degree"),
    ("pom_split", D, {"expand": 0}, "expand"),
    ("mha", 10, {"num_heads": 3}, "num_heads"),
    ("mha", D, {"num_heads": 0}, "num_heads"),
    ("mha", 16, {"dropout_p": 1.5}, "dropout_p"),
    ("mha_relpos", 10, {"num_heads": 4}, "num_heads"),
    ("mha_relpos", 16, {"score_scale": "sqrt"}, "score_scale"),
    ("mha_relpos", 16, {"dropout_p": -0.1}, "dropout_p"),
    ("mha_rope", D, {"num_heads": 4}, "num_heads"),  # head dim 3 is odd
    ("mha_rope", 16, {"rope_base": 0}, "rope_base"),
    ("summary_mixing", D, {"mode": "medium"}, "mode"),
    ("summary_mixing", D, {"local_dim": 0}, "local_dim"),
    ("summary_mixing", D, {"summary_dim": -1}, "summary_dim"),
    ("summary_mixing", D, {"combiner_dim": -1}, "combiner_dim"),
    ("summary_mixing", D, {"local_hidden_dim": -1}, "local_hidden_dim"),
    ("summary_mixing", D, {"num_heads": 5}, "num_heads"),
    ("summary_mixing", D, {"num_heads": 2, "summary_dim": 7}, "summary branch"),
    ("summary_mixing", D, {"dropout_p": 1.0}, "dropout_p"),
]


@pytest.mark.parametrize(("name", "model_dim", "options", "argument"), BAD_ARGS, ids=[f"{n}-{a}-{o}" for n, _, o, a in BAD_ARGS])
def test_bad_arguments_raise_naming_the_argument(name, model_dim, options, argument):
    with pytest.raises(ValueError, match=argument):
        get_mixer_class(name)(model_dim=model_dim, **options)


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_bad_model_dim_and_unknown_option(name):
    with pytest.raises(ValueError, match="model_dim"):
        get_mixer_class(name)(model_dim=0)
    with pytest.raises(ValueError, match="not_an_option"):
        build_mixer(name, D, not_an_option=1)


def test_options_are_keyword_only():
    for name, cls in MIXERS.items():
        with pytest.raises(TypeError):
            cls(D, 2)  # options must be named


def test_unknown_mixer_lists_valid_names():
    with pytest.raises(ValueError) as err:
        build_mixer("transformer", D)
    for name in MIXERS:
        assert name in str(err.value)


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_bad_input_shapes_raise(name):
    m = make(name)
    with pytest.raises(ValueError):
        m(torch.randn(2, 5, D + 1), torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="padding_mask"):
        m(torch.randn(2, 5, D), torch.zeros(2, 5))  # float mask: wrong polarity type

"""Softmax self-attention mixers: absolute (plain), Transformer-XL relative, and rotary positions.

Dimensions: b batch, t frames, d model dim, h heads, c head dim (d / h), r relative offsets (2t - 1).
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from models.mixers.base import Positional, TokenMixer

SCORE_SCALES: tuple[str, ...] = ("head_dim", "model_dim")


def _check_heads(model_dim: int, num_heads: object) -> int:
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive integer, got {num_heads!r}")
    if model_dim % num_heads != 0:
        raise ValueError(f"model_dim={model_dim} must be divisible by num_heads={num_heads}")
    return num_heads


def _check_dropout(dropout_p: object) -> float:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    return float(dropout_p)


def key_mask(padding_mask: torch.Tensor) -> torch.Tensor:
    """Boolean SDPA mask ``(b, 1, 1, t)``, ``True`` = may attend.

    A sequence made only of padding would have every key masked (softmax over nothing = NaN); it
    attends to all its (padded) keys instead and its outputs are zeroed afterwards.
    """
    keep = ~padding_mask | padding_mask.all(dim=-1, keepdim=True)  # (b, t)
    return keep[:, None, None, :]


class _AttentionBase(TokenMixer):
    """Shared pieces: fused q/k/v projection, output projection, head split/merge."""

    is_attention: ClassVar[bool] = True

    def __init__(
        self, model_dim: int, *, num_heads: int, dropout_p: float, bias: bool, out_bias: bool | None = None
    ) -> None:
        super().__init__(model_dim)
        self.num_heads = _check_heads(model_dim, num_heads)
        self.head_dim = model_dim // self.num_heads
        self.dropout_p = _check_dropout(dropout_p)
        for name, value in (("bias", bias), ("out_bias", out_bias)):
            if not isinstance(value, bool) and not (name == "out_bias" and value is None):
                raise ValueError(f"{name} must be true or false, got {value!r}")
        self.qkv = nn.Linear(model_dim, 3 * model_dim, bias=bias)  # fused, as SpeechBrain's in_proj_weight
        self.out_proj = nn.Linear(model_dim, model_dim, bias=bias if out_bias is None else out_bias)

    def extra_repr(self) -> str:
        return f"model_dim={self.model_dim}, num_heads={self.num_heads}, dropout_p={self.dropout_p}"

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(b, t, d) -> three (b, h, t, c)."""
        qkv = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim))  # (b, t, 3, h, c)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (b, h, t, c)
        return q, k, v

    def _merge(self, y: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        """(b, h, t, c) -> (b, t, d) through out_proj, padded frames zeroed."""
        y = y.transpose(1, 2).flatten(2)  # (b, t, d)
        return self.out_proj(y).masked_fill(padding_mask.unsqueeze(-1), 0.0)

    @property
    def _attn_dropout(self) -> float:
        return self.dropout_p if self.training else 0.0


class MultiHeadAttention(_AttentionBase):
    """Multi-head self-attention on ``F.scaled_dot_product_attention`` (absolute positions).

    Padded keys are masked; outputs at padded frames are zeroed (always finite).

    Args:
        model_dim: ``d``, divisible by ``num_heads``.
        num_heads: ``h`` (default 8).
        dropout_p: attention-probability dropout, applied in training only (default 0.0).
        bias: whether the q/k/v and output projections have biases (default True).
        out_bias: whether the output projection has one (default: as ``bias``).
    """

    positional: ClassVar[Positional] = "absolute"

    def __init__(
        self,
        model_dim: int,
        *,
        num_heads: int = 8,
        dropout_p: float = 0.0,
        bias: bool = True,
        out_bias: bool | None = None,
    ) -> None:
        super().__init__(model_dim, num_heads=num_heads, dropout_p=dropout_p, bias=bias, out_bias=out_bias)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        """Mix tokens.

        Args:
            x: ``(b, t, d)`` input.
            padding_mask: ``(b, t)`` bool, ``True`` at padded frames.

        Returns:
            ``(b, t, d)`` output, zero at padded frames.
        """
        padding_mask = self.check_inputs(x, padding_mask)
        q, k, v = self._qkv(x)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=key_mask(padding_mask), dropout_p=self._attn_dropout
        )  # (b, h, t, c)
        return self._merge(y, padding_mask)


def sinusoidal_relative_embeddings(
    length: int,
    dim: int,
    *,
    symmetric: bool = False,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Sinusoidal embeddings of the relative offsets ``length-1, ..., 0, ..., -(length-1)``.

    Row ``m`` embeds offset ``n = length - 1 - m``:
    ``e[2i] = sin(n / 10000^(2i/dim))``, ``e[2i+1] = cos(n / 10000^(2i/dim))``.

    Args:
        length: ``t``.
        dim: embedding width (even).
        symmetric: embed ``|n|`` instead of ``n``, so ``-n`` and ``+n`` get the same embedding
            (SpeechBrain ``RelPosEncXL``'s legacy default, speechbrain issue #3070).

    Returns:
        ``(2t - 1, dim)`` embeddings.
    """
    if dim % 2 != 0:
        raise ValueError(f"relative position embeddings need an even dim, got {dim}")
    offsets = torch.arange(length - 1, -length, -1, device=device, dtype=torch.float64)  # (r,)
    if symmetric:
        offsets = offsets.abs()
    inv_freq = torch.exp(
        torch.arange(0, dim, 2, device=device, dtype=torch.float64) * (-math.log(10000.0) / dim)
    )  # (dim/2,)
    angles = offsets[:, None] * inv_freq[None, :]  # (r, dim/2)
    emb = torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1)  # (r, dim), interleaved
    return emb.to(dtype)


def rel_shift(scores: torch.Tensor) -> torch.Tensor:
    """Turn offset-indexed scores into query/key-indexed scores (Transformer-XL).

    Args:
        scores: ``(..., t, 2t - 1)``; column ``m`` of row ``i`` belongs to offset ``t - 1 - m``.

    Returns:
        ``(..., t, t)`` with ``out[..., i, j] = scores[..., i, t - 1 - i + j]`` (offset ``i - j``).

    Pad one zero column on the left, read the ``t x 2t`` block as ``2t x t``, drop the first row
    and read the rest as ``t x (2t - 1)``: row ``i`` is then shifted left by ``t - 1 - i``.
    """
    *lead, t, r = scores.shape
    if r != 2 * t - 1:
        raise ValueError(f"rel_shift expects (..., t, 2t - 1) scores, got {tuple(scores.shape)}")
    padded = F.pad(scores, (1, 0))  # (..., t, 2t)
    padded = padded.reshape(*lead, 2 * t, t)[..., 1:, :]  # (..., 2t - 1, t)
    return padded.reshape(*lead, t, r)[..., :t]  # (..., t, t)


class RelPosMultiHeadAttention(_AttentionBase):
    """Transformer-XL relative-position multi-head attention (SpeechBrain ``RelPosMHAXL`` behaviour).

    With ``p = linear_pos(E)``, ``E`` the sinusoidal embeddings of offsets ``t-1 .. -(t-1)``
    (computed here and cached), and learned per-head biases ``u`` and ``v``::

        score[i, j] = ((q_i + u) . k_j + (q_i + v) . p_{i-j}) / sqrt(c)     (offset i - j)
        y_i = sum_j softmax_j(score[i, :], padded keys masked) v_j

    The position term is computed for all ``2t - 1`` offsets and aligned with :func:`rel_shift`,
    then passed to SDPA as an additive mask. This mixer encodes positions itself
    (``positional = "none"``).

    SpeechBrain's ``RelPosMHAXL`` + ``RelPosEncXL`` (what the paper's RelPos baseline ran) differs
    from the equations above in two ways, both available here: it scales scores by
    ``1/sqrt(d)`` instead of ``1/sqrt(c)`` (``score_scale="model_dim"``) and, by default, gives
    offsets ``-n`` and ``+n`` the same embedding (``symmetric_positions=True``). Its fused q/k/v
    projection has no bias and its output projection has one (``bias=False, out_bias=True``).

    Args:
        model_dim: ``d``, divisible by ``num_heads``, even.
        num_heads: ``h`` (default 8).
        dropout_p: attention-probability dropout, applied in training only (default 0.0).
        bias: whether the q/k/v and output projections have biases (default True);
            ``linear_pos`` never has one.
        out_bias: whether the output projection has one (default: as ``bias``).
        score_scale: ``"head_dim"`` (default, ``1/sqrt(c)``) or ``"model_dim"`` (``1/sqrt(d)``,
            SpeechBrain).
        symmetric_positions: embed ``|i - j|`` instead of ``i - j`` (default False; True is
            SpeechBrain's legacy behaviour, blind to past versus future).
    """

    positional: ClassVar[Positional] = "none"

    def __init__(
        self,
        model_dim: int,
        *,
        num_heads: int = 8,
        dropout_p: float = 0.0,
        bias: bool = True,
        out_bias: bool | None = None,
        score_scale: Literal["head_dim", "model_dim"] = "head_dim",
        symmetric_positions: bool = False,
    ) -> None:
        super().__init__(model_dim, num_heads=num_heads, dropout_p=dropout_p, bias=bias, out_bias=out_bias)
        if model_dim % 2 != 0:
            raise ValueError(f"model_dim must be even for sinusoidal relative positions, got {model_dim}")
        if score_scale not in SCORE_SCALES:
            raise ValueError(f"score_scale must be one of {SCORE_SCALES}, got {score_scale!r}")
        self.score_scale = score_scale
        self.scale = 1.0 / math.sqrt(self.head_dim if score_scale == "head_dim" else model_dim)
        self.symmetric_positions = bool(symmetric_positions)
        self.linear_pos = nn.Linear(model_dim, model_dim, bias=False)
        self.pos_bias_u = nn.Parameter(torch.empty(self.num_heads, self.head_dim))
        self.pos_bias_v = nn.Parameter(torch.empty(self.num_heads, self.head_dim))
        nn.init.xavier_uniform_(self.pos_bias_u)
        nn.init.xavier_uniform_(self.pos_bias_v)
        # Largest table computed so far, per (device, dtype); shorter lengths slice its centre.
        self._pos_cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, score_scale={self.score_scale!r}, "
            f"symmetric_positions={self.symmetric_positions}"
        )

    def relative_embeddings(self, length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``(2 * length - 1, d)`` sinusoidal embeddings of offsets ``length-1 .. -(length-1)``."""
        key = (device, dtype)
        table = self._pos_cache.get(key)
        if table is None or table.shape[0] < 2 * length - 1:
            table = sinusoidal_relative_embeddings(
                length, self.model_dim, symmetric=self.symmetric_positions, device=device, dtype=dtype
            )
            self._pos_cache[key] = table
        longest = (table.shape[0] + 1) // 2
        return table[longest - length : longest + length - 1]  # centre: offsets length-1 .. -(length-1)

    def position_scores(self, q: torch.Tensor, length: int) -> torch.Tensor:
        """Unshifted position term ``(q + v) . p`` for every offset: (b, h, t, c) -> (b, h, t, 2t-1)."""
        emb = self.relative_embeddings(length, q.device, q.dtype)  # (r, d)
        p = self.linear_pos(emb).unflatten(-1, (self.num_heads, self.head_dim)).transpose(0, 1)  # (h, r, c)
        return (q + self.pos_bias_v[None, :, None, :]) @ p.transpose(-1, -2)  # (b, h, t, r)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        """Mix tokens.

        Args:
            x: ``(b, t, d)`` input.
            padding_mask: ``(b, t)`` bool, ``True`` at padded frames.

        Returns:
            ``(b, t, d)`` output, zero at padded frames.
        """
        padding_mask = self.check_inputs(x, padding_mask)
        t = x.shape[1]
        q, k, v = self._qkv(x)  # (b, h, t, c)
        # The position term enters SDPA as an additive float mask, padded keys as -inf.
        pos_scores = rel_shift(self.position_scores(q, t)) * self.scale  # (b, h, t, t)
        pos_scores = pos_scores.masked_fill(~key_mask(padding_mask), float("-inf"))
        q_u = q + self.pos_bias_u[None, :, None, :]
        y = F.scaled_dot_product_attention(
            q_u, k, v, attn_mask=pos_scores, dropout_p=self._attn_dropout, scale=self.scale
        )  # (b, h, t, c)
        return self._merge(y, padding_mask)


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive feature pairs ``(x_{2i}, x_{2i+1})`` by the angles behind ``cos``/``sin``.

    Args:
        x: ``(..., t, c)``.
        cos, sin: ``(t, c / 2)``.

    Returns:
        ``(..., t, c)``: ``(x_{2i} cos - x_{2i+1} sin, x_{2i} sin + x_{2i+1} cos)`` per pair.
    """
    pairs = x.unflatten(-1, (-1, 2))  # (..., t, c/2, 2)
    even, odd = pairs.unbind(-1)
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)


class RotaryMultiHeadAttention(_AttentionBase):
    """Rotary-position multi-head attention (RoFormer), on ``F.scaled_dot_product_attention``.

    Per head, query and key at frame ``m`` are rotated pairwise: pair ``i`` (features ``2i, 2i+1``)
    by angle ``m * base^(-2i/c)``, so ``q_m . k_n`` depends on ``m - n`` only. This mixer encodes
    positions itself (``positional = "none"``).

    Args:
        model_dim: ``d``, divisible by ``num_heads``; head dim ``c`` must be even.
        num_heads: ``h`` (default 8).
        dropout_p: attention-probability dropout, applied in training only (default 0.0).
        bias: whether the q/k/v and output projections have biases (default True).
        out_bias: whether the output projection has one (default: as ``bias``).
        rope_base: the rotary base (default 10000).
    """

    positional: ClassVar[Positional] = "none"

    def __init__(
        self,
        model_dim: int,
        *,
        num_heads: int = 8,
        dropout_p: float = 0.0,
        bias: bool = True,
        out_bias: bool | None = None,
        rope_base: float = 10000.0,
    ) -> None:
        super().__init__(model_dim, num_heads=num_heads, dropout_p=dropout_p, bias=bias, out_bias=out_bias)
        if self.head_dim % 2 != 0:
            raise ValueError(
                f"model_dim / num_heads must be even for rotary positions, got "
                f"model_dim={model_dim}, num_heads={num_heads}"
            )
        if isinstance(rope_base, bool) or not isinstance(rope_base, (int, float)) or rope_base <= 1:
            raise ValueError(f"rope_base must be a number > 1, got {rope_base!r}")
        self.rope_base = float(rope_base)
        self._rope_cache: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rope_base={self.rope_base}"

    def rotary_tables(self, length: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin`` of shape ``(length, c / 2)`` for positions ``0 .. length-1``."""
        key = (device, dtype)
        cached = self._rope_cache.get(key)
        if cached is None or cached[0].shape[0] < length:
            inv_freq = self.rope_base ** (
                -torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float64) / self.head_dim
            )  # (c/2,)
            angles = torch.arange(length, device=device, dtype=torch.float64)[:, None] * inv_freq  # (t, c/2)
            cached = (angles.cos().to(dtype), angles.sin().to(dtype))
            self._rope_cache[key] = cached
        return cached[0][:length], cached[1][:length]

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        """Mix tokens.

        Args:
            x: ``(b, t, d)`` input.
            padding_mask: ``(b, t)`` bool, ``True`` at padded frames.

        Returns:
            ``(b, t, d)`` output, zero at padded frames.
        """
        padding_mask = self.check_inputs(x, padding_mask)
        q, k, v = self._qkv(x)  # (b, h, t, c)
        cos, sin = self.rotary_tables(x.shape[1], x.device, x.dtype)
        q, k = rotate_pairs(q, cos, sin), rotate_pairs(k, cos, sin)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=key_mask(padding_mask), dropout_p=self._attn_dropout
        )  # (b, h, t, c)
        return self._merge(y, padding_mask)


__all__ = [
    "MultiHeadAttention",
    "RelPosMultiHeadAttention",
    "RotaryMultiHeadAttention",
    "key_mask",
    "rel_shift",
    "rotate_pairs",
    "sinusoidal_relative_embeddings",
]

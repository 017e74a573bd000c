"""Polynomial Mixers (PoM): linear-time token mixers built on a mean-pooled polynomial state.

Dimensions: b batch, t frames, d model dim, k degree, e expand (D in the paper), w = k*e*d width.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from models.mixers.base import Positional, TokenMixer, needs_autograd

PadMean = Literal["masked", "all"]
PAD_MEANS: tuple[str, ...] = ("masked", "all")


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_pad_mean(pad_mean: object) -> str:
    if pad_mean not in PAD_MEANS:
        raise ValueError(f"pad_mean must be one of {PAD_MEANS}, got {pad_mean!r}")
    return str(pad_mean)


def polynomial_features(h: torch.Tensor, degree: int) -> torch.Tensor:
    """Cumulative products of the ``degree`` chunks of ``h``, concatenated.

    With ``h = [g_1, ..., g_k]`` split along the last dimension,
    returns ``[g_1, g_1*g_2, ..., g_1*...*g_k]`` (same width as ``h``).

    Args:
        h: ``(..., k * c)`` activations.
        degree: ``k``, the number of chunks (polynomial order).

    Returns:
        ``(..., k * c)`` polynomial features.
    """
    if degree == 1:
        return h
    if degree == 2:  # fast path: the paper's main configuration
        g1, g2 = h.chunk(2, dim=-1)
        return torch.cat([g1, g1 * g2], dim=-1)
    if degree == 3:
        g1, g2, g3 = h.chunk(3, dim=-1)
        g12 = g1 * g2
        return torch.cat([g1, g12, g12 * g3], dim=-1)
    return polynomial_features_general(h, degree)


def polynomial_features_general(h: torch.Tensor, degree: int) -> torch.Tensor:
    """General-degree path of :func:`polynomial_features` (``torch.cumprod`` over chunks)."""
    chunks = h.unflatten(-1, (degree, -1))  # (..., k, c)
    return torch.cumprod(chunks, dim=-2).flatten(-2)  # (..., k*c)


def masked_time_mean(h: torch.Tensor, valid: torch.Tensor, pad_mean: str = "masked") -> torch.Tensor:
    """Mean over time of ``h``.

    Args:
        h: ``(b, t, c)`` features.
        valid: ``(b, t)`` bool, ``True`` at real frames.
        pad_mean: ``"masked"`` averages real frames only; ``"all"`` averages all ``t`` frames,
            padding included (the released PoM code's behaviour: results then depend on how much
            padding the batch has).

    Returns:
        ``(b, 1, c)`` the time-averaged state.
    """
    # Sum and divide in at least float32: in fp16, summing thousands of frames before dividing by
    # the count overflows (65504) even when the mean itself is small.
    acc = torch.promote_types(h.dtype, torch.float32)
    if pad_mean == "all":
        return (h.sum(dim=1, keepdim=True, dtype=acc) / h.shape[1]).to(h.dtype)
    weights = valid.to(h.dtype).unsqueeze(-1)  # (b, t, 1)
    count = valid.sum(dim=1).clamp_min(1).to(acc)[:, None, None]  # (b, 1, 1); empty utterance -> 0 state
    return ((h * weights).sum(dim=1, keepdim=True, dtype=acc) / count).to(h.dtype)


class _PoMBase(TokenMixer):
    """Shared validation for the PoM family; subclasses implement :meth:`gated_state`."""

    positional: ClassVar[Positional] = "absolute"
    is_attention: ClassVar[bool] = False

    def __init__(
        self, model_dim: int, *, degree: int, expand: int, bias: bool, pad_mean: PadMean
    ) -> None:
        super().__init__(model_dim)
        self.degree = _check_int("degree", degree, 1)
        self.expand = _check_int("expand", expand, 1)
        self.pad_mean = _check_pad_mean(pad_mean)
        self.bias = bool(bias)

    def extra_repr(self) -> str:
        return f"model_dim={self.model_dim}, degree={self.degree}, expand={self.expand}, pad_mean={self.pad_mean!r}"


def time_mean_weights(valid: torch.Tensor, dtype: torch.dtype, pad_mean: str = "masked") -> torch.Tensor:
    """``(b, 1, t)`` weights whose product with ``(b, t, c)`` features is their time mean.

    ``valid / count`` per frame (``"masked"``) or ``1 / t`` everywhere (``"all"``); each term is at
    most 1, so the product stays finite in fp16 where a sum of thousands of frames would not.
    """
    if pad_mean == "all":
        return torch.full((valid.shape[0], 1, valid.shape[1]), 1.0 / max(1, valid.shape[1]), dtype=dtype, device=valid.device)
    count = valid.sum(dim=1, keepdim=True).clamp_min(1)  # (b, 1); empty utterance -> 0 state
    return (valid.to(dtype) / count.to(dtype)).unsqueeze(1)


# In-place GELU (no public functional form; the out-of-place one where it is missing).
_gelu_ = getattr(torch._C._nn, "gelu_", F.gelu)


class PolynomialMixer(_PoMBase):
    """Polynomial Mixer (PoM), the paper's linear-complexity replacement for self-attention.

    With ``w = degree * expand * model_dim``::

        x     = x with padded frames zeroed
        h     = GELU(po(x))                      po: Linear(d, w)
        H     = [g1, g1*g2, ..., g1*...*gk]      g_i: the k chunks of h, width expand*d each
        state = mean_t H                         over real frames ("masked") or all frames ("all")
        y     = LayerNorm(out(sigmoid(se(x)) * state))   se: Linear(d, w), out: Linear(w, d)

    Time and memory are linear in ``t``: no ``t x t`` tensor is ever built. Two implementations
    of these equations (equal to ~1e-6, tested against a naive reference):

    - with autograd: the time mean is a product ``(valid / count) @ H_i`` per cumulative product
      (no concatenated or masked ``(b, t, w)`` copy), and when ``t >= d`` the state is folded
      into a per-utterance output weight, ``out(g * state) = g @ (W_out * state)^T + b_out``
      (a ``b x d x w`` weight instead of a ``b x t x w`` gating product);
    - without autograd (``torch.no_grad``/``inference_mode``): the same in two passes over time
      chunks of ``inference_chunk`` frames (the state, then the output), GELU, products and
      sigmoid in place: nothing of size ``t x w`` is allocated and the elementwise work runs on
      cache-resident data (``benchmarks/pom_roofline.py``: within 1.25x of the three matrix
      products alone).

    Args:
        model_dim: ``d``.
        degree: ``k`` >= 1, polynomial order (default 2).
        expand: ``D`` >= 1, width multiplier of each chunk (default 2).
        bias: whether ``po``, ``se`` and ``out`` have biases (default True).
        pad_mean: ``"masked"`` (default) or ``"all"``, see :func:`masked_time_mean`.
    """

    inference_chunk: ClassVar[int] = 1024
    """Frames per time chunk of the inference path."""

    def __init__(
        self,
        model_dim: int,
        *,
        degree: int = 2,
        expand: int = 2,
        bias: bool = True,
        pad_mean: PadMean = "masked",
    ) -> None:
        super().__init__(model_dim, degree=degree, expand=expand, bias=bias, pad_mean=pad_mean)
        width = self.degree * self.expand * model_dim
        self.po = nn.Linear(model_dim, width, bias=bias)
        self.se = nn.Linear(model_dim, width, bias=bias)
        self.out = nn.Linear(width, model_dim, bias=bias)
        self.norm = nn.LayerNorm(model_dim)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        """Mix tokens.

        Args:
            x: ``(b, t, d)`` input.
            padding_mask: ``(b, t)`` bool, ``True`` at padded frames.

        Returns:
            ``(b, t, d)`` output.
        """
        padding_mask = self.check_inputs(x, padding_mask)
        x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        weights = time_mean_weights(~padding_mask, x.dtype, self.pad_mean)  # (b, 1, t)
        if x.shape[1] > 0 and not needs_autograd(self, x):
            return self.norm(self._forward_chunked(x, weights))
        feats = self._features(self.po(x), inplace=False)  # k x (b, t, e*d)
        state = torch.cat([torch.matmul(weights.to(f.dtype), f) for f in feats], dim=-1)  # (b, 1, w)
        del feats
        return self.norm(self._output(self.se(x), state, inplace=False))  # (b, t, d)

    def _features(self, p: torch.Tensor, *, inplace: bool) -> list[torch.Tensor]:
        """GELU, then the cumulative products of the k chunks: (b, t, w) -> k x (b, t, w/k)."""
        if inplace:
            chunks = _gelu_(p).chunk(self.degree, dim=-1)
            for i in range(1, self.degree):
                chunks[i].mul_(chunks[i - 1])  # g_1 * ... * g_i, in place
            return list(chunks)
        g = F.gelu(p).chunk(self.degree, dim=-1)
        out = [g[0]]
        for gi in g[1:]:
            out.append(out[-1] * gi)
        return out

    def _output(self, s: torch.Tensor, state: torch.Tensor, *, inplace: bool) -> torch.Tensor:
        """out(sigmoid(s) * state): (b, t, w), (b, 1, w) -> (b, t, d)."""
        gate = torch.sigmoid_(s) if inplace else torch.sigmoid(s)
        if s.shape[1] < self.model_dim:  # a folded b x w x d weight would be larger than the gating product
            return self.out(gate * state.to(gate.dtype))
        weight = (self.out.weight.unsqueeze(0) * state.to(self.out.weight.dtype)).transpose(1, 2)  # (b, w, d)
        weight = weight.to(gate.dtype)
        if self.out.bias is None:
            return torch.bmm(gate, weight)
        return torch.baddbmm(self.out.bias.to(gate.dtype), gate, weight)

    def _forward_chunked(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Inference path: two passes over time chunks; returns the output before the LayerNorm."""
        step = self.inference_chunk
        acc = torch.promote_types(x.dtype, torch.float32)
        state: torch.Tensor | None = None  # accumulated in at least float32
        for start in range(0, x.shape[1], step):  # pass 1: the state
            sl = slice(start, start + step)
            feats = self._features(self.po(x[:, sl]), inplace=True)
            part = torch.cat([torch.matmul(weights[..., sl].to(f.dtype), f) for f in feats], dim=-1).to(acc)
            state = part if state is None else state.add_(part)
        y: torch.Tensor | None = None
        for start in range(0, x.shape[1], step):  # pass 2: the output
            sl = slice(start, start + step)
            out = self._output(self.se(x[:, sl]), state, inplace=True)
            if y is None:
                y = out.new_empty(x.shape[0], x.shape[1], self.model_dim)
            y[:, sl] = out
        return y


class SelectPolynomialMixer(_PoMBase):
    """PoM with a single projection raised to a power ("select" variant).

    ::

        h     = ReLU(po(x)) ** k                 po: Linear(d, expand*d)
        state = mean_t h
        y     = LayerNorm(out(sigmoid(se(x)) * state))   se: Linear(d, expand*d), out: Linear(expand*d, d)

    Args:
        model_dim: ``d``.
        degree: ``k`` >= 1, the power (default 2).
        expand: ``D`` >= 1, width multiplier (default 2).
        bias: whether the linear layers have biases (default True).
        pad_mean: ``"masked"`` (default) or ``"all"``, see :func:`masked_time_mean`.
    """

    def __init__(
        self,
        model_dim: int,
        *,
        degree: int = 2,
        expand: int = 2,
        bias: bool = True,
        pad_mean: PadMean = "masked",
    ) -> None:
        super().__init__(model_dim, degree=degree, expand=expand, bias=bias, pad_mean=pad_mean)
        width = self.expand * model_dim
        self.po = nn.Linear(model_dim, width, bias=bias)
        self.se = nn.Linear(model_dim, width, bias=bias)
        self.out = nn.Linear(width, model_dim, bias=bias)
        self.norm = nn.LayerNorm(model_dim)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        """Mix tokens.

        Args:
            x: ``(b, t, d)`` input.
            padding_mask: ``(b, t)`` bool, ``True`` at padded frames.

        Returns:
            ``(b, t, d)`` output.
        """
        padding_mask = self.check_inputs(x, padding_mask)
        valid = ~padding_mask
        x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        h = F.relu(self.po(x)).pow(self.degree)  # (b, t, e*d)
        state = masked_time_mean(h, valid, self.pad_mean)  # (b, 1, e*d)
        return self.norm(self.out(torch.sigmoid(self.se(x)) * state))  # (b, t, d)


class SplitPolynomialMixer(_PoMBase):
    """Frequency-aware PoM: the feature dimension is split in ``parts`` equal chunks.

    Chunk ``i`` (width ``c = d / parts``) has its own ``po_i, se_i: Linear(c, k*e*c)`` and its own
    polynomial state (as in :class:`PolynomialMixer`); the gated states of all chunks are
    concatenated (width ``k*e*d``) into one shared ``out: Linear(k*e*d, d)``, then LayerNorm(d).

    Args:
        model_dim: ``d``, divisible by ``parts``.
        parts: 2 or 3 (default 2).
        degree: ``k`` >= 1 (default 2).
        expand: ``D`` >= 1 (default 2).
        bias: whether the linear layers have biases (default True).
        pad_mean: ``"masked"`` (default) or ``"all"``, see :func:`masked_time_mean`.
    """

    def __init__(
        self,
        model_dim: int,
        *,
        parts: int = 2,
        degree: int = 2,
        expand: int = 2,
        bias: bool = True,
        pad_mean: PadMean = "masked",
    ) -> None:
        super().__init__(model_dim, degree=degree, expand=expand, bias=bias, pad_mean=pad_mean)
        if isinstance(parts, bool) or parts not in (2, 3):
            raise ValueError(f"parts must be 2 or 3, got {parts!r}")
        if model_dim % parts != 0:
            raise ValueError(f"parts={parts} must divide model_dim={model_dim}")
        self.parts = parts
        chunk = model_dim // parts
        width = self.degree * self.expand * chunk
        self.po = nn.ModuleList(nn.Linear(chunk, width, bias=bias) for _ in range(parts))
        self.se = nn.ModuleList(nn.Linear(chunk, width, bias=bias) for _ in range(parts))
        self.out = nn.Linear(parts * width, model_dim, bias=bias)
        self.norm = nn.LayerNorm(model_dim)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, parts={self.parts}"

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        """Mix tokens.

        Args:
            x: ``(b, t, d)`` input.
            padding_mask: ``(b, t)`` bool, ``True`` at padded frames.

        Returns:
            ``(b, t, d)`` output.
        """
        padding_mask = self.check_inputs(x, padding_mask)
        valid = ~padding_mask
        x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        gated = []
        for xi, po, se in zip(x.chunk(self.parts, dim=-1), self.po, self.se):  # xi: (b, t, d/parts)
            h = polynomial_features(F.gelu(po(xi)), self.degree)  # (b, t, k*e*d/parts)
            state = masked_time_mean(h, valid, self.pad_mean)  # (b, 1, k*e*d/parts)
            gated.append(torch.sigmoid(se(xi)) * state)
        return self.norm(self.out(torch.cat(gated, dim=-1)))  # (b, t, d)


__all__ = [
    "PAD_MEANS",
    "PolynomialMixer",
    "SelectPolynomialMixer",
    "SplitPolynomialMixer",
    "masked_time_mean",
    "time_mean_weights",
    "polynomial_features",
    "polynomial_features_general",
]

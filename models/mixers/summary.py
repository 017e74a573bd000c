"""SummaryMixing (Parcollet et al., "SummaryMixing: a linear-complexity alternative to self-attention
for speech recognition and understanding"), written from the paper's equations.

Dimensions: b batch, t frames, d model dim, h heads, l local dim, s summary dim, m combiner hidden dim.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from models.mixers.base import Positional, TokenMixer
from models.mixers.pom import masked_time_mean

Mode = Literal["full", "lite"]
MODES: tuple[str, ...] = ("full", "lite")


def _check_dim(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


class GroupedLinear(nn.Module):
    """A block-diagonal Linear: the input's ``groups`` equal chunks each get their own
    ``Linear(in / groups, out / groups)``; outputs concatenated in chunk order.

    The weight is stored as ``(out, in / groups)`` (rows ``g * out/groups ...`` belong to chunk
    ``g``), the layout of a grouped 1x1 convolution, so its fans are those of one chunk's map.
    ``groups=1`` is an ordinary ``nn.Linear`` (same initialisation).
    """

    def __init__(self, in_features: int, out_features: int, *, groups: int = 1, bias: bool = True) -> None:
        super().__init__()
        if in_features % groups or out_features % groups:
            raise ValueError(
                f"{groups} heads must divide both widths of a head-split layer, got {in_features} -> {out_features}"
            )
        self.in_features, self.out_features, self.groups = in_features, out_features, groups
        self.weight = nn.Parameter(torch.empty(out_features, in_features // groups))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default, per chunk
        if self.bias is not None:
            bound = 1.0 / math.sqrt(in_features // groups)
            nn.init.uniform_(self.bias, -bound, bound)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, groups={self.groups}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., in) -> (..., out)``."""
        if self.groups == 1:
            return F.linear(x, self.weight, self.bias)
        g = self.groups
        w = self.weight.view(g, self.out_features // g, self.in_features // g)  # (g, o, i)
        y = torch.einsum("...gi,goi->...go", x.unflatten(-1, (g, -1)), w).flatten(-2)  # (..., out)
        return y if self.bias is None else y + self.bias


class SummaryMixing(TokenMixer):
    """SummaryMixing, written from the paper's equations.

    With ``f`` the local transformation, ``s`` the summary function and ``c`` the combiner::

        s_bar = (1 / T) sum_t s(x_t)              mean over the utterance's T real frames
        y_t   = c([f(x_t); s_bar])                "full" (the paper's SummaryMixing)
        y_t   = c(s_bar)                          "lite" (SummaryMixing-lite: no local branch,
                                                  the Conformer's convolution supplies it)

    As in the paper, ``f`` and ``s`` are small perceptrons (dense layers, each followed by GELU):
    ``d -> local_hidden_dim -> local_dim`` and ``d -> summary_hidden_dim -> summary_dim`` (a
    hidden width of 0 leaves one dense layer), and ``c`` is one dense layer with GELU from
    ``local_dim + summary_dim`` to ``d``. With ``num_heads = h`` the frame ``x_t`` is split in
    ``h`` chunks of ``d / h`` and each head has its own ``f`` and ``s`` (block-diagonal layers,
    every width divided by ``h``); ``c`` mixes all heads' outputs. The paper's LibriSpeech
    Conformer uses one head and every width equal to ``d`` (the defaults).

    ``combiner_dim > 0`` replaces ``c`` by a two-layer perceptron ``W2 GELU(W1 z)`` with hidden
    width ``combiner_dim`` and no output activation: with ``local_hidden_dim = summary_hidden_dim
    = 0`` that is this project's earlier variant (one GELU layer each for ``f`` and ``s``).

    ``dropout_p`` is applied (training only) after every GELU but the last one of ``c``. The mixer
    has no positional encoding of its own.

    Args:
        model_dim: ``d``.
        num_heads: ``h``, dividing ``d`` and the widths of ``f`` and ``s`` (default 1).
        local_dim: output width of ``f`` (default ``d``); unused in ``"lite"`` mode.
        local_hidden_dim: hidden width of ``f`` (default ``d``; 0 = one layer).
        summary_dim: output width of ``s`` (default ``d``).
        summary_hidden_dim: hidden width of ``s`` (default ``d``; 0 = one layer).
        combiner_dim: 0 (default) for the paper's one-layer ``c``, else the hidden width of a
            two-layer ``c``.
        mode: ``"full"`` (default) or ``"lite"``.
        dropout_p: dropout probability (default 0.0).
        bias: whether the dense layers have biases (default True).
    """

    positional: ClassVar[Positional] = "absolute"
    is_attention: ClassVar[bool] = False

    def __init__(
        self,
        model_dim: int,
        *,
        num_heads: int = 1,
        local_dim: int | None = None,
        local_hidden_dim: int | None = None,
        summary_dim: int | None = None,
        summary_hidden_dim: int | None = None,
        combiner_dim: int = 0,
        mode: Mode = "full",
        dropout_p: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__(model_dim)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
            raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
        self.mode = mode
        self.num_heads = _check_dim("num_heads", num_heads)
        if model_dim % self.num_heads:
            raise ValueError(f"model_dim={model_dim} must be divisible by num_heads={num_heads}")
        self.local_dim = _check_dim("local_dim", model_dim if local_dim is None else local_dim)
        self.local_hidden_dim = _check_dim(
            "local_hidden_dim", model_dim if local_hidden_dim is None else local_hidden_dim, 0
        )
        self.summary_dim = _check_dim("summary_dim", model_dim if summary_dim is None else summary_dim)
        self.summary_hidden_dim = _check_dim(
            "summary_hidden_dim", model_dim if summary_hidden_dim is None else summary_hidden_dim, 0
        )
        self.combiner_dim = _check_dim("combiner_dim", combiner_dim, 0)
        self.dropout_p = float(dropout_p)
        self.local = (
            self._perceptron(self.local_hidden_dim, self.local_dim, bias, "local") if mode == "full" else None
        )
        self.summary = self._perceptron(self.summary_hidden_dim, self.summary_dim, bias, "summary")
        combiner_in = self.summary_dim + (self.local_dim if mode == "full" else 0)
        widths = [combiner_in] + ([self.combiner_dim] if self.combiner_dim else []) + [model_dim]
        self.combiner = nn.ModuleList(nn.Linear(a, b, bias=bias) for a, b in zip(widths, widths[1:]))
        self.dropout = nn.Dropout(self.dropout_p)

    def _perceptron(self, hidden: int, out: int, bias: bool, name: str) -> nn.ModuleList:
        """The head-split dense layers of ``f`` or ``s``: ``d [-> hidden] -> out``."""
        widths = [self.model_dim] + ([hidden] if hidden else []) + [out]
        try:
            return nn.ModuleList(
                GroupedLinear(a, b, groups=self.num_heads, bias=bias) for a, b in zip(widths, widths[1:])
            )
        except ValueError as err:
            raise ValueError(f"{name} branch: {err}") from None

    def extra_repr(self) -> str:
        return (
            f"model_dim={self.model_dim}, mode={self.mode!r}, num_heads={self.num_heads}, "
            f"local_dim={self.local_dim}, local_hidden_dim={self.local_hidden_dim}, "
            f"summary_dim={self.summary_dim}, summary_hidden_dim={self.summary_hidden_dim}, "
            f"combiner_dim={self.combiner_dim}, dropout_p={self.dropout_p}"
        )

    def _branch(self, layers: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        for layer in layers:
            x = self.dropout(F.gelu(layer(x)))
        return x

    def _combine(self, z: torch.Tensor) -> torch.Tensor:
        if len(self.combiner) == 1:  # the paper's c: one dense layer with GELU
            return F.gelu(self.combiner[0](z))
        return self.combiner[1](self.dropout(F.gelu(self.combiner[0](z))))

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        """Mix tokens.

        Args:
            x: ``(b, t, d)`` input.
            padding_mask: ``(b, t)`` bool, ``True`` at padded frames.

        Returns:
            ``(b, t, d)`` output.
        """
        padding_mask = self.check_inputs(x, padding_mask)
        summary = masked_time_mean(self._branch(self.summary, x), ~padding_mask)  # (b, 1, s)
        if self.local is None:  # lite: one output vector per utterance, broadcast over time
            return self._combine(summary).expand(-1, x.shape[1], -1)  # (b, t, d)
        local = self._branch(self.local, x)  # (b, t, l)
        both = torch.cat([local, summary.expand(-1, x.shape[1], -1)], dim=-1)  # (b, t, l + s)
        return self._combine(both)  # (b, t, d)


__all__ = ["GroupedLinear", "MODES", "SummaryMixing"]

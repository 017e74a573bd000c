"""SummaryMixing (Parcollet et al.): a linear-time mixer built on one mean summary per utterance.

Dimensions: b batch, t frames, d model dim, l local dim, s summary dim, m combiner hidden dim.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from models.mixers.base import Positional, TokenMixer
from models.mixers.pom import masked_time_mean

Mode = Literal["full", "lite"]
MODES: tuple[str, ...] = ("full", "lite")


def _check_dim(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class SummaryMixing(TokenMixer):
    """SummaryMixing, written from the paper's equations.

    ``mode="full"`` (the paper's SummaryMixing)::

        f_t = GELU(W_f x_t)                      local branch, width local_dim
        s   = mean_t GELU(W_s x_t)               summary over real frames only, width summary_dim
        y_t = W_2 GELU(W_1 [f_t; s])             combiner, hidden width combiner_dim, output d

    ``mode="lite"`` (SummaryMixing-lite: the local branch is dropped and the Conformer's
    convolution module supplies the local information)::

        y_t = W_2 GELU(W_1 s)                    the same vector at every frame of an utterance

    ``dropout_p`` is applied (training only) to ``f_t``, to ``GELU(W_s x_t)`` before averaging and to
    the combiner's hidden layer. The mixer has no positional encoding of its own.

    Args:
        model_dim: ``d``.
        local_dim: width of the local branch (default ``model_dim``); unused in ``"lite"`` mode.
        summary_dim: width of the summary branch (default ``model_dim``).
        combiner_dim: hidden width of the combiner (default ``model_dim``).
        mode: ``"full"`` (default) or ``"lite"``.
        dropout_p: dropout probability (default 0.0).
        bias: whether the linear layers have biases (default True).
    """

    positional: ClassVar[Positional] = "absolute"
    is_attention: ClassVar[bool] = False

    def __init__(
        self,
        model_dim: int,
        *,
        local_dim: int | None = None,
        summary_dim: int | None = None,
        combiner_dim: int | None = None,
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
        self.local_dim = _check_dim("local_dim", model_dim if local_dim is None else local_dim)
        self.summary_dim = _check_dim("summary_dim", model_dim if summary_dim is None else summary_dim)
        self.combiner_dim = _check_dim("combiner_dim", model_dim if combiner_dim is None else combiner_dim)
        self.dropout_p = float(dropout_p)
        self.local = nn.Linear(model_dim, self.local_dim, bias=bias) if mode == "full" else None
        self.summary = nn.Linear(model_dim, self.summary_dim, bias=bias)
        combiner_in = self.summary_dim + (self.local_dim if mode == "full" else 0)
        self.combiner_in = nn.Linear(combiner_in, self.combiner_dim, bias=bias)
        self.combiner_out = nn.Linear(self.combiner_dim, model_dim, bias=bias)
        self.dropout = nn.Dropout(self.dropout_p)

    def extra_repr(self) -> str:
        return (
            f"model_dim={self.model_dim}, mode={self.mode!r}, local_dim={self.local_dim}, "
            f"summary_dim={self.summary_dim}, combiner_dim={self.combiner_dim}, dropout_p={self.dropout_p}"
        )

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        """Mix tokens.

        Args:
            x: ``(b, t, d)`` input.
            padding_mask: ``(b, t)`` bool, ``True`` at padded frames.

        Returns:
            ``(b, t, d)`` output.
        """
        padding_mask = self.check_inputs(x, padding_mask)
        summary = self.dropout(F.gelu(self.summary(x)))  # (b, t, s)
        summary = masked_time_mean(summary, ~padding_mask)  # (b, 1, s)
        if self.local is None:  # lite: one output vector per utterance, broadcast over time
            y = self.combiner_out(self.dropout(F.gelu(self.combiner_in(summary))))  # (b, 1, d)
            return y.expand(-1, x.shape[1], -1)
        local = self.dropout(F.gelu(self.local(x)))  # (b, t, l)
        both = torch.cat([local, summary.expand(-1, x.shape[1], -1)], dim=-1)  # (b, t, l + s)
        return self.combiner_out(self.dropout(F.gelu(self.combiner_in(both))))  # (b, t, d)


__all__ = ["MODES", "SummaryMixing"]

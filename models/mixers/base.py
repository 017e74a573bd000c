"""The token-mixer contract shared by every mixer in the registry.

Dimensions: b batch, t frames, d model dim.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import nn

Positional = Literal["absolute", "none"]


class TokenMixer(nn.Module):
    """Base class of every token mixer.

    Contract: ``forward(x, padding_mask) -> y`` with ``x`` of shape ``(batch, time, model_dim)``,
    ``padding_mask`` of shape ``(batch, time)``, dtype bool, ``True`` marking padded frames (the one
    mask polarity of the whole project), and ``y`` of shape ``(batch, time, model_dim)``. Outputs at
    padded positions are unspecified (the block zeroes them); outputs at real positions must not
    depend on padded inputs.

    Class attributes:
        positional: which positional encoding the encoder must add to its input for this mixer:
            ``"absolute"`` (sinusoidal, added once after the front-end) or ``"none"`` (the mixer
            encodes positions itself, e.g. relative or rotary attention).
        is_attention: whether the mixer is a form of softmax attention (used by hybrid plans).
    """

    positional: ClassVar[Positional] = "absolute"
    is_attention: ClassVar[bool] = False

    def __init__(self, model_dim: int) -> None:
        super().__init__()
        if not isinstance(model_dim, int) or model_dim < 1:
            raise ValueError(f"model_dim must be a positive integer, got {model_dim!r}")
        self.model_dim = model_dim

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def check_inputs(self, x: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        """Validate shapes; return a (b, t) bool padding mask (all False when None is given)."""
        if x.dim() != 3 or x.shape[-1] != self.model_dim:
            raise ValueError(
                f"{type(self).__name__} expects x of shape (batch, time, {self.model_dim}), "
                f"got {tuple(x.shape)}"
            )
        if padding_mask is None:
            return torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
        if padding_mask.shape != x.shape[:2] or padding_mask.dtype != torch.bool:
            raise ValueError(
                f"padding_mask must be a bool tensor of shape {tuple(x.shape[:2])}, "
                f"got {padding_mask.dtype} {tuple(padding_mask.shape)}"
            )
        return padding_mask


def needs_autograd(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether a forward of ``module`` on ``x`` records a graph (else in-place fast paths are safe)."""
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters()))

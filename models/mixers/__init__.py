"""Token-mixer registry.

Every mixer follows one contract (see :class:`models.mixers.base.TokenMixer`):
``forward(x (b, t, d), padding_mask (b, t) bool, True = pad) -> (b, t, d)`` and is constructible
as ``MIXERS[name](model_dim=d, **options)``.
"""

from __future__ import annotations

from typing import Any

from models.mixers.attention import (
    MultiHeadAttention,
    RelPosMultiHeadAttention,
    RotaryMultiHeadAttention,
)
from models.mixers.base import TokenMixer
from models.mixers.pom import PolynomialMixer, SelectPolynomialMixer, SplitPolynomialMixer
from models.mixers.summary import SummaryMixing

MIXERS: dict[str, type[TokenMixer]] = {
    "mha": MultiHeadAttention,
    "mha_relpos": RelPosMultiHeadAttention,
    "mha_rope": RotaryMultiHeadAttention,
    "pom": PolynomialMixer,
    "pom_select": SelectPolynomialMixer,
    "pom_split": SplitPolynomialMixer,
    "summary_mixing": SummaryMixing,
}


def get_mixer_class(name: str) -> type[TokenMixer]:
    """Return the mixer class registered under ``name``; raise ``ValueError`` listing valid names."""
    try:
        return MIXERS[name]
    except KeyError:
        raise ValueError(
            f"unknown mixer {name!r}; valid mixers: {', '.join(sorted(MIXERS))}"
        ) from None


def build_mixer(name: str, model_dim: int, **options: Any) -> TokenMixer:
    """Build ``MIXERS[name](model_dim=model_dim, **options)``.

    An option the mixer does not take raises ``ValueError`` naming the option and the mixer.
    """
    cls = get_mixer_class(name)
    try:
        return cls(model_dim=model_dim, **options)
    except TypeError as err:
        raise ValueError(f"mixer {name!r}: bad options {sorted(options)}: {err}") from None


__all__ = ["MIXERS", "TokenMixer", "build_mixer", "get_mixer_class"]

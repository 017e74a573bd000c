"""CTC fine-tuning: the pre-trained front-end + encoder under a small MLP head, greedy decoding.

Dimensions: b batch, s samples, t fbank frames, t' encoder frames, n mels, d model dim,
h head hidden dim, v vocabulary size (blank included), u target tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from models import builder
from models.config import ModelConfig
from models.conformer import SpeechEncoderMixin
from models.frontend import lengths_to_padding_mask

Augment = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(features (b, t, n), lengths (b,)) -> features (b, t, n)``, e.g. SpecAugment."""

BACKBONE: tuple[str, ...] = ("features", "normalizer", "frontend", "encoder")
"""Submodules shared with :class:`models.best_rq.BestRQModel` (what :meth:`CTCModel.load_pretrained` loads)."""


class CTCHead(nn.Module):
    """``num_hidden_layers x [Linear -> LayerNorm -> LeakyReLU -> Dropout]`` then ``Linear(h, v)``.

    Args:
        model_dim: ``d``, the encoder width.
        hidden_dim: ``h``.
        num_hidden_layers: hidden layers (0 = a single linear layer ``d -> v``).
        dropout_p: dropout after each hidden layer.
        vocab_size: ``v``.
    """

    def __init__(self, model_dim: int, *, hidden_dim: int, num_hidden_layers: int, dropout_p: float, vocab_size: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = model_dim
        for _ in range(num_hidden_layers):
            layers.append(
                nn.Sequential(
                    nn.Linear(width, hidden_dim), nn.LayerNorm(hidden_dim), nn.LeakyReLU(), nn.Dropout(dropout_p)
                )
            )
            width = hidden_dim
        self.hidden = nn.Sequential(*layers)
        self.output = nn.Linear(width, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(b, t', d) -> (b, t', v)`` logits."""
        return self.output(self.hidden(x))


@dataclass
class CTCOutput:
    """CTC model output.

    Attributes:
        log_probs: ``(b, t', v)`` float32 log-probabilities.
        lengths: ``(b,)`` real encoder frames.
    """

    log_probs: torch.Tensor
    lengths: torch.Tensor


# A pytree node, so DDP (find_unused_parameters / static_graph) and torch.compile see its tensors.
torch.utils._pytree.register_dataclass(CTCOutput)

@dataclass
class LoadReport:
    """What :meth:`CTCModel.load_pretrained` did.

    Attributes:
        loaded: keys copied into the model.
        skipped: keys of the given state dict that the model did not take (e.g. BEST-RQ heads).
        missing: keys of the model's state dict left as they were (e.g. the CTC head).
    """

    loaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


class CTCModel(SpeechEncoderMixin, nn.Module):
    """Front-end + encoder (same module names as :class:`models.best_rq.BestRQModel`) + CTC head.

    Args:
        config: the whole model configuration (``ctc`` sets the head).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.features = builder.build_features(config)
        self.normalizer = builder.build_normalizer(config)
        self.frontend = builder.build_frontend(config)
        self.encoder = builder.build_encoder(config)
        self.head = builder.build_ctc_head(config)
        self.blank = config.ctc.blank
        self.vocab_size = config.ctc.vocab_size

    def forward(
        self, wave: torch.Tensor, wave_lengths: torch.Tensor, augment: Augment | None = None
    ) -> CTCOutput:
        """Log-probabilities of a waveform batch.

        Args:
            wave: ``(b, s)`` waveforms, zero-padded.
            wave_lengths: ``(b,)`` real samples.
            augment: applied to the normalised features in training mode only.
        """
        features, lengths = self.featurize(wave, wave_lengths)
        return self.forward_features(features, lengths, augment=augment)

    def forward_features(
        self, features: torch.Tensor, feature_lengths: torch.Tensor, augment: Augment | None = None
    ) -> CTCOutput:
        """Log-probabilities of normalised ``(b, t, n)`` features with ``(b,)`` lengths."""
        if augment is not None and self.training:
            features = augment(features, feature_lengths)
            # The augmentation may write into padding; the front-end's invariance needs zeros there.
            pad = lengths_to_padding_mask(feature_lengths, features.shape[1])
            features = features.masked_fill(pad.unsqueeze(-1), 0.0)
        encoded, lengths, _ = self.encode_features(features, feature_lengths)  # (b, t', d)
        log_probs = self.head(encoded).float().log_softmax(dim=-1)  # (b, t', v)
        return CTCOutput(log_probs=log_probs, lengths=lengths)

    def ctc_loss(
        self,
        output: CTCOutput,
        targets: torch.Tensor,
        target_lengths: torch.Tensor,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """``F.ctc_loss`` on batch-first output; ``targets`` ``(b, u)`` padded or ``(sum u,)`` concatenated.

        ``zero_infinity=True``: an utterance too short for its transcript contributes 0, not inf.
        """
        return F.ctc_loss(
            output.log_probs.transpose(0, 1),  # (t', b, v)
            targets,
            output.lengths,
            target_lengths,
            blank=self.blank,
            reduction=reduction,
            zero_infinity=True,
        )

    def load_pretrained(
        self, state_dict: Mapping[str, torch.Tensor], *, prefix: str = "", strict: bool = True
    ) -> LoadReport:
        """Copy the pre-trained front-end, normaliser and encoder from ``state_dict``.

        Only keys under :data:`BACKBONE` are taken; other keys (quantizer, BEST-RQ heads, optimizer
        leftovers) are reported as skipped. A backbone key whose shape differs from the model's
        raises ``ValueError`` naming the key and both shapes; with ``strict`` a backbone key of the
        model absent from ``state_dict`` raises too. Nothing is copied when an error is raised.

        Args:
            state_dict: e.g. ``BestRQModel.state_dict()`` or a checkpoint's model state.
            prefix: stripped from the keys first (e.g. ``"module."`` for DDP-wrapped models); keys
                without it are skipped.
            strict: require every backbone key of this model.

        Returns:
            :class:`LoadReport` with sorted key lists.
        """
        own = self.state_dict()
        report = LoadReport()
        updates: dict[str, torch.Tensor] = {}
        for raw_key, value in state_dict.items():
            if not raw_key.startswith(prefix):
                report.skipped.append(raw_key)
                continue
            key = raw_key[len(prefix) :]
            if key.split(".", 1)[0] not in BACKBONE or key not in own:
                report.skipped.append(raw_key)
                continue
            if tuple(value.shape) != tuple(own[key].shape):
                raise ValueError(
                    f"load_pretrained: {raw_key!r} has shape {tuple(value.shape)} but the model's "
                    f"{key!r} has shape {tuple(own[key].shape)}; was it pre-trained with another config?"
                )
            updates[key] = value
        absent = sorted(k for k in own if k.split(".", 1)[0] in BACKBONE and k not in updates)
        if strict and absent:
            raise ValueError(
                f"load_pretrained: the state dict lacks {len(absent)} backbone keys, e.g. {absent[:5]}; "
                f"pass strict=False to keep their current values"
            )
        with torch.no_grad():
            for key, value in updates.items():
                own[key].copy_(value)
        report.loaded = sorted(updates)
        report.skipped.sort()
        report.missing = sorted(k for k in own if k not in updates)
        return report


def greedy_decode(log_probs: torch.Tensor, lengths: torch.Tensor, blank: int = 0) -> list[list[int]]:
    """Best-path CTC decoding: argmax per frame, collapse repeats, drop blanks.

    Args:
        log_probs: ``(b, t', v)`` (log-)probabilities or logits.
        lengths: ``(b,)`` real frames.
        blank: blank index.

    Returns:
        One list of token ids per utterance.
    """
    best = log_probs.argmax(dim=-1).cpu()  # (b, t')
    hypotheses: list[list[int]] = []
    for row, length in zip(best, lengths.cpu().tolist()):
        path = torch.unique_consecutive(row[: int(length)])
        hypotheses.append(path[path != blank].tolist())
    return hypotheses


__all__ = ["Augment", "BACKBONE", "CTCHead", "CTCModel", "CTCOutput", "LoadReport", "greedy_decode"]

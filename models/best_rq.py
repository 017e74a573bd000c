"""BEST-RQ self-supervised pre-training (Chiu et al. 2022, "Self-supervised learning with random-
projection quantizer for speech recognition"), as in the paper's released code.

Dimensions: b batch, s samples, t fbank frames, t' encoder frames (t / stack), n mels,
d model dim, m masked encoder frames, q codebooks, v codebook size, c codebook dim.

Per batch: spans of fbank frames are masked (the same positions for every utterance, drawn within
the shortest one) and replaced by Gaussian noise; the encoder sees the masked features; a frozen
random projection of ``stack`` stacked *unmasked* frames, matched to a frozen random codebook,
gives one target code per encoder frame; a linear head per codebook predicts the codes of the
masked encoder frames only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models import builder
from models.config import ModelConfig
from models.conformer import SpeechEncoderMixin


def span_mask(
    lengths: torch.Tensor,
    max_len: int,
    *,
    mask_prob: float,
    mask_span: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """BEST-RQ span mask over fbank frames, shared by the whole batch.

    As in the released code: with ``L`` the length of the *shortest* utterance,
    ``n = floor(mask_prob * L + U)``, ``U ~ Uniform[0, 1)`` (so ``E[n] = mask_prob * L``), clamped
    to ``[1, L // mask_span]``; ``n`` distinct spans are drawn among the ``L // mask_span`` aligned
    spans ``[j * mask_span, (j + 1) * mask_span)``. The expected masked fraction of the shortest
    utterance is therefore ``mask_prob * mask_span`` (0.6 at the defaults, capped at 1); frames
    beyond ``L`` are never masked. A shortest utterance under one span is masked entirely.

    Args:
        lengths: ``(b,)`` real fbank frames per utterance (all >= 1).
        max_len: ``t``, the padded length.
        mask_prob: probability that a frame starts a span.
        mask_span: span length in frames.
        generator: CPU generator for reproducible masks (default: the global CPU RNG).

    Returns:
        ``(b, t)`` bool, ``True`` at masked frames (identical rows), on ``lengths.device``.
    """
    if lengths.numel() == 0:
        raise ValueError("span_mask needs at least one utterance")
    shortest = int(lengths.min())
    if shortest < 1:
        raise ValueError(f"every utterance needs at least one frame, got lengths {lengths.tolist()}")
    num_spans = shortest // mask_span
    mask = torch.zeros(max_len, dtype=torch.bool)
    if num_spans == 0:
        mask[:shortest] = True
    else:
        draws = int(mask_prob * shortest + torch.rand((), generator=generator).item())
        draws = min(max(draws, 1), num_spans)
        starts = torch.randperm(num_spans, generator=generator)[:draws] * mask_span  # (n,)
        mask[(starts[:, None] + torch.arange(mask_span)).flatten()] = True
    return mask.to(lengths.device).unsqueeze(0).expand(lengths.shape[0], -1).contiguous()


def stack_frames(features: torch.Tensor, stack: int) -> torch.Tensor:
    """``(b, t, n) -> (b, ceil(t / stack), stack * n)``: consecutive frames concatenated (zero-padded)."""
    b, t, n = features.shape
    pad = (-t) % stack
    if pad:
        features = F.pad(features, (0, 0, 0, pad))
    return features.reshape(b, (t + pad) // stack, stack * n)


def frames_to_encoder_mask(mask: torch.Tensor, stack: int) -> torch.Tensor:
    """``(b, t)`` fbank-frame mask -> ``(b, ceil(t / stack))``: an encoder frame is masked when any
    of its ``stack`` fbank frames is."""
    return stack_frames(mask.unsqueeze(-1), stack).any(dim=-1)


class RandomProjectionQuantizer(nn.Module):
    """Frozen random-projection quantizer; both tensors are seeded buffers saved in checkpoints.

    ``projection`` ``(input_dim, c)`` is Xavier-uniform, ``codebooks`` ``(q, v, c)`` are N(0, 1)
    rows normalised to unit length, both drawn from ``torch.Generator().manual_seed(seed)`` so
    every worker and every run with the same seed has the same quantizer. The code of an input is
    ``argmin_j || normalize(x P) - codebook_j ||``, i.e. ``argmax_j normalize(x P) . codebook_j``.

    Args:
        input_dim: ``stack * n``.
        codebook_dim: ``c``.
        codebook_size: ``v``.
        num_codebooks: ``q``.
        seed: generator seed.
        chunk_size: rows quantized at a time (bounds the ``rows x v`` similarity matrix).
    """

    def __init__(
        self,
        *,
        input_dim: int,
        codebook_dim: int,
        codebook_size: int,
        num_codebooks: int,
        seed: int,
        chunk_size: int = 4096,
    ) -> None:
        super().__init__()
        self.input_dim = input_dim
        self.codebook_dim = codebook_dim
        self.codebook_size = codebook_size
        self.num_codebooks = num_codebooks
        self.seed = seed
        self.chunk_size = chunk_size
        generator = torch.Generator(device="cpu").manual_seed(seed)
        projection = torch.empty(input_dim, codebook_dim, device="cpu")
        nn.init.xavier_uniform_(projection, generator=generator)
        codebooks = torch.randn(num_codebooks, codebook_size, codebook_dim, generator=generator, device="cpu")
        # Drawn on the CPU so the values never depend on the device; then placed like other tensors.
        device = torch.get_default_device()
        self.register_buffer("projection", projection.to(device))
        self.register_buffer("codebooks", F.normalize(codebooks, dim=-1).to(device))

    def extra_repr(self) -> str:
        return (
            f"input_dim={self.input_dim}, codebook_dim={self.codebook_dim}, "
            f"codebook_size={self.codebook_size}, num_codebooks={self.num_codebooks}, seed={self.seed}"
        )

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize.

        Args:
            x: ``(..., input_dim)`` stacked normalised frames.

        Returns:
            ``(..., q)`` long codes.
        """
        if x.shape[-1] != self.input_dim:
            raise ValueError(f"quantizer input must end in {self.input_dim} features, got {tuple(x.shape)}")
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.input_dim)
        codes = torch.empty(rows.shape[0], self.num_codebooks, dtype=torch.long, device=x.device)
        with torch.autocast(device_type=x.device.type, enabled=False):
            projection = self.projection.float()
            codebooks = self.codebooks.float()
            for start in range(0, rows.shape[0], self.chunk_size):
                z = F.normalize(rows[start : start + self.chunk_size].float() @ projection, dim=-1)  # (r, c)
                similarity = torch.einsum("rc,qvc->rqv", z, codebooks)  # (r, q, v)
                codes[start : start + self.chunk_size] = similarity.argmax(dim=-1)
        return codes.reshape(*lead, self.num_codebooks)


@dataclass
class BestRQOutput:
    """What one BEST-RQ forward returns. Counters are summable across batches and workers.

    Attributes:
        loss: ``()`` cross-entropy over masked encoder frames, averaged over codebooks.
        accuracy: ``()`` masked-prediction accuracy (detached).
        num_masked: ``()`` long, masked encoder frames ``m``.
        num_correct: ``()`` long, correct predictions summed over codebooks (of ``m * q``).
        target_counts: ``(q, v)`` long, how often each code is a target (for code perplexity).
        mask: ``(b, t')`` bool, masked encoder frames.
        feature_mask: ``(b, t)`` bool, masked fbank frames.
        targets: ``(m, q)`` long, target codes of the masked frames (row-major order of ``mask``).
    """

    loss: torch.Tensor
    accuracy: torch.Tensor
    num_masked: torch.Tensor
    num_correct: torch.Tensor
    target_counts: torch.Tensor
    mask: torch.Tensor
    feature_mask: torch.Tensor
    targets: torch.Tensor


# A pytree node, so DDP (find_unused_parameters / static_graph) and torch.compile see its tensors.
torch.utils._pytree.register_dataclass(BestRQOutput)

def code_perplexity(target_counts: torch.Tensor) -> torch.Tensor:
    """``(q, v)`` code counts -> ``(q,)`` perplexity ``exp(entropy)`` of each codebook's usage."""
    counts = target_counts.double()
    probs = counts / counts.sum(dim=-1, keepdim=True).clamp_min(1.0)
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(dim=-1)
    return entropy.exp()


class BestRQModel(SpeechEncoderMixin, nn.Module):
    """BEST-RQ pre-training model: features, normaliser, front-end, encoder, quantizer, heads.

    Args:
        config: the whole model configuration (the ``best_rq`` section sets masking, quantizer and heads).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        rq = config.best_rq
        self.features = builder.build_features(config)
        self.normalizer = builder.build_normalizer(config)
        self.frontend = builder.build_frontend(config)
        self.encoder = builder.build_encoder(config)
        self.quantizer = builder.build_quantizer(config)
        self.heads = builder.build_best_rq_heads(config)
        self.mask_prob = rq.mask_prob
        self.mask_span = rq.mask_span
        self.noise_std = rq.noise_std
        self.stack = rq.stack_frames
        if self.frontend.subsampling_factor != self.stack:
            raise ValueError(
                f"best_rq.stack_frames={self.stack} must equal the front-end subsampling "
                f"{self.frontend.subsampling_factor}"
            )

    def extra_repr(self) -> str:
        return f"mask_prob={self.mask_prob}, mask_span={self.mask_span}, noise_std={self.noise_std}, stack={self.stack}"

    def forward(
        self, wave: torch.Tensor, wave_lengths: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> BestRQOutput:
        """Masked prediction loss of a waveform batch.

        Args:
            wave: ``(b, s)`` waveforms, zero-padded.
            wave_lengths: ``(b,)`` real samples.
            generator: CPU generator for the mask and noise (default: global RNGs).
        """
        features, lengths = self.featurize(wave, wave_lengths)
        return self.forward_features(features, lengths, generator=generator)

    @torch.no_grad()
    def targets(self, features: torch.Tensor, feature_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """``(b, t, n)`` normalised features -> ``(b, ceil(t / stack), q)`` target codes of every frame."""
        return self.quantizer(stack_frames(features, self.stack))

    def forward_features(
        self,
        features: torch.Tensor,
        feature_lengths: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
    ) -> BestRQOutput:
        """Masked prediction loss of already-normalised features.

        Args:
            features: ``(b, t, n)`` normalised features, zero at padded frames.
            feature_lengths: ``(b,)`` real frames.
            generator: CPU generator for the mask and noise (default: global RNGs).
        """
        b, t, _ = features.shape
        feature_mask = span_mask(
            feature_lengths, t, mask_prob=self.mask_prob, mask_span=self.mask_span, generator=generator
        )  # (b, t), within the shortest utterance so never on padding
        if generator is None:
            noise = torch.randn_like(features)
        else:
            noise = torch.randn(features.shape, generator=generator, device=generator.device).to(features)
        noisy = torch.where(feature_mask.unsqueeze(-1), noise * self.noise_std, features)  # (b, t, n)

        encoded, _, padding_mask = self.encode_features(noisy, feature_lengths)  # (b, t', d)
        mask = frames_to_encoder_mask(feature_mask, self.stack) & ~padding_mask  # (b, t')
        if mask.shape != encoded.shape[:2]:
            raise ValueError(f"encoder frames {tuple(encoded.shape[:2])} do not match target frames {tuple(mask.shape)}")
        with torch.no_grad():
            targets = self.quantizer(stack_frames(features, self.stack)[mask])  # (m, q): from unmasked frames
        return self.loss(encoded, mask, targets, feature_mask)

    def loss(
        self,
        encoded: torch.Tensor,
        mask: torch.Tensor,
        targets: torch.Tensor,
        feature_mask: torch.Tensor | None = None,
    ) -> BestRQOutput:
        """Cross-entropy of the heads on masked encoder frames only.

        Args:
            encoded: ``(b, t', d)`` encoder output.
            mask: ``(b, t')`` bool, frames that enter the loss.
            targets: ``(m, q)`` codes of those frames (``m = mask.sum()``).
            feature_mask: ``(b, t)`` fbank mask, passed through to the output.
        """
        selected = encoded[mask]  # (m, d): unmasked frames never reach the heads
        losses, correct = [], []
        for index, head in enumerate(self.heads):
            logits = head(selected).float()  # (m, v)
            losses.append(F.cross_entropy(logits, targets[:, index]))
            correct.append((logits.detach().argmax(dim=-1) == targets[:, index]).sum())
        num_masked = mask.sum()
        num_correct = torch.stack(correct).sum()
        counts = torch.stack(
            [torch.bincount(targets[:, i], minlength=self.quantizer.codebook_size) for i in range(targets.shape[1])]
        )  # (q, v)
        return BestRQOutput(
            loss=torch.stack(losses).mean(),
            accuracy=num_correct.double() / (num_masked * len(self.heads)).clamp_min(1),
            num_masked=num_masked,
            num_correct=num_correct,
            target_counts=counts,
            mask=mask,
            feature_mask=feature_mask if feature_mask is not None else mask,
            targets=targets,
        )


__all__ = [
    "BestRQModel",
    "BestRQOutput",
    "RandomProjectionQuantizer",
    "code_perplexity",
    "frames_to_encoder_mask",
    "span_mask",
    "stack_frames",
]

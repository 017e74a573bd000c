"""The only reader of :class:`models.config.ModelConfig`: config sections -> modules.

Dimensions: d model dim, n mels, v codebook size, c codebook dim.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from models.config import ModelConfig
from models.conformer import ConformerEncoder, xavier_normal_init_
from models.frontend import ConvSubsampling, FilterbankFeatures, GlobalNormalizer

if TYPE_CHECKING:
    from models.best_rq import BestRQModel, RandomProjectionQuantizer
    from models.ctc import CTCHead, CTCModel


def _check(config: object) -> ModelConfig:
    if not isinstance(config, ModelConfig):
        raise ValueError(f"config must be a models.config.ModelConfig, got {type(config).__name__}")
    return config


def build_features(config: ModelConfig) -> FilterbankFeatures:
    """Log-mel filterbank of ``config.frontend``."""
    fe = _check(config).frontend
    return FilterbankFeatures(
        sample_rate=fe.sample_rate, n_mels=fe.n_mels, win_length=fe.win_length, hop_length=fe.hop_length,
        kind=fe.fbank,
    )


def build_normalizer(config: ModelConfig) -> GlobalNormalizer:
    """Global mean/variance normaliser over ``n_mels`` channels."""
    return GlobalNormalizer(_check(config).frontend.n_mels)


def build_frontend(config: ModelConfig) -> ConvSubsampling:
    """Conv subsampling ``(b, t, n) -> (b, t / 4, d)``. With ``encoder.init: xavier_normal`` its
    Linear projection is initialised with the encoder (the released TransformerASR holds it)."""
    config = _check(config)
    fe = config.frontend
    frontend = ConvSubsampling(
        fe.n_mels, fe.conv_channels, config.encoder.model_dim, fe.dropout_p,
        norm=fe.norm, proj_dropout_p=fe.proj_dropout_p,
    )
    if config.encoder.init == "xavier_normal":
        xavier_normal_init_(frontend.proj)
    return frontend


def build_encoder(config: ModelConfig) -> ConformerEncoder:
    """The Conformer encoder of ``config.encoder`` with ``config.frontend.positional``."""
    config = _check(config)
    return ConformerEncoder(config.encoder, positional=config.frontend.positional)


def build_quantizer(config: ModelConfig) -> RandomProjectionQuantizer:
    """Frozen seeded random-projection quantizer of ``config.best_rq``."""
    from models.best_rq import RandomProjectionQuantizer

    config = _check(config)
    rq = config.best_rq
    return RandomProjectionQuantizer(
        input_dim=rq.stack_frames * config.frontend.n_mels,
        codebook_dim=rq.codebook_dim,
        codebook_size=rq.codebook_size,
        num_codebooks=rq.num_codebooks,
        seed=rq.seed,
    )


def build_best_rq_heads(config: ModelConfig) -> nn.ModuleList:
    """One ``Linear(d, v)`` prediction head per codebook."""
    config = _check(config)
    rq = config.best_rq
    return nn.ModuleList(nn.Linear(config.encoder.model_dim, rq.codebook_size) for _ in range(rq.num_codebooks))


def build_ctc_head(config: ModelConfig) -> CTCHead:
    """The CTC head of ``config.ctc`` on top of a ``d``-wide encoder."""
    from models.ctc import CTCHead

    config = _check(config)
    ctc = config.ctc
    return CTCHead(
        config.encoder.model_dim,
        hidden_dim=ctc.hidden_dim,
        num_hidden_layers=ctc.num_hidden_layers,
        dropout_p=ctc.dropout_p,
        vocab_size=ctc.vocab_size,
    )


def build_best_rq(config: ModelConfig) -> BestRQModel:
    """The BEST-RQ pre-training model."""
    from models.best_rq import BestRQModel

    return BestRQModel(_check(config))


def build_ctc(config: ModelConfig) -> CTCModel:
    """The CTC fine-tuning model."""
    from models.ctc import CTCModel

    return CTCModel(_check(config))


__all__ = [
    "build_best_rq",
    "build_best_rq_heads",
    "build_ctc",
    "build_ctc_head",
    "build_encoder",
    "build_features",
    "build_frontend",
    "build_normalizer",
    "build_quantizer",
]

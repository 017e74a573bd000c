"""Corpus -> loaders for the loops: generation on first use, manifests, samplers, normaliser stats.

Dimensions: b batch, s samples, t fbank frames, n mels.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from orchestrator.data.audio import load_audio
from orchestrator.data.batching import DynamicBatchSampler
from orchestrator.data.dataset import ResumableDataLoader, SpeechDataset, build_dataloader
from orchestrator.data.librispeech import load_manifest
from orchestrator.data.s3 import is_s3_uri
from orchestrator.data.types import Utterance
from orchestrator.train.config import DataConfig
from orchestrator.train.metrics import Counters

log = logging.getLogger("orchestrator.train")


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_corpus(config: DataConfig) -> None:
    """Generate the synthetic corpus at ``config.root`` if it is a local folder that is missing.

    A folder holding a generated corpus (``corpus.json``) is completed or checked (the generator
    resumes and refuses a folder made with other settings); any other existing folder is a real
    corpus and left alone. Processes sharing the folder (DDP ranks, Ray workers on one node)
    serialise on a lock file, so the corpus is generated once.
    """
    if not config.generate or is_s3_uri(config.root):
        return
    root = Path(config.root)
    if root.exists() and not (root / "corpus.json").exists():
        return
    from orchestrator.data.synth import generate_corpus

    with _file_lock(root.parent / f".{root.name}.lock"):
        meta = root / "corpus.json"
        if meta.exists() and '"complete": true' in meta.read_text() and not config.synth_sizes:
            return  # complete, and no sizes asked for that could differ
        log.info("generating the speech corpus at %s (first use)", root)
        summary = generate_corpus(root, seed=config.synth_seed, sizes=dict(config.synth_sizes) or None, progress=True)
        log.info("corpus ready: %s utterances, %.2f h", summary["counts"], summary["audio_hours"])


def load_utterances(config: DataConfig, subsets: tuple[str, ...], *, filter_durations: bool = True) -> list[Utterance]:
    """The utterances of ``subsets`` (manifests concatenated in order), duration-filtered for training."""
    utterances: list[Utterance] = []
    for subset in subsets:
        manifest = load_manifest(
            config.root,
            subset,
            cache_dir=config.cache_dir,
            min_duration=config.min_duration if filter_durations else None,
            max_duration=config.max_duration if filter_durations else None,
        )
        utterances.extend(manifest.utterances)
    return utterances


def audio_loader(config: DataConfig):
    """``path -> (s,)`` 16 kHz mono float32, through the S3 cache when the corpus is remote."""
    cache_dir = config.cache_dir

    def load(path: str) -> torch.Tensor:
        return load_audio(path, cache_dir=cache_dir)

    return load


@dataclass
class Loader:
    """A loader and its batch sampler (whose position is part of the checkpoint)."""

    loader: ResumableDataLoader
    sampler: DynamicBatchSampler

    def batches(self) -> Iterator[dict]:
        """Batches forever, epoch after epoch, from the sampler's current position."""
        while True:
            self.sampler.set_epoch(self.sampler.epoch)
            yield from self.loader

    def __iter__(self):
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.sampler)


def make_loader(
    utterances: list[Utterance],
    data: DataConfig,
    *,
    max_batch_seconds: float,
    seed: int,
    shuffle: bool,
    tokenizer=None,
    rank: int = 0,
    world_size: int = 1,
) -> Loader:
    """A :class:`Loader` over ``utterances``, split across ranks with the same batch count each."""
    sampler = DynamicBatchSampler(
        utterances,
        max_batch_seconds=max_batch_seconds,
        shuffle=shuffle,
        seed=seed,
        rank=rank,
        world_size=world_size,
    )
    dataset = SpeechDataset(utterances, audio_loader(data), tokenizer=tokenizer)
    loader = build_dataloader(dataset, sampler, num_workers=data.num_workers)
    # The loader seeds its workers from a generator; without one of its own it would draw from
    # the global torch RNG at every new epoch iterator, so a resumed run (which starts its
    # iterator mid-epoch) would see other dropout and masks than an uninterrupted one.
    loader.generator = torch.Generator().manual_seed(seed)
    return Loader(loader, sampler)


def shard_for_rank(utterances: list[Utterance], rank: int, world_size: int) -> list[Utterance]:
    """Every ``world_size``-th utterance (by duration order) for evaluation on one rank.

    Evaluation has no collective inside its batches, so ranks may get different batch counts;
    each utterance is scored exactly once (no padding duplicates).
    """
    ordered = sorted(utterances, key=lambda u: (u.duration, u.id))
    return ordered[rank::world_size]


@torch.no_grad()
def estimate_normalizer(
    model: torch.nn.Module,
    utterances: list[Utterance],
    data: DataConfig,
    *,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    max_batch_seconds: float = 60.0,
) -> int:
    """Estimate the global feature mean/std on a seeded sample of ``utterances`` and set them.

    ``data.stats_utterances`` utterances are drawn (the same ones on every rank), each rank
    featurises its share, and the summed counters are all-reduced, so every rank ends with the
    same statistics. The statistics live in ``model.normalizer``'s buffers, so they are saved
    with every checkpoint and carried into fine-tuning.

    Returns:
        The number of fbank frames the statistics were estimated on.
    """
    rng = random.Random(f"{seed}/normalizer")
    sample = list(utterances)
    if len(sample) > data.stats_utterances:
        sample = rng.sample(sample, data.stats_utterances)
    mine = shard_for_rank(sample, rank, world_size)
    load = audio_loader(data)
    n_mels = model.normalizer.num_channels
    total = torch.zeros(n_mels, dtype=torch.float64)
    total_sq = torch.zeros(n_mels, dtype=torch.float64)
    count = torch.zeros((), dtype=torch.float64)
    batch: list[torch.Tensor] = []

    def flush() -> None:
        nonlocal total, total_sq, count
        if not batch:
            return
        lengths = torch.tensor([w.shape[0] for w in batch])
        waves = torch.zeros(len(batch), int(lengths.max()))
        for row, w in zip(waves, batch):
            row[: w.shape[0]] = w
        feats, frames = model.features(waves.to(device), lengths.to(device))  # (b, t, n), (b,)
        s, sq, c = model.normalizer.statistics(feats, frames)
        total += s.cpu()
        total_sq += sq.cpu()
        count += c.cpu()
        batch.clear()

    seconds = 0.0
    for utt in mine:
        batch.append(load(utt.path))
        seconds += utt.duration
        if seconds >= max_batch_seconds:
            flush()
            seconds = 0.0
    flush()
    counters = Counters()
    counters.add_vector("sum", total)
    counters.add_vector("sq", total_sq)
    counters.add_total("count", float(count))
    reduced = counters.reduce()
    frames = reduced.sums["count"]
    target = model.normalizer.mean.device
    model.normalizer.set_statistics(reduced.vectors["sum"].to(target), reduced.vectors["sq"].to(target), frames)
    return int(frames)

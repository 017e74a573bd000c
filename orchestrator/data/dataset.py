"""Utterances -> padded batches: the map-style dataset, its collate, and the DataLoader builder.

Dimensions: b batch, s audio samples, l token ids.

One item (``SpeechDataset[i]``)::

    {"id": str, "wave": (s,) float32, "text": str, "tokens": (l,) int64 or None}

One batch (``collate``)::

    {"ids": list[str], "texts": list[str],
     "waves": (b, s_max) float32, zero-padded,   "wave_lengths": (b,) int64,
     "tokens": (b, l_max) int64 padded with the blank 0 (or None),
     "token_lengths": (b,) int64 (or None),
     "position": BatchPosition or None}   # where the batch sits in the sampler's epoch

The audio loader is injected (``load_audio(path) -> (s,)``, e.g.
``orchestrator.data.librispeech.load_audio``) so this module reads no files itself.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from orchestrator.data.batching import BatchIndices, BatchPosition
from orchestrator.data.errors import CorpusError
from orchestrator.data.tokenizers import BLANK, Tokenizer
from orchestrator.data.types import Utterance

__all__ = ["ResumableDataLoader", "SpeechDataset", "build_dataloader", "collate"]

Item = dict[str, Any]


class _Items(list):
    """The items of one batch, with the sampler position of the batch they form."""

    position: BatchPosition | None = None


class SpeechDataset(Dataset):
    """Map-style dataset over utterance records.

    Args:
        utterances: the records, in the order the sampler indexes them.
        load_audio: ``path -> (s,)`` float waveform at the model's sample rate.
        tokenizer: encodes ``text`` to ``tokens``; ``None`` for pre-training (``tokens`` is None).
        wave_transform: optional per-utterance ``(s,) -> (s',)`` transform applied after loading
            (runs in DataLoader workers; batch-level augmentation belongs in the loop, see
            ``orchestrator.data.augment``).
        check_text: encode every transcript now, so that one the tokenizer rejects fails here,
            with all such utterances named, rather than hours into training.

    Raises:
        CorpusError: ``check_text`` and some transcripts cannot be encoded.
    """

    def __init__(
        self,
        utterances: Sequence[Utterance],
        load_audio: Callable[[str], torch.Tensor],
        tokenizer: Tokenizer | None = None,
        wave_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        *,
        check_text: bool = True,
    ) -> None:
        self.utterances = list(utterances)
        self.load_audio = load_audio
        self.tokenizer = tokenizer
        self.wave_transform = wave_transform
        if tokenizer is not None and check_text:
            self._check_text(tokenizer)

    def _check_text(self, tokenizer: Tokenizer, shown: int = 5) -> None:
        errors = []
        for utt in self.utterances:
            try:
                tokenizer.encode(utt.text, utt_id=utt.id)
            except ValueError as exc:
                errors.append(str(exc))
        if errors:
            more = f"\n  ... and {len(errors) - shown} more" if len(errors) > shown else ""
            raise CorpusError(
                f"{len(errors)} of {len(self.utterances)} transcripts cannot be encoded by {tokenizer!r}:\n  "
                + "\n  ".join(errors[:shown])
                + more
            )

    def __len__(self) -> int:
        return len(self.utterances)

    def __getitem__(self, index: int) -> Item:
        utt = self.utterances[index]
        try:
            wave = self.load_audio(utt.path)
        except Exception as exc:
            raise RuntimeError(
                f"utterance {utt.id!r}: could not load audio from {utt.path} ({type(exc).__name__}: {exc}); "
                "check that the file exists and is readable, or remove it from the manifest"
            ) from exc
        wave = torch.as_tensor(wave)
        if wave.dim() == 2 and wave.shape[0] == 1:  # (1, s) mono from a channels-first loader
            wave = wave[0]
        if wave.dim() != 1:
            raise ValueError(
                f"utterance {utt.id!r}: load_audio returned shape {tuple(wave.shape)}, expected a mono wave (s,)"
            )
        if self.wave_transform is not None:
            wave = self.wave_transform(wave)
        tokens = None
        if self.tokenizer is not None:
            tokens = torch.tensor(self.tokenizer.encode(utt.text, utt_id=utt.id), dtype=torch.long)
        return {"id": utt.id, "wave": wave.float(), "text": utt.text, "tokens": tokens}

    def __getitems__(self, indices: Sequence[int]) -> list[Item]:
        # DataLoader calls this with what the batch sampler yielded: keep the batch's position.
        items = _Items(self[i] for i in indices)
        items.position = indices.position if isinstance(indices, BatchIndices) else None
        return items


def _pad_1d(seqs: Sequence[torch.Tensor], pad_value: float | int) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([s.shape[0] for s in seqs], dtype=torch.long)  # (b,)
    out = seqs[0].new_full((len(seqs), int(lengths.max()) if len(seqs) else 0), pad_value)  # (b, max)
    for row, s in zip(out, seqs):
        row[: s.shape[0]] = s
    return out, lengths


def collate(items: Sequence[Item], *, token_pad_id: int = BLANK) -> dict[str, Any]:
    """Pads a list of :class:`SpeechDataset` items into one batch (see the module docstring).

    Args:
        items: the dataset items of one batch.
        token_pad_id: value of the padded token positions (CTC ignores them past
            ``token_lengths``; the blank keeps them valid ids).

    Returns:
        The batch dict; ``tokens`` and ``token_lengths`` are None when the items have no tokens.
    """
    if not items:
        raise ValueError("collate: empty batch")
    waves, wave_lengths = _pad_1d([it["wave"] for it in items], 0.0)  # (b, s_max), (b,)
    with_tokens = [it["tokens"] is not None for it in items]
    if any(with_tokens) and not all(with_tokens):
        raise ValueError("collate: some items have tokens and some do not")
    tokens = token_lengths = None
    if all(with_tokens):
        tokens, token_lengths = _pad_1d([it["tokens"] for it in items], token_pad_id)  # (b, l_max), (b,)
    return {
        "ids": [it["id"] for it in items],
        "texts": [it["text"] for it in items],
        "waves": waves,
        "wave_lengths": wave_lengths,
        "tokens": tokens,
        "token_lengths": token_lengths,
        "position": getattr(items, "position", None),
    }


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` that tells its batch sampler which batch the loop has just received.

    Worker processes fetch batches ahead of the loop, so the sampler alone would report batches
    that have been prepared, not trained on. After each batch it delivers, this loader sets the
    sampler's position to the batch's ``position`` (``DynamicBatchSampler.mark_consumed``), so
    ``sampler.state_dict()`` read between two batches is exact.
    """

    def __iter__(self):
        sampler = self.batch_sampler
        mark = getattr(sampler, "mark_consumed", None)
        for batch in super().__iter__():
            position = batch.get("position") if isinstance(batch, dict) else None
            if mark is not None and position is not None:
                mark(position)
            yield batch


def build_dataloader(
    dataset: Dataset,
    batch_sampler: Sampler[list[int]],
    *,
    num_workers: int = 0,
    persistent_workers: bool = False,
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
    collate_fn: Callable[[list[Item]], Any] = collate,
    multiprocessing_context: str | None = None,
) -> ResumableDataLoader:
    """Builds the loader of a training or evaluation loop from a batch sampler.

    Use the loader as is (move batches with ``tensor.to(device)``): it is not meant for
    ``ray.train.torch.prepare_data_loader``, which would replace a batch sampler by a
    ``DistributedSampler`` (the sampler already splits the data between ranks).

    Args:
        dataset: usually a :class:`SpeechDataset`.
        batch_sampler: usually a ``DynamicBatchSampler``; yields lists of indices.
        num_workers: loader processes; 0 loads in the loop's process.
        persistent_workers: keep the workers between epochs (off by default: a Ray worker that
            also runs evaluation would otherwise keep two pools of processes alive).
        pin_memory: page-locked batches for faster host-to-GPU copies.
        prefetch_factor: batches loaded ahead per worker (torch's default when None).
        collate_fn: turns a list of items into a batch.
        multiprocessing_context: e.g. ``"spawn"`` or ``"forkserver"``; torch's default when None.
    """
    if num_workers < 0:
        raise ValueError(f"build_dataloader: num_workers={num_workers} must be >= 0")
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs["persistent_workers"] = persistent_workers
        if prefetch_factor is not None:
            kwargs["prefetch_factor"] = prefetch_factor
        if multiprocessing_context is not None:
            kwargs["multiprocessing_context"] = multiprocessing_context
    return ResumableDataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        **kwargs,
    )

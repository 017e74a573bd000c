"""DynamicBatchSampler, SpeechDataset, collate and the resumable DataLoader."""

from __future__ import annotations

import logging
import pickle
import queue
import random
import socket
import time
from datetime import timedelta

import pytest
import torch

from orchestrator.data.batching import BatchIndices, BatchPosition, DynamicBatchSampler
from orchestrator.data.dataset import SpeechDataset, build_dataloader, collate
from orchestrator.data.tokenizers import CharTokenizer
from orchestrator.data.types import Utterance

RATE = 100  # samples per second of the fake audio: keeps the waves tiny


def make_utts(n: int = 300, seed: int = 0, longest: float = 25.0) -> list[Utterance]:
    rng = random.Random(seed)
    return [
        Utterance(id=f"spk{i % 7}-ch-{i:04d}", path=f"/audio/{i}.flac", duration=round(rng.uniform(0.5, longest), 2),
                  text="HELLO WORLD"[: 1 + i % 11], speaker=f"spk{i % 7}")
        for i in range(n)
    ]


_DURATIONS = [u.duration for u in make_utts()]


def fake_load_audio(path: str) -> torch.Tensor:
    """(s,) filled with the utterance's index, ``duration * RATE`` samples long."""
    i = int(path.rsplit("/", 1)[1].split(".")[0])
    return torch.full((int(round(_DURATIONS[i] * RATE)),), float(i))


def flat(batches) -> list[int]:
    return [i for b in batches for i in b]


def rank_batches(sampler_kwargs: dict, world_size: int, epoch: int) -> list[list[tuple[list[int], bool]]]:
    out = []
    for rank in range(world_size):
        s = DynamicBatchSampler(**sampler_kwargs, rank=rank, world_size=world_size)
        s.set_epoch(epoch)
        out.append([(list(b), b.position.duplicate) for b in s])
    return out


# ---------------------------------------------------------------------- single process


@pytest.mark.parametrize("max_batch_size", [None, 5])
def test_every_utterance_once_per_epoch(max_batch_size):
    utts = make_utts()
    s = DynamicBatchSampler(utts, max_batch_seconds=60.0, max_batch_size=max_batch_size, seed=3, world_size=1, rank=0)
    for epoch in range(3):
        s.set_epoch(epoch)
        batches = list(s)
        assert len(batches) == len(s.batches(epoch)) == s.stats(epoch)["num_batches"]
        assert sorted(flat(batches)) == list(range(len(utts)))
        assert not any(b.position.duplicate for b in batches)
        if max_batch_size is not None:
            assert max(len(b) for b in batches) <= max_batch_size


def test_batches_within_padded_budget():
    utts = make_utts(longest=25.0)
    budget = 60.0
    s = DynamicBatchSampler(utts, max_batch_seconds=budget, world_size=1, rank=0)
    for batch in s:
        longest = max(utts[i].duration for i in batch)
        assert len(batch) * longest <= budget + 1e-9
    assert s.stats()["padding_efficiency"] > 0.8  # bucketing keeps padding low


def test_overlong_utterance_is_a_batch_alone(caplog):
    utts = make_utts(50, longest=10.0)
    utts[17] = Utterance(id="too-long", path="/x.flac", duration=45.0, text="A", speaker="s")
    with caplog.at_level(logging.WARNING, logger="orchestrator.data.batching"):
        s = DynamicBatchSampler(utts, max_batch_seconds=30.0, world_size=1, rank=0)
    assert "too-long" in caplog.text and s.num_overlong == 1
    batches = list(s)
    assert [17] in batches
    assert sorted(flat(batches)) == list(range(50))
    for batch in batches:
        if batch != [17]:
            assert len(batch) * max(utts[i].duration for i in batch) <= 30.0


def test_epochs_shuffle_differently_and_repeat_exactly():
    utts = make_utts()
    kw = dict(max_batch_seconds=60.0, world_size=1, rank=0)
    s = DynamicBatchSampler(utts, seed=1, **kw)
    s.set_epoch(0)
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    s.set_epoch(0)
    assert list(s) == e0
    assert e0 != e1 and sorted(map(tuple, e0)) != sorted(map(tuple, e1))  # order and composition change
    other = DynamicBatchSampler(utts, seed=1, **kw)
    other.set_epoch(1)
    assert list(other) == e1  # a fresh sampler: same plan
    reseeded = DynamicBatchSampler(utts, seed=2, **kw)
    reseeded.set_epoch(1)
    assert list(reseeded) != e1


def test_iterating_without_set_epoch_moves_to_the_next_epoch():
    s = DynamicBatchSampler(make_utts(), max_batch_seconds=60.0, world_size=1, rank=0)
    first = list(s)
    assert (s.epoch, s.batches_done) == (1, 0)
    second = list(s)
    assert second == s.batches(1) and second != first


def test_no_shuffle_is_sorted_and_fixed():
    utts = make_utts()
    s = DynamicBatchSampler(utts, max_batch_seconds=60.0, shuffle=False, world_size=1, rank=0)
    e0 = list(s)
    durations = [utts[i].duration for i in flat(e0)]
    assert durations == sorted(durations)
    s.set_epoch(5)
    assert list(s) == e0


# ---------------------------------------------------------------------- distributed


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_get_equal_counts_and_lose_nothing_with_padding(world_size):
    kw = dict(utterances=make_utts(301, seed=5), max_batch_seconds=50.0, seed=7)
    saw_remainder = False
    for epoch in range(4):
        per_rank = rank_batches(kw, world_size, epoch)
        counts = {len(r) for r in per_rank}
        assert len(counts) == 1, f"ranks got different batch counts {counts}"
        real = [b for r in per_rank for b, dup in r if not dup]
        dups = [b for r in per_rank for b, dup in r if dup]
        assert sorted(flat(real)) == list(range(301))  # non-duplicates: exactly one epoch
        assert len(dups) < world_size
        saw_remainder |= bool(dups)
    assert saw_remainder, "the test data never produced an uneven batch count"


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_get_equal_counts_when_dropping(world_size):
    kw = dict(utterances=make_utts(301, seed=5), max_batch_seconds=50.0, seed=7, uneven="drop")
    total = len(DynamicBatchSampler(kw["utterances"], max_batch_seconds=50.0, seed=7, world_size=1, rank=0))
    per_rank = rank_batches(kw, world_size, 0)
    assert len({len(r) for r in per_rank}) == 1
    seen = flat(b for r in per_rank for b, _ in r)
    assert len(seen) == len(set(seen))  # nothing twice
    assert total - world_size < sum(len(r) for r in per_rank) <= total


def test_too_few_batches_to_drop_raises():
    with pytest.raises(ValueError, match="uneven='pad'"):
        DynamicBatchSampler([1.0], max_batch_seconds=10.0, world_size=2, rank=0, uneven="drop")


def test_steps_group_similar_durations_across_ranks():
    utts = make_utts(600, seed=2)
    per_rank = rank_batches(dict(utterances=utts, max_batch_seconds=60.0, seed=0), 2, 0)
    spreads = []
    for (a, _), (b, _) in zip(*per_rank):
        la, lb = (max(utts[i].duration for i in x) for x in (a, b))
        spreads.append(abs(la - lb))
    assert sorted(spreads)[len(spreads) // 2] < 2.0  # ranks of one step wait little for each other


# ---------------------------------------------------------------------- resume


@pytest.mark.parametrize("world_size,rank", [(1, 0), (3, 2)])
def test_resume_mid_epoch_yields_exactly_the_remaining_batches(world_size, rank):
    kw = dict(max_batch_seconds=60.0, seed=11, world_size=world_size)
    utts = make_utts()
    full = DynamicBatchSampler(utts, rank=rank, **kw).batches(2)
    run = DynamicBatchSampler(utts, rank=0, **kw)  # rank 0 saves; every rank loads it
    run.set_epoch(2)
    it = iter(run)
    for _ in range(5):
        next(it)
    state = pickle.loads(pickle.dumps(run.state_dict()))
    assert (state["epoch"], state["batches_done"]) == (2, 5)

    resumed = DynamicBatchSampler(utts, rank=rank, **{**kw, "seed": 0})  # the saved seed wins
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # the loop's usual call keeps the place
    assert list(resumed) == full[5:]
    assert (resumed.epoch, resumed.batches_done) == (3, 0)
    resumed.set_epoch(3)
    assert list(resumed) == DynamicBatchSampler(utts, rank=rank, **kw).batches(3)


def test_resume_mid_epoch_with_other_settings_is_refused():
    utts = make_utts()
    run = DynamicBatchSampler(utts, max_batch_seconds=60.0, world_size=2, rank=0)
    it = iter(run)
    next(it)
    state = run.state_dict()
    with pytest.raises(ValueError, match="world_size: saved 2, now 4"):
        DynamicBatchSampler(utts, max_batch_seconds=60.0, world_size=4, rank=0).load_state_dict(state)
    with pytest.raises(ValueError, match="utterances"):
        DynamicBatchSampler(utts[:-1], max_batch_seconds=60.0, world_size=2, rank=0).load_state_dict(state)
    # At an epoch boundary a new worker count is fine.
    boundary = {**state, "epoch": 3, "batches_done": 0}
    other = DynamicBatchSampler(utts, max_batch_seconds=60.0, world_size=4, rank=1)
    other.load_state_dict(boundary)
    assert (other.epoch, other.batches_done) == (3, 0)


# ---------------------------------------------------------------------- dataset, collate, loader


def test_collate_pads_waves_and_tokens():
    tok = CharTokenizer()
    utts = make_utts(6)
    ds = SpeechDataset(utts, fake_load_audio, tokenizer=tok)
    batch = collate(ds.__getitems__(BatchIndices([0, 3, 5], BatchPosition(4, 2))))
    lengths = [int(round(utts[i].duration * RATE)) for i in (0, 3, 5)]
    assert batch["ids"] == [utts[i].id for i in (0, 3, 5)]
    assert batch["texts"] == [utts[i].text for i in (0, 3, 5)]
    assert batch["waves"].shape == (3, max(lengths)) and batch["waves"].dtype == torch.float32
    assert batch["wave_lengths"].tolist() == lengths
    for row, (i, n) in enumerate(zip((0, 3, 5), lengths)):
        assert torch.all(batch["waves"][row, :n] == i) and torch.all(batch["waves"][row, n:] == 0)
        tokens = tok.encode(utts[i].text)
        assert batch["token_lengths"][row] == len(tokens)
        assert batch["tokens"][row, : len(tokens)].tolist() == tokens
        assert torch.all(batch["tokens"][row, len(tokens) :] == tok.blank)
    assert batch["position"] == BatchPosition(4, 2)


def test_dataset_without_tokenizer_and_bad_audio():
    utts = make_utts(3)
    batch = collate([SpeechDataset(utts, fake_load_audio)[i] for i in range(3)])
    assert batch["tokens"] is None and batch["token_lengths"] is None and batch["position"] is None

    def broken(path):
        raise OSError("disk on fire")

    with pytest.raises(RuntimeError, match=r"utterance 'spk1-ch-0001'.*/audio/1.flac.*disk on fire"):
        SpeechDataset(utts, broken)[1]
    with pytest.raises(ValueError, match=r"spk0-ch-0000.*shape \(2, 5\)"):
        SpeechDataset(utts, lambda p: torch.zeros(2, 5))[0]


def test_dataset_rejects_untokenizable_transcripts_up_front():
    utts = make_utts(20)
    utts[3] = Utterance(id="bad-1", path="/audio/3.flac", duration=1.0, text="ROOM 42", speaker="s")
    utts[9] = Utterance(id="bad-2", path="/audio/9.flac", duration=1.0, text="HI!", speaker="s")
    with pytest.raises(ValueError, match=r"(?s)2 of 20 transcripts.*'bad-1'.*'4'.*'bad-2'.*'!'"):
        SpeechDataset(utts, fake_load_audio, tokenizer=CharTokenizer())


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_resume_is_exact_despite_prefetch(num_workers):
    utts = make_utts()
    ds = SpeechDataset(utts, fake_load_audio, tokenizer=CharTokenizer())
    kw = dict(max_batch_seconds=60.0, seed=4, world_size=1, rank=0)

    sampler = DynamicBatchSampler(utts, **kw)
    loader = build_dataloader(ds, sampler, num_workers=num_workers)
    sampler.set_epoch(1)
    seen = []
    for k, batch in enumerate(loader):
        seen.append(batch["ids"])
        assert batch["position"] == BatchPosition(1, k + 1)
        if k == 6:
            state = sampler.state_dict()  # workers have prefetched further by now
            break
    del loader
    assert (state["epoch"], state["batches_done"]) == (1, 7)

    resumed = DynamicBatchSampler(utts, **kw)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)
    rest = [b["ids"] for b in build_dataloader(ds, resumed, num_workers=num_workers)]
    expected = [[utts[i].id for i in b] for b in DynamicBatchSampler(utts, **kw).batches(1)]
    assert seen + rest == expected
    assert (resumed.epoch, resumed.batches_done) == (2, 0)


# ---------------------------------------------------------------------- DDP no-deadlock


def _ddp_worker(rank: int, world_size: int, port: int, results) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size, timeout=timedelta(seconds=20)
    )
    try:
        utts = make_utts(301, seed=5)
        sampler = DynamicBatchSampler(utts, max_batch_seconds=50.0, seed=7)  # rank/world_size from dist
        seen, num_batches = [], 0
        for epoch in range(2):
            sampler.set_epoch(epoch)
            for batch in sampler:
                # A rank with one batch more would block here (a DDP gradient all-reduce) forever.
                step = torch.tensor([float(epoch), float(batch.position.batches_done)])
                dist.all_reduce(step)
                assert step.tolist() == [world_size * epoch, world_size * batch.position.batches_done]
                seen.extend(batch)
                num_batches += 1
        results.put((rank, num_batches, sorted(set(seen))))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_ranks_never_deadlock():
    ctx = torch.multiprocessing.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, results), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    got = {}
    deadline = time.monotonic() + 60
    try:
        while len(got) < len(procs):
            failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            assert not failed, f"a DDP worker failed with exit code {failed}"
            assert time.monotonic() < deadline, "DDP workers did not finish: ranks got different batch counts?"
            try:
                rank, n, seen = results.get(timeout=0.5)
                got[rank] = (n, seen)
            except queue.Empty:
                pass
        for p in procs:
            p.join(timeout=30)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    assert got[0][0] == got[1][0]
    assert sorted(set(got[0][1]) | set(got[1][1])) == list(range(301))

"""Dynamic, duration-bucketed, DDP-safe and resumable batching of utterances.

:class:`DynamicBatchSampler` is a ``batch_sampler`` for ``torch.utils.data.DataLoader``: it
yields lists of dataset indices whose *padded* audio (longest utterance x batch size) fits in
``max_batch_seconds``, so the memory of a batch is bounded whatever its lengths.

One epoch's plan, computed identically on every rank from (utterances, seed, epoch, world_size):

1. sort the utterances by duration and cut them into ``num_buckets`` buckets of equal count;
2. shuffle inside each bucket (seeded by (seed, epoch)) and pack each bucket greedily into
   batches: an utterance joins the current batch while ``(size + 1) * max_duration <=
   max_batch_seconds`` (and ``size < max_batch_size``). An utterance longer than the budget on
   its own is a batch of one (it is never dropped silently; a warning names it at construction;
   filter the manifest if it cannot fit in memory);
3. group consecutive batches into *steps* of ``world_size`` batches (neighbours in duration, so
   the ranks of one DDP step wait little for each other); when the batch count is not a
   multiple of ``world_size``:

   - ``uneven="pad"`` (default, what ``DistributedSampler`` does): the last step is filled with
     repeats of the first batches, marked ``duplicate``; every utterance is seen each epoch and
     at most ``world_size - 1`` batches are seen twice;
   - ``uneven="drop"``: the incomplete last step is dropped (other batches each epoch, since the
     packing is reshuffled, so no utterance is excluded for good);

4. shuffle the steps (seeded by (seed, epoch)) and deal them: rank ``r`` gets batch ``r`` of every
   step (round-robin over the global batch list). Every rank thus gets exactly the same number
   of batches, which DDP needs (a rank with one batch more blocks forever in its all-reduce).

With ``shuffle=False`` (evaluation) nothing is shuffled: batches go from short to long.

Position and resume: the sampler's position is ``(epoch, batches_done)``, the batches of
``epoch`` this rank has consumed. Every yielded batch is a :class:`BatchIndices` carrying the
:class:`BatchPosition` reached once it is consumed; the DataLoader built by
``orchestrator.data.dataset.build_dataloader`` copies it into each collated batch and into the
sampler, so ``state_dict()`` is exact even when worker processes prefetch batches. When the
last batch of epoch ``e`` is consumed the position becomes ``(e + 1, 0)``.
``set_epoch(e)`` moves to epoch ``e`` from its start, unless the sampler is already in epoch
``e`` (as after ``load_state_dict``), in which case it keeps its place. So the usual loop

    for epoch in range(sampler.epoch, num_epochs):
        sampler.set_epoch(epoch)
        for batch in loader:
            ...
            save({"sampler": sampler.state_dict(), ...})

resumes mid-epoch with exactly the remaining batches, in the same order. The state is the same
on every rank, so rank 0's saved state may be loaded by all ranks. If something between the
loader and the loop prefetches (``ray.train.torch.prepare_data_loader`` prefetches one batch),
call ``sampler.mark_consumed(batch["position"])`` after each step before saving.

Shuffling uses ``random.Random.random`` only, whose sequence Python guarantees across versions,
so a plan (and a resume) does not change with a numpy or torch upgrade.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Mapping, Sequence

import torch
from torch.utils.data import Sampler

from orchestrator.data.types import Utterance

__all__ = ["BatchIndices", "BatchPosition", "DynamicBatchSampler"]

log = logging.getLogger(__name__)

UnevenPolicy = Literal["pad", "drop"]
_UNEVEN_POLICIES = ("pad", "drop")
STATE_VERSION = 1


@dataclass(frozen=True)
class BatchPosition:
    """Where a batch sits in its rank's epoch.

    Attributes:
        epoch: the epoch the batch belongs to.
        batches_done: this rank's batches of ``epoch`` consumed once this batch is (1-based index).
        duplicate: a repeat added so every rank has as many batches (``uneven="pad"``): train on it
            (DDP needs the step), but leave it out of evaluation metrics.
    """

    epoch: int
    batches_done: int
    duplicate: bool = False


class BatchIndices(list):
    """A batch of dataset indices (a plain ``list[int]``) that knows its :class:`BatchPosition`."""

    def __init__(self, indices: Sequence[int], position: BatchPosition) -> None:
        super().__init__(indices)
        self.position = position

    def __reduce__(self):  # keep the position when sent to DataLoader worker processes
        return (BatchIndices, (list(self), self.position))


def _rng(seed: int, epoch: int, purpose: str) -> random.Random:
    digest = hashlib.sha256(f"{seed}/{epoch}/{purpose}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _shuffle(items: list, rng: random.Random) -> None:
    """Fisher-Yates on ``rng.random()`` (stable across Python versions, unlike ``shuffle``)."""
    for i in range(len(items) - 1, 0, -1):
        j = int(rng.random() * (i + 1))
        items[i], items[j] = items[j], items[i]


class DynamicBatchSampler(Sampler[list[int]]):
    """Batches of bounded padded duration, bucketed, identical in count on every DDP rank.

    See the module docstring for the policy. Deterministic given (utterances, seed, epoch,
    rank, world_size) and the settings below.

    Args:
        utterances: the dataset's utterances in dataset order (``Utterance`` records, or plain
            durations in seconds). Every rank must pass the same list in the same order.
        max_batch_seconds: budget per batch (per rank) in padded seconds: ``max duration x size``.
        max_batch_size: optional cap on utterances per batch.
        num_buckets: duration buckets (equal counts); more gives less padding, fewer gives more
            varied batches.
        shuffle: shuffle inside buckets and the order of steps, per epoch; ``False`` for evaluation.
        seed: base seed; each epoch's order comes from (seed, epoch).
        rank: this process's rank; ``None`` reads ``torch.distributed`` (0 when not initialised).
        world_size: number of ranks; ``None`` reads ``torch.distributed`` (1 when not initialised).
        uneven: ``"pad"`` or ``"drop"``, when the batch count is not a multiple of ``world_size``.
    """

    def __init__(
        self,
        utterances: Sequence[Utterance] | Sequence[float],
        *,
        max_batch_seconds: float,
        max_batch_size: int | None = None,
        num_buckets: int = 30,
        shuffle: bool = True,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        uneven: UnevenPolicy = "pad",
    ) -> None:
        if not len(utterances):
            raise ValueError("DynamicBatchSampler: the utterance list is empty")
        if not (isinstance(max_batch_seconds, (int, float)) and math.isfinite(max_batch_seconds) and max_batch_seconds > 0):
            raise ValueError(f"DynamicBatchSampler: max_batch_seconds={max_batch_seconds!r} must be a positive number")
        if max_batch_size is not None and (not isinstance(max_batch_size, int) or max_batch_size < 1):
            raise ValueError(f"DynamicBatchSampler: max_batch_size={max_batch_size!r} must be None or an int >= 1")
        if not isinstance(num_buckets, int) or num_buckets < 1:
            raise ValueError(f"DynamicBatchSampler: num_buckets={num_buckets!r} must be an int >= 1")
        if uneven not in _UNEVEN_POLICIES:
            raise ValueError(f"DynamicBatchSampler: uneven={uneven!r} is not one of {list(_UNEVEN_POLICIES)}")
        if rank is None or world_size is None:
            dist_on = torch.distributed.is_available() and torch.distributed.is_initialized()
            rank = (torch.distributed.get_rank() if dist_on else 0) if rank is None else rank
            world_size = (torch.distributed.get_world_size() if dist_on else 1) if world_size is None else world_size
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"DynamicBatchSampler: rank={rank} must be in [0, world_size={world_size})")

        self._ids: list[str] | None = None
        if isinstance(utterances[0], Utterance):
            self._ids = [u.id for u in utterances]
            durations = [float(u.duration) for u in utterances]
        else:
            durations = [float(d) for d in utterances]
        for i, d in enumerate(durations):
            if not (math.isfinite(d) and d >= 0):
                name = f"utterance {self._ids[i]!r}" if self._ids else f"utterance #{i}"
                raise ValueError(f"DynamicBatchSampler: {name} has duration {d!r}; durations must be finite and >= 0")

        self.durations = durations
        self.max_batch_seconds = float(max_batch_seconds)
        self.max_batch_size = max_batch_size
        self.num_buckets = num_buckets
        self.shuffle = shuffle
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.uneven: UnevenPolicy = uneven
        self._epoch = 0
        self._batches_done = 0
        self._plans: OrderedDict[int, list[tuple[list[int], bool]]] = OrderedDict()
        self._fingerprint: str | None = None

        # Epoch-independent: the duration order and the bucket boundaries.
        self._order = sorted(range(len(durations)), key=lambda i: (durations[i], i))
        n, nb = len(durations), min(num_buckets, len(durations))
        cuts = [round(k * n / nb) for k in range(nb + 1)]
        self._buckets = [self._order[a:b] for a, b in zip(cuts[:-1], cuts[1:]) if b > a]

        overlong = [i for i in range(n) if durations[i] > self.max_batch_seconds]
        self.num_overlong = len(overlong)
        if overlong:
            worst = max(overlong, key=lambda i: durations[i])
            name = repr(self._ids[worst]) if self._ids else f"#{worst}"
            log.warning(
                "%d utterance(s) are longer than max_batch_seconds=%g s (longest: %s, %.1f s); each is a batch "
                "of its own. Filter them from the manifest or raise max_batch_seconds if they do not fit in memory.",
                len(overlong), self.max_batch_seconds, name, durations[worst],
            )
        if self.uneven == "drop":
            self._rank_plan(0)  # fails now, not mid-training, when there are fewer batches than ranks

    # ------------------------------------------------------------------ plan

    def _pack(self, indices: list[int]) -> list[list[int]]:
        batches: list[list[int]] = []
        batch: list[int] = []
        longest = 0.0
        for i in indices:
            d = self.durations[i]
            new_longest = max(longest, d)
            full = self.max_batch_size is not None and len(batch) >= self.max_batch_size
            if batch and (full or (len(batch) + 1) * new_longest > self.max_batch_seconds):
                batches.append(batch)
                batch, new_longest = [], d
            batch.append(i)
            longest = new_longest
        if batch:
            batches.append(batch)
        return batches

    def _global_steps(self, epoch: int) -> list[list[tuple[list[int], bool]]]:
        """All ranks' batches of ``epoch``: steps of ``world_size`` (batch, duplicate) pairs."""
        batches: list[list[int]] = []
        bucket_rng = _rng(self.seed, epoch, "buckets")
        for bucket in self._buckets:
            bucket = list(bucket)
            if self.shuffle:
                _shuffle(bucket, bucket_rng)
            batches.extend(self._pack(bucket))
        w = self.world_size
        flagged = [(b, False) for b in batches]
        remainder = len(flagged) % w
        if remainder and self.uneven == "pad":
            flagged += [(batches[k % len(batches)], True) for k in range(w - remainder)]
        elif remainder:
            flagged = flagged[: len(flagged) - remainder]
        steps = [flagged[k : k + w] for k in range(0, len(flagged), w)]
        if not steps:
            raise ValueError(
                f"DynamicBatchSampler: epoch {epoch} has {len(batches)} batch(es) for world_size={w} with "
                "uneven='drop', so no rank gets any; lower max_batch_seconds or use uneven='pad'"
            )
        if self.shuffle:
            _shuffle(steps, _rng(self.seed, epoch, "steps"))
        return steps

    def _rank_plan(self, epoch: int) -> list[tuple[list[int], bool]]:
        plan = self._plans.get(epoch)
        if plan is None:
            plan = [step[self.rank] for step in self._global_steps(epoch)]
            self._plans[epoch] = plan
            while len(self._plans) > 2:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(epoch)
        return plan

    def batches(self, epoch: int | None = None) -> list[list[int]]:
        """Returns this rank's full batch list for ``epoch`` (default: the current epoch)."""
        return [list(b) for b, _ in self._rank_plan(self._epoch if epoch is None else epoch)]

    def stats(self, epoch: int | None = None) -> dict[str, float]:
        """Padding and count statistics of this rank's batches for ``epoch`` (default: current)."""
        plan = self._rank_plan(self._epoch if epoch is None else epoch)
        real = sum(self.durations[i] for b, _ in plan for i in b)
        padded = sum(len(b) * max(self.durations[i] for i in b) for b, _ in plan)
        return {
            "num_batches": len(plan),
            "num_duplicates": sum(dup for _, dup in plan),
            "audio_seconds": real,
            "padded_seconds": padded,
            "padding_efficiency": real / padded if padded else 1.0,
        }

    # ------------------------------------------------------------------ iteration and position

    def __len__(self) -> int:
        """This rank's number of batches in the current epoch (the whole epoch, not what is left)."""
        return len(self._rank_plan(self._epoch))

    def __iter__(self) -> Iterator[BatchIndices]:
        epoch, start = self._epoch, self._batches_done
        plan = self._rank_plan(epoch)
        for k in range(start, len(plan)):
            batch, duplicate = plan[k]
            position = BatchPosition(epoch, k + 1, duplicate)
            # A batch counts as consumed as soon as it is handed out: the consumer saves a
            # checkpoint only after it has trained on it, before asking for the next one.
            self._set_position(epoch, k + 1)
            yield BatchIndices(batch, position)

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def batches_done(self) -> int:
        return self._batches_done

    def _set_position(self, epoch: int, batches_done: int) -> None:
        n = len(self._rank_plan(epoch))
        if not 0 <= batches_done <= n:
            raise ValueError(f"DynamicBatchSampler: batches_done={batches_done} is outside [0, {n}] for epoch {epoch}")
        if batches_done == n:  # a finished epoch is the start of the next one
            epoch, batches_done = epoch + 1, 0
        self._epoch, self._batches_done = epoch, batches_done

    def set_epoch(self, epoch: int) -> None:
        """Moves to the start of ``epoch``, or keeps the current place if already in ``epoch``."""
        if epoch < 0:
            raise ValueError(f"DynamicBatchSampler.set_epoch: epoch={epoch} must be >= 0")
        if epoch != self._epoch:
            self._epoch, self._batches_done = int(epoch), 0

    def mark_consumed(self, position: BatchPosition | Mapping[str, Any]) -> None:
        """Records that the batch at ``position`` (a batch's ``"position"``) has been consumed."""
        if isinstance(position, Mapping):
            position = BatchPosition(int(position["epoch"]), int(position["batches_done"]))
        self._set_position(position.epoch, position.batches_done)

    # ------------------------------------------------------------------ checkpoint

    def fingerprint(self) -> str:
        """A hash of the utterance list (ids and durations), to detect resuming on other data."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for i, d in enumerate(self.durations):
                h.update(f"{self._ids[i] if self._ids else i}\t{d!r}\n".encode())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def _plan_settings(self) -> dict[str, Any]:
        return {
            "max_batch_seconds": self.max_batch_seconds,
            "max_batch_size": self.max_batch_size,
            "num_buckets": self.num_buckets,
            "shuffle": self.shuffle,
            "world_size": self.world_size,
            "uneven": self.uneven,
        }

    def state_dict(self) -> dict[str, Any]:
        """The position and what shapes the plan; identical on every rank."""
        return {
            "version": STATE_VERSION,
            "epoch": self._epoch,
            "batches_done": self._batches_done,
            "seed": self.seed,
            "num_batches": len(self),
            "num_utterances": len(self.durations),
            "fingerprint": self.fingerprint(),
            **self._plan_settings(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores a position saved by :meth:`state_dict` (of any rank).

        Mid-epoch (``batches_done > 0``) the utterance list and every setting that shapes the plan
        must match, or the remaining batches would not be the ones left; at an epoch boundary only
        the seed is taken and a different utterance list is only warned about.

        Raises:
            ValueError: a state that cannot be continued here, with what differs.
        """
        missing = [k for k in ("epoch", "batches_done", "seed") if k not in state]
        if missing:
            raise ValueError(f"DynamicBatchSampler.load_state_dict: the state lacks {missing}")
        epoch, done = int(state["epoch"]), int(state["batches_done"])
        if epoch < 0 or done < 0:
            raise ValueError(f"DynamicBatchSampler.load_state_dict: bad position epoch={epoch}, batches_done={done}")
        same_data = state.get("fingerprint", self.fingerprint()) == self.fingerprint()
        if done > 0:
            diffs = [
                f"{k}: saved {state[k]!r}, now {v!r}"
                for k, v in self._plan_settings().items()
                if k in state and state[k] != v
            ]
            if not same_data:
                diffs.append(
                    f"utterances: saved {state.get('num_utterances')} with another fingerprint, now {len(self.durations)}"
                )
            if diffs:
                raise ValueError(
                    f"DynamicBatchSampler.load_state_dict: cannot resume mid-epoch (epoch {epoch}, batch {done}) "
                    f"because the plan differs: {'; '.join(diffs)}. Resume with the same data and settings, "
                    "or from a checkpoint taken at an epoch boundary."
                )
        elif not same_data:
            log.warning("DynamicBatchSampler: resuming at epoch %d on a different utterance list than was saved", epoch)
        old_seed = self.seed
        self.seed = int(state["seed"])
        if self.seed != old_seed:
            self._plans.clear()
        try:
            self._set_position(epoch, done)
        except ValueError:
            self.seed = old_seed
            self._plans.clear()
            raise

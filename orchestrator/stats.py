"""Error-rate statistics over utterances: bootstrap intervals and paired significance tests.

Corpus error rates are ratios of sums (``sum(errors) / sum(reference length)``), so both tests
resample *utterances* and recompute the ratio on each draw (Bisani and Ney, 2004, "Bootstrap
estimates for confidence intervals in ASR performance evaluation"):

* :func:`bootstrap_wer_ci`: percentile interval of one system's corpus WER (or CER);
* :func:`paired_bootstrap`: interval of the *difference* between two systems scored on the
  same utterances. One index draw serves both systems, so what the utterances share (a hard
  speaker, a long sentence) cancels out and the interval is far tighter than two unpaired ones.
  The difference is significant at the chosen level when its interval excludes 0.

:func:`read_records` loads the per-utterance records the evaluation writes
(``<subset>.tsv``: id, word_errors, words, reference, hypothesis) and :func:`pair_records`
aligns two systems' records, refusing utterance sets that do not match.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

MAX_INDEX_CELLS = 2_000_000  # bound on the (draws, utterances) index matrix held at once


def _draws(n: int, samples: int, seed: int):
    """Yield ``(start, stop, idx)`` with ``idx`` a ``(stop - start, n)`` matrix of resampled utterances."""
    rng = np.random.default_rng(seed)
    chunk = max(1, MAX_INDEX_CELLS // n)
    for start in range(0, samples, chunk):
        stop = min(samples, start + chunk)
        yield start, stop, rng.integers(0, n, size=(stop - start, n))


def bootstrap_wer_ci(
    word_errors: Sequence[int], words: Sequence[int], *, samples: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of corpus WER (or CER, given character counts).

    Each resample draws as many utterances as there are, with replacement, and computes
    ``sum(errors) / sum(words)`` over the draw.

    Returns:
        ``(low, high)``; ``(nan, nan)`` with no utterances or ``samples == 0``.
    """
    errors = np.asarray(word_errors, dtype=np.float64)
    lengths = np.asarray(words, dtype=np.float64)
    n = errors.shape[0]
    if n == 0 or samples <= 0:
        return (math.nan, math.nan)
    rates = np.empty(samples, dtype=np.float64)
    for start, stop, idx in _draws(n, samples, seed):
        rates[start:stop] = errors[idx].sum(axis=1) / np.maximum(lengths[idx].sum(axis=1), 1.0)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(rates, [alpha, 1.0 - alpha])
    return (float(low), float(high))


@dataclass(frozen=True)
class PairedDifference:
    """``rate(a) - rate(b)`` on the same utterances, with its bootstrap interval.

    Attributes:
        difference: the observed difference of corpus error rates (positive: ``a`` makes more errors).
        low, high: the percentile interval of the difference at ``level``.
        significant: the interval excludes 0.
        utterances: how many utterances were paired.
    """

    difference: float
    low: float
    high: float
    level: float
    utterances: int

    @property
    def significant(self) -> bool:
        return not (self.low <= 0.0 <= self.high)


def paired_bootstrap(
    errors_a: Sequence[int],
    errors_b: Sequence[int],
    lengths: Sequence[int],
    *,
    samples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> PairedDifference:
    """Paired bootstrap of the corpus error-rate difference ``a - b`` (Bisani and Ney, 2004).

    Args:
        errors_a, errors_b: errors per utterance of the two systems, in the same utterance order.
        lengths: reference length per utterance (words for WER, characters for CER).
        samples: bootstrap draws; each draws ``n`` utterance indices with replacement, used for
            both systems at once.
        seed: seed of the draws (same seed, same interval).
        level: coverage of the interval.

    Raises:
        ValueError: when the three sequences differ in length, are empty, or ``samples < 1``.
    """
    a = np.asarray(errors_a, dtype=np.float64)
    b = np.asarray(errors_b, dtype=np.float64)
    n_ref = np.asarray(lengths, dtype=np.float64)
    if not (a.shape == b.shape == n_ref.shape) or a.ndim != 1:
        raise ValueError(f"paired_bootstrap: {a.shape}, {b.shape} and {n_ref.shape} must be the same 1-d shape")
    if a.size == 0 or samples < 1:
        raise ValueError(f"paired_bootstrap needs utterances and samples >= 1 (got {a.size} utterances, {samples} samples)")
    total = max(float(n_ref.sum()), 1.0)
    observed = float((a.sum() - b.sum()) / total)
    diffs = np.empty(samples, dtype=np.float64)
    delta = a - b
    for start, stop, idx in _draws(a.size, samples, seed):
        diffs[start:stop] = delta[idx].sum(axis=1) / np.maximum(n_ref[idx].sum(axis=1), 1.0)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(diffs, [alpha, 1.0 - alpha])
    return PairedDifference(observed, float(low), float(high), level, int(a.size))


# --------------------------------------------------------------------------------------------
# per-utterance records
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """One scored utterance: word and character errors with the reference lengths."""

    word_errors: int
    words: int
    char_errors: int
    chars: int


RECORD_COLUMNS = ("id", "word_errors", "words", "reference", "hypothesis")


def read_records(path: str | Path, *, key_prefix: str = "") -> dict[str, Record]:
    """Per-utterance records of one ``<subset>.tsv`` written by the evaluation.

    Character errors are recomputed from the reference and hypothesis with the project's
    scorer, so CER is paired exactly like WER.

    Raises:
        ValueError: one line naming the file and what is wrong with it.
    """
    from orchestrator.train.decoding import score

    path = Path(path)
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows or tuple(rows[0]) != RECORD_COLUMNS:
        header = "\t".join(RECORD_COLUMNS)
        raise ValueError(f"{path}: expected the header {header!r}; re-run the evaluation to rewrite it")
    ids, refs, hyps, counts = [], [], [], []
    for line_no, row in enumerate(rows[1:], 2):
        row = row + [""] * (len(RECORD_COLUMNS) - len(row))  # an empty hypothesis may drop its tab
        try:
            counts.append((int(row[1]), int(row[2])))
        except ValueError:
            raise ValueError(f"{path}:{line_no}: word_errors and words must be integers, got {row[1:3]}") from None
        ids.append(row[0])
        refs.append(row[3])
        hyps.append(row[4])
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: utterance ids repeat; each utterance must be scored once")
    chars = score(ids, refs, hyps)
    by_id = dict(zip(chars.ids, zip(chars.char_errors, chars.chars)))
    return {
        f"{key_prefix}{uid}": Record(word_errors=we, words=w, char_errors=by_id[uid][0], chars=by_id[uid][1])
        for uid, (we, w) in zip(ids, counts)
    }


def pair_records(
    a: Mapping[str, Record], b: Mapping[str, Record], *, names: tuple[str, str] = ("a", "b")
) -> tuple[list[str], list[Record], list[Record]]:
    """Align two systems' records on their utterance ids.

    Raises:
        ValueError: the utterance sets differ, or an utterance's reference length differs
            (different references are not the same test), naming both systems and examples.
    """
    only_a = sorted(set(a) - set(b))
    only_b = sorted(set(b) - set(a))
    if only_a or only_b:
        raise ValueError(
            f"{names[0]} and {names[1]} were not scored on the same utterances: {len(only_a)} only in "
            f"{names[0]} (e.g. {only_a[:3]}), {len(only_b)} only in {names[1]} (e.g. {only_b[:3]}); "
            "compare systems evaluated on the same dev/test subsets"
        )
    ids = sorted(a)
    for uid in ids:
        if (a[uid].words, a[uid].chars) != (b[uid].words, b[uid].chars):
            raise ValueError(
                f"utterance {uid}: {names[0]} has {a[uid].words} reference words, {names[1]} has {b[uid].words}; "
                "the references differ, so the systems were not scored on the same test"
            )
    return ids, [a[u] for u in ids], [b[u] for u in ids]


def compare(
    a: Mapping[str, Record], b: Mapping[str, Record], *, samples: int = 1000, seed: int = 0, level: float = 0.95,
    names: tuple[str, str] = ("a", "b"),
) -> dict[str, PairedDifference]:
    """WER and CER differences ``a - b`` on the utterances both were scored on (they must match)."""
    _, ra, rb = pair_records(a, b, names=names)
    return {
        "wer": paired_bootstrap([r.word_errors for r in ra], [r.word_errors for r in rb], [r.words for r in ra],
                                samples=samples, seed=seed, level=level),
        "cer": paired_bootstrap([r.char_errors for r in ra], [r.char_errors for r in rb], [r.chars for r in ra],
                                samples=samples, seed=seed, level=level),
    }


def error_rates(records: Mapping[str, Record]) -> dict[str, float]:
    """Corpus WER and CER of a set of records."""
    values = list(records.values())
    return {
        "wer": sum(r.word_errors for r in values) / max(1, sum(r.words for r in values)),
        "cer": sum(r.char_errors for r in values) / max(1, sum(r.chars for r in values)),
    }


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (nan for one value) and count of the finite values."""
    finite = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not finite:
        return (math.nan, math.nan, 0)
    mean = sum(finite) / len(finite)
    std = math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1)) if len(finite) > 1 else math.nan
    return (mean, std, len(finite))

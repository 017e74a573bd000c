"""Paired bootstrap significance and the per-utterance records it reads (constructed data)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from orchestrator.stats import (
    Record,
    bootstrap_wer_ci,
    compare,
    mean_std,
    pair_records,
    paired_bootstrap,
    read_records,
)


def _system(rng, n: int, error_rate: float) -> tuple[list[int], list[int]]:
    words = rng.integers(5, 15, size=n)
    errors = rng.binomial(words, error_rate)
    return errors.tolist(), words.tolist()


def test_identical_systems_are_not_significant() -> None:
    errors, words = _system(np.random.default_rng(0), 200, 0.3)
    result = paired_bootstrap(errors, errors, words, samples=500, seed=1)
    assert result.difference == 0.0 and result.low <= 0.0 <= result.high
    assert not result.significant and result.utterances == 200


def test_clearly_better_system_is_significant_with_the_right_sign() -> None:
    rng = np.random.default_rng(0)
    words = rng.integers(5, 15, size=300)
    worse = rng.binomial(words, 0.40)
    better = rng.binomial(words, 0.20)
    result = paired_bootstrap(worse.tolist(), better.tolist(), words.tolist(), samples=1000, seed=3)
    expected = (worse.sum() - better.sum()) / words.sum()
    assert result.difference == pytest.approx(expected)
    assert result.significant and 0.0 < result.low < result.difference < result.high
    flipped = paired_bootstrap(better.tolist(), worse.tolist(), words.tolist(), samples=1000, seed=3)
    assert flipped.significant and flipped.high < 0.0


def test_small_noisy_difference_is_within_noise() -> None:
    rng = np.random.default_rng(5)
    words = rng.integers(5, 15, size=40)
    a = rng.binomial(words, 0.30)
    b = a.copy()
    b[0] += 1  # one extra error in 40 utterances
    assert not paired_bootstrap(b.tolist(), a.tolist(), words.tolist(), samples=1000, seed=0).significant


def test_pairing_is_tighter_than_two_independent_intervals() -> None:
    """Shared utterance difficulty cancels: the paired interval is much narrower."""
    rng = np.random.default_rng(2)
    words = rng.integers(5, 15, size=200)
    hard = rng.uniform(0.05, 0.8, size=200)
    a = rng.binomial(words, hard)
    b = np.minimum(words, a + rng.binomial(1, 0.3, size=200))
    paired = paired_bootstrap(b.tolist(), a.tolist(), words.tolist(), samples=1000, seed=0)
    low_a, high_a = bootstrap_wer_ci(a.tolist(), words.tolist(), samples=1000, seed=0)
    assert paired.high - paired.low < 0.5 * (high_a - low_a)


def test_seeded_and_deterministic() -> None:
    errors, words = _system(np.random.default_rng(1), 100, 0.3)
    other, _ = _system(np.random.default_rng(9), 100, 0.3)
    first = paired_bootstrap(errors, other, words, samples=300, seed=7)
    assert paired_bootstrap(errors, other, words, samples=300, seed=7) == first
    assert paired_bootstrap(errors, other, words, samples=300, seed=8) != first


def test_bad_input_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="same 1-d shape"):
        paired_bootstrap([1, 2], [1], [3, 3])
    with pytest.raises(ValueError, match="needs utterances"):
        paired_bootstrap([], [], [])


def test_mismatched_utterance_sets_are_refused() -> None:
    a = {"u1": Record(1, 5, 2, 20), "u2": Record(0, 4, 0, 15)}
    b = {"u1": Record(0, 5, 0, 20), "u3": Record(0, 4, 0, 15)}
    with pytest.raises(ValueError, match="not scored on the same utterances.*1 only in best.*u2.*u3"):
        compare(a, b, names=("best", "other"))
    c = {"u1": Record(0, 5, 0, 20), "u2": Record(0, 6, 0, 15)}
    with pytest.raises(ValueError, match="references differ"):
        pair_records(a, c)


def _write_tsv(path, rows) -> None:
    lines = ["id\tword_errors\twords\treference\thypothesis"]
    lines += [f"{uid}\t{we}\t{w}\t{ref}\t{hyp}" for uid, we, w, ref, hyp in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_records_from_evaluation_tsv_give_wer_and_cer(tmp_path) -> None:
    _write_tsv(tmp_path / "best.tsv", [("a", 0, 2, "THE CAT", "THE CAT"), ("b", 1, 2, "A DOG", "A DOT")])
    _write_tsv(tmp_path / "other.tsv", [("b", 2, 2, "A DOG", ""), ("a", 1, 2, "THE CAT", "THE BAT")])
    best = read_records(tmp_path / "best.tsv", key_prefix="dev/")
    other = read_records(tmp_path / "other.tsv", key_prefix="dev/")
    assert best["dev/b"] == Record(word_errors=1, words=2, char_errors=1, chars=5)
    assert other["dev/b"].char_errors == 5 and other["dev/a"].char_errors == 1
    diff = compare(other, best, samples=200, seed=0)
    assert diff["wer"].difference == pytest.approx((3 - 1) / 4)
    assert diff["cer"].difference == pytest.approx((6 - 1) / 12)
    (tmp_path / "bad.tsv").write_text("id\twer\n", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.tsv: expected the header"):
        read_records(tmp_path / "bad.tsv")


def test_mean_std() -> None:
    assert mean_std([0.2, 0.4, math.nan]) == (pytest.approx(0.3), pytest.approx(math.sqrt(0.02)), 2)
    mean, std, n = mean_std([0.5])
    assert mean == 0.5 and math.isnan(std) and n == 1

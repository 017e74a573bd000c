"""Word n-gram language model: interpolated Witten-Bell estimates written as an ARPA file.

The decoder's LM for the generated corpus (and any other run without a user-supplied LM) is
built from the TRAINING transcripts only, never from dev or test text.

Estimates (Witten and Bell, 1991; the interpolated form of Chen and Goodman, 1998, eq. 16).
Every sentence is padded as ``<s> w1 .. wk </s>``. For a history ``h`` of n-1 words, with
``c(h w)`` the count of the n-gram, ``c(h) = sum_w c(h w)`` and ``N(h) = |{w: c(h w) > 0}|``::

    P(w | h) = (c(h w) + N(h) P(w | h')) / (c(h) + N(h))        (h' = h without its first word)

and at the bottom ``P(w) = (c(w) + N / |V|) / (c + N)`` with ``V`` the predicted words
(training words, ``</s>`` and ``<unk>``), so ``<unk>`` keeps a small probability.

ARPA form. The file lists ``log10 P(w | h)`` for every n-gram seen in training and, for each
history, a back-off weight. A back-off model gives an unseen ``w`` after ``h`` the
probability ``bo(h) P(w | h')``. With ``bo(h) = N(h) / (c(h) + N(h))`` that is exactly the
interpolated estimate above (the seen counts are zero), and the probabilities after every
history sum to one: ``sum_w P(w | h) = (c(h) + N(h) sum_w P(w | h')) / (c(h) + N(h)) = 1``
by induction down to the uniform bottom. A history never followed by a word backs off
completely (``bo = 1``). :class:`ArpaModel` reads a file back and evaluates the back-off
formula, which the tests use to check the sums numerically and against KenLM.

Usage::

    stats = build_arpa(train_texts, "lm.arpa", order=3, held_out=test_texts)
"""

from __future__ import annotations

import gzip
import math
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable, Sequence

from orchestrator.fileio import atomic_write_bytes

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
LOG10_ZERO = -99.0  # ARPA's log10 probability of <s> (never predicted)


def _words(text: str) -> list[str]:
    return text.upper().split()


def count_ngrams(texts: Iterable[str], order: int) -> list[Counter]:
    """``counts[n-1][(w1, .., wn)]`` for n = 1..order over the padded sentences.

    No n-gram ends in ``<s>``, so ``<s>`` is a history, never a predicted word.
    """
    if order < 1:
        raise ValueError(f"n-gram order must be >= 1, got {order}")
    counts = [Counter() for _ in range(order)]
    for text in texts:
        words = _words(text)
        if not words:
            continue
        padded = [BOS, *words, EOS]
        for end in range(1, len(padded)):
            for n in range(1, min(order, end + 1) + 1):
                counts[n - 1][tuple(padded[end - n + 1:end + 1])] += 1
    return counts


def estimate(counts: Sequence[Counter]) -> tuple[list[dict[tuple, float]], list[dict[tuple, float]]]:
    """Interpolated Witten-Bell probabilities and back-off weights (natural values, not logs).

    Returns:
        ``(probs, backoffs)``: ``probs[n-1][ngram] = P(w | h)`` for every counted n-gram and
        ``<unk>``; ``backoffs[n-1][ngram] = bo(ngram)`` for every n-gram of order < max that
        is a history (others back off with weight 1).
    """
    order = len(counts)
    # history statistics: c(h) and N(h) for every history of length n-1 (length 0 = unigrams)
    total = [defaultdict(int) for _ in range(order)]
    types = [defaultdict(int) for _ in range(order)]
    for n, table in enumerate(counts):
        for gram, c in table.items():
            total[n][gram[:-1]] += c
            types[n][gram[:-1]] += 1
    vocab = sorted({g[0] for g in counts[0]} | {UNK})
    c0, n0 = total[0][()], types[0][()]
    probs: list[dict[tuple, float]] = [{} for _ in range(order)]
    probs[0] = {(w,): (counts[0].get((w,), 0) + n0 / len(vocab)) / (c0 + n0) for w in vocab}
    for n in range(1, order):
        for gram, c in counts[n].items():
            h = gram[:-1]
            lower = probs[n - 1][gram[1:]]  # the suffix was counted too (same sentence position)
            probs[n][gram] = (c + types[n][h] * lower) / (total[n][h] + types[n][h])
    backoffs: list[dict[tuple, float]] = [{} for _ in range(order)]
    for n in range(1, order):
        for h, t in types[n].items():
            backoffs[n - 1][h] = t / (total[n][h] + t)
    return probs, backoffs


def write_arpa(probs: Sequence[dict], backoffs: Sequence[dict], path: str | os.PathLike) -> None:
    """Write an ARPA file (atomically). ``<s>`` is listed with log10 probability -99."""
    order = len(probs)
    entries = [dict(table) for table in probs]
    entries[0][(BOS,)] = 0.0  # placeholder: written as LOG10_ZERO
    lines = ["\\data\\"] + [f"ngram {n + 1}={len(entries[n])}" for n in range(order)] + [""]
    for n in range(order):
        lines.append(f"\\{n + 1}-grams:")
        for gram in sorted(entries[n]):
            p = entries[n][gram]
            logp = LOG10_ZERO if gram == (BOS,) else math.log10(p)
            line = f"{logp:.7f}\t{' '.join(gram)}"
            if n < order - 1:
                line += f"\t{math.log10(backoffs[n].get(gram, 1.0)):.7f}"
            lines.append(line)
        lines.append("")
    lines.append("\\end\\")
    atomic_write_bytes(Path(path), ("\n".join(lines) + "\n").encode())


def build_arpa(
    texts: Iterable[str], path: str | os.PathLike, *, order: int = 3, held_out: Iterable[str] = ()
) -> dict:
    """Estimate an interpolated Witten-Bell word n-gram LM on ``texts`` and write it as ARPA.

    Args:
        texts: the LM's training sentences (transcripts of the training subsets).
        path: the ARPA file to write.
        order: n of the n-gram.
        held_out: dev/test sentences, only to report how many occur verbatim in ``texts`` and
            how many of their words the LM has never seen; they never enter the estimates.

    Returns:
        ``{"order", "sentences", "vocabulary", "ngrams": [per order], "held_out_sentences",
        "held_out_in_train", "held_out_oov_rate"}``.
    """
    texts = [" ".join(_words(t)) for t in texts]
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError(f"{path}: no training text to estimate an n-gram LM from")
    counts = count_ngrams(texts, order)
    probs, backoffs = estimate(counts)
    write_arpa(probs, backoffs, path)
    held = [" ".join(_words(t)) for t in held_out]
    held = [t for t in held if t]
    train_set = set(texts)
    vocab = {g[0] for g in counts[0]}
    held_words = [w for t in held for w in t.split()]
    return {
        "order": order,
        "sentences": len(texts),
        "vocabulary": len(vocab - {EOS}),
        "ngrams": [len(p) + (n == 0) for n, p in enumerate(probs)],
        "held_out_sentences": len(held),
        "held_out_in_train": sum(t in train_set for t in held),
        "held_out_oov_rate": sum(w not in vocab for w in held_words) / max(1, len(held_words)),
    }


def arpa_vocabulary(path: str | os.PathLike) -> list[str]:
    """The words of an ARPA file (``.arpa`` or ``.arpa.gz``): its unigrams but ``<s>``, ``</s>``
    and ``<unk>``, read without loading the higher orders."""
    opener = gzip.open if str(path).endswith(".gz") else open
    words, section = [], False
    with opener(path, "rt", encoding="utf-8", errors="replace") as handle:
        for line in handle:
            line = line.strip()
            if line == "\\1-grams:":
                section = True
            elif section and line.startswith("\\"):
                break
            elif section and line:
                fields = line.split()
                if len(fields) >= 2 and fields[1] not in (BOS, EOS, UNK):
                    words.append(fields[1])
    if not section:
        raise ValueError(f"{path}: no \\1-grams: section (not an ARPA file; a binary KenLM model has no readable word list)")
    return words


class ArpaModel:
    """An ARPA back-off model read back from its file, for checks and perplexity.

    ``logprob(history, word)`` is log10 ``P(word | history)`` by the back-off rule: the longest
    listed n-gram ``h w`` gives its probability, else ``bo(h) P(w | h')``.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.probs: dict[tuple, float] = {}
        self.backoffs: dict[tuple, float] = {}
        self.order = 0
        section = 0
        for raw in Path(path).read_text().splitlines():
            line = raw.strip()
            if not line or line.startswith("ngram ") or line in ("\\data\\", "\\end\\"):
                continue
            if line.startswith("\\") and line.endswith("-grams:"):
                section = int(line[1:line.index("-")])
                self.order = max(self.order, section)
                continue
            fields = line.split("\t") if "\t" in line else line.split()
            if "\t" in line:
                gram = tuple(fields[1].split())
                rest = fields[2:]
            else:
                gram, rest = tuple(fields[1:1 + section]), fields[1 + section:]
            self.probs[gram] = float(fields[0])
            if rest:
                self.backoffs[gram] = float(rest[0])
        self.vocab = sorted(g[0] for g in self.probs if len(g) == 1 and g[0] != BOS)

    def logprob(self, history: Sequence[str], word: str) -> float:
        """log10 P(word | history); ``history`` may be longer than the model's order."""
        if (word,) not in self.probs:
            word = UNK
        h = tuple(history)[-(self.order - 1):] if self.order > 1 else ()
        penalty = 0.0
        while True:
            gram = h + (word,)
            if gram in self.probs:
                return penalty + self.probs[gram]
            penalty += self.backoffs.get(h, 0.0)
            h = h[1:]

    def sentence_logprob(self, text: str) -> tuple[float, int]:
        """log10 probability of ``<s> text </s>`` and the number of predicted tokens."""
        words = [*_words(text), EOS]
        history, total = [BOS], 0.0
        for w in words:
            total += self.logprob(history, w)
            history.append(w)
        return total, len(words)

    def perplexity(self, texts: Iterable[str]) -> float:
        """Per-token perplexity (``</s>`` counted, unknown words scored as ``<unk>``)."""
        logp, tokens = 0.0, 0
        for text in texts:
            lp, n = self.sentence_logprob(text)
            logp, tokens = logp + lp, tokens + n
        return 10 ** (-logp / max(1, tokens))

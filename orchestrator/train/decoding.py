"""CTC beam search decoding and scoring (WER, CER, bootstrap confidence interval).

Dimensions: b batch, t encoder frames, v vocabulary (blank = 0).

Scoring keeps per-utterance error and reference-length counts, so corpus WER is always
``sum(errors) / sum(reference words)`` (never a mean of per-utterance WERs), sums across DDP
ranks exactly, and can be bootstrapped by resampling utterances.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import jiwer
import torch

from orchestrator.data.tokenizers import BLANK
from orchestrator.stats import bootstrap_wer_ci  # noqa: F401 - moved there; kept importable from here
from orchestrator.train.checkpoint import atomic_write_bytes

def normalize_text(text: str) -> str:
    """Upper case, single spaces, trimmed: how hypotheses and references are compared."""
    return " ".join(text.upper().split())


# ---------------------------------------------------------------------------------------------
# Beam search


# KenLM's lines when it reads an ARPA file (stderr, from C++): a hint and a progress bar.
_KENLM_NOISE = ("Loading the LM will be faster if you build a binary file.", "Reading ",
                "----5---10---15---20", "****")


@contextlib.contextmanager
def _kenlm_progress_hidden():
    """Run the block with file descriptor 2 sent to a temporary file, then write back every line
    of it but KenLM's ARPA-reading chatter (which every trial would otherwise print)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().decode(errors="replace").splitlines(keepends=True)
                    if not line.startswith(_KENLM_NOISE)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


class BeamSearchDecoder:
    """Lexicon-free (or lexicon) CTC beam search with torchaudio's flashlight decoder.

    The token list is the tokenizer's vocabulary in id order. For the character tokenizer the
    space becomes the decoder's word separator ``|``; sentencepiece pieces carry their own word
    boundaries (``▁``), and ``<unk>`` stands in as the separator the decoder requires.

    Without a lexicon an n-gram LM scores token sequences, so it must be trained on text written
    as tokens (``T H E | C A T``); with a lexicon (``word<TAB>t o k e n s |`` per line) the LM is a
    word LM, as in the paper's 4-gram setting.

    Scores are natural-log emission probabilities plus ``lm_weight`` times KenLM's score, which
    is a log10 probability; ``lm_score_base="ln"`` scales the weight by ln 10 so that it
    multiplies natural-log LM probabilities, as the alpha of SpeechBrain's and pyctcdecode's
    decoders does (the paper's alpha 0.8 is such a weight).

    Args:
        tokenizer: a ``CharTokenizer`` or ``BPETokenizer``.
        beam_size: hypotheses kept per frame.
        beam_threshold: prune hypotheses this far below the best (the positive counterpart of
            SpeechBrain's ``beam_prune_logp``).
        beam_size_token: tokens tried per frame, the most likely first; ``None`` = all.
        token_prune_min_logp: tokens whose frame log-probability is below this are not tried
            (the frame's best token always is), as SpeechBrain's ``token_prune_min_logp``;
            ``None`` = no pruning.
        lm_path: KenLM file (ARPA or binary), or ``None``.
        lexicon_path: lexicon file, or ``None`` for lexicon-free decoding.
        lm_weight: LM score weight.
        lm_score_base: ``log10`` (flashlight's weight) or ``ln`` (SpeechBrain's alpha).
        word_score: score added per word boundary.
    """

    def __init__(
        self,
        tokenizer,
        *,
        beam_size: int = 50,
        beam_threshold: float = 50.0,
        beam_size_token: int | None = None,
        token_prune_min_logp: float | None = None,
        lm_path: str | None = None,
        lexicon_path: str | None = None,
        lm_weight: float = 2.0,
        lm_score_base: str = "log10",
        word_score: float = 0.0,
    ) -> None:
        from torchaudio.models.decoder import ctc_decoder

        if lm_score_base not in ("log10", "ln"):
            raise ValueError(f"lm_score_base must be 'log10' or 'ln', got {lm_score_base!r}")
        self.tokenizer = tokenizer
        self.token_prune_min_logp = token_prune_min_logp
        if tokenizer.kind == "char":
            tokens = ["|" if s == " " else s for s in tokenizer.symbols]
            sil = "|"
            self._space_id = tokenizer.symbols.index(" ")
        else:
            tokens = tokenizer.pieces()
            sil = tokens[getattr(tokenizer, "unk", 1)]
            self._space_id = None
        self.tokens = tokens
        self.lexicon = lexicon_path is not None
        lm_dict = None
        if lm_path is not None and lexicon_path is None:
            # Lexicon-free, the decoder queries the LM with *token* indices. torchaudio builds the
            # LM's word dictionary from an unordered map when no lm_dict is given, so indices
            # need not match the token order (the LM then scores the wrong tokens); an explicit
            # dictionary in token order fixes the mapping.
            handle = tempfile.NamedTemporaryFile("w", suffix=".dict", delete=False)
            with handle:
                handle.write("\n".join(tokens + ([] if "<unk>" in tokens else ["<unk>"])) + "\n")
            lm_dict = handle.name
        try:
            with _kenlm_progress_hidden():
                self._decoder = ctc_decoder(
                    lexicon=lexicon_path,
                    tokens=tokens,
                    lm=lm_path,
                    lm_dict=lm_dict,
                    nbest=1,
                    beam_size=beam_size,
                    beam_size_token=beam_size_token,
                    beam_threshold=beam_threshold,
                    lm_weight=(lm_weight * (math.log(10.0) if lm_score_base == "ln" else 1.0)) if lm_path else 0.0,
                    word_score=word_score,
                    blank_token=tokens[BLANK],
                    sil_token=sil,
                )
        finally:
            if lm_dict is not None:
                os.unlink(lm_dict)

    def __call__(self, log_probs: torch.Tensor, lengths: torch.Tensor) -> list[str]:
        """Decode a batch.

        Args:
            log_probs: (b, t, v) log-probabilities.
            lengths: (b,) valid frames.

        Returns:
            One normalised transcript per utterance.
        """
        emissions = log_probs.detach().float().cpu()
        if self.token_prune_min_logp is not None:
            emissions = prune_tokens(emissions, self.token_prune_min_logp)
        emissions = emissions.contiguous()  # the decoder reads fp32 CPU memory
        results = self._decoder(emissions, lengths.detach().cpu().to(torch.int32))
        texts = []
        for nbest in results:
            if not nbest:
                texts.append("")
                continue
            hyp = nbest[0]
            if self.lexicon:
                texts.append(normalize_text(" ".join(hyp.words)))
            else:
                texts.append(normalize_text(self.tokenizer.decode(hyp.tokens.tolist())))
        return texts


def prune_tokens(log_probs: torch.Tensor, min_logp: float) -> torch.Tensor:
    """(b, t, v) log-probabilities with every token below ``min_logp`` in its frame, except the
    frame's best, set to -1e30, which any beam threshold prunes."""
    keep = (log_probs >= min_logp) | (log_probs == log_probs.amax(dim=-1, keepdim=True))
    return log_probs.masked_fill(~keep, -1e30)


def write_lexicon(texts: Sequence[str], tokenizer, path: str | os.PathLike) -> int:
    """Write a lexicon of every word in ``texts`` for :class:`BeamSearchDecoder`.

    One line per word: ``WORD<TAB>spelling``; characters are spelled letter by letter and end
    with the word separator ``|``, sentencepiece words are spelled with their pieces.

    Returns:
        The number of words.
    """
    words = sorted({w for text in texts for w in normalize_text(text).split()})
    lines = []
    for word in words:
        if tokenizer.kind == "char":
            spelling = " ".join("|" if s == " " else s for s in word) + " |"
        else:
            spelling = " ".join(tokenizer.pieces()[i] for i in tokenizer.encode(word))
        lines.append(f"{word}\t{spelling}")
    atomic_write_bytes(Path(path), ("\n".join(lines) + "\n").encode())
    return len(words)


# ---------------------------------------------------------------------------------------------
# Scoring


@dataclass
class Scores:
    """Per-utterance error counts of one evaluation set.

    Attributes:
        ids: utterance ids.
        word_errors: substitutions + deletions + insertions per utterance.
        words: reference words per utterance.
        char_errors: character edit operations per utterance (spaces count as characters).
        chars: reference characters per utterance.
        references: normalised references.
        hypotheses: normalised hypotheses.
    """

    ids: list[str]
    word_errors: list[int]
    words: list[int]
    char_errors: list[int]
    chars: list[int]
    references: list[str]
    hypotheses: list[str]

    @property
    def wer(self) -> float:
        return sum(self.word_errors) / max(1, sum(self.words))

    @property
    def cer(self) -> float:
        return sum(self.char_errors) / max(1, sum(self.chars))

    def extend(self, other: "Scores") -> None:
        self.ids += other.ids
        self.word_errors += other.word_errors
        self.words += other.words
        self.char_errors += other.char_errors
        self.chars += other.chars
        self.references += other.references
        self.hypotheses += other.hypotheses

    @classmethod
    def empty(cls) -> "Scores":
        return cls([], [], [], [], [], [], [])


def _errors_per_utterance(alignments) -> list[int]:
    out = []
    for chunks in alignments:
        n = 0
        for c in chunks:
            if c.type in ("substitute", "delete"):
                n += c.ref_end_idx - c.ref_start_idx
            elif c.type == "insert":
                n += c.hyp_end_idx - c.hyp_start_idx
        out.append(n)
    return out


def score(ids: Sequence[str], references: Sequence[str], hypotheses: Sequence[str]) -> Scores:
    """Word and character errors per utterance (jiwer alignments), after :func:`normalize_text`."""
    if not (len(ids) == len(references) == len(hypotheses)):
        raise ValueError(f"score: {len(ids)} ids, {len(references)} references, {len(hypotheses)} hypotheses")
    if not ids:
        return Scores.empty()
    refs = [normalize_text(r) for r in references]
    hyps = [normalize_text(h) for h in hypotheses]
    words = jiwer.process_words(refs, hyps)
    chars = jiwer.process_characters(refs, hyps)
    return Scores(
        ids=list(ids),
        word_errors=_errors_per_utterance(words.alignments),
        words=[len(r.split()) for r in refs],
        char_errors=_errors_per_utterance(chars.alignments),
        chars=[len(r) for r in refs],
        references=refs,
        hypotheses=hyps,
    )

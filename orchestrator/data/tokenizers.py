"""Text <-> CTC target ids: the paper's 29 characters, or a sentencepiece BPE/unigram model.

Both tokenizers share one contract (:class:`Tokenizer`): ``vocab_size`` (the CTC head's output
size, blank included), ``blank`` (always 0), ``encode(text, utt_id=None) -> list[int]`` (never
produces the blank) and ``decode(ids) -> str`` (drops blanks; it does not collapse CTC repeats,
that is the decoder's job). ``save(dir)`` writes a tokenizer folder and :func:`load_tokenizer`
reloads either kind from it:

    <dir>/tokenizer.json    {"kind": "char" | "bpe", "format_version": 1, ...}
    <dir>/tokenizer.model   the sentencepiece model (BPE only)

Every file is written to a temporary name in the same folder and renamed into place, the JSON
last; the JSON records the SHA-256 of the model file, so a folder left half-written by a crash
is reported, never silently loaded with the wrong model.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Iterable, Literal, Protocol, Sequence, runtime_checkable

import torch

from orchestrator.fileio import atomic_write_bytes

__all__ = [
    "BLANK",
    "CHAR_SYMBOLS",
    "BPETokenizer",
    "CharTokenizer",
    "Tokenizer",
    "TOKENIZERS",
    "load_tokenizer",
]

BLANK = 0
"""The CTC blank id, the same for every tokenizer."""

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_MODEL = "tokenizer.model"
FORMAT_VERSION = 1

# Id order of the character vocabulary: blank, word separator, apostrophe, then A..Z. The 28
# non-blank symbols are exactly the characters of the LibriSpeech transcripts.
CHAR_SYMBOLS: tuple[str, ...] = ("<blank>", " ", "'") + tuple(chr(c) for c in range(ord("A"), ord("Z") + 1))

# What CharTokenizer.normalize maps without changing what was said: ASCII lower case to upper
# case and typographic apostrophes to "'". Whitespace runs of any kind become one space.
_SAFE_MAP = {ord(c): c.upper() for c in "abcdefghijklmnopqrstuvwxyz"}
_SAFE_MAP.update({ord(c): "'" for c in "\u2018\u2019\u02bc\u2032`\u00b4"})

UnknownPolicy = Literal["error", "drop"]
_UNKNOWN_POLICIES = ("error", "drop")


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline and the CTC loops need from a tokenizer."""

    kind: str
    vocab_size: int
    blank: int

    def encode(self, text: str, *, utt_id: str | None = None) -> list[int]: ...

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str: ...

    def save(self, directory: str | os.PathLike) -> Path: ...


def _as_id_list(ids: Sequence[int] | torch.Tensor) -> list[int]:
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1:
            raise ValueError(f"decode expects a 1-D sequence of ids, got a tensor of shape {tuple(ids.shape)}")
        return [int(i) for i in ids.tolist()]
    return [int(i) for i in ids]


def _describe_chars(counts: Counter[str]) -> str:
    parts = []
    for ch, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        name = unicodedata.name(ch, f"U+{ord(ch):04X}")
        parts.append(f"{ch!r} ({name}) x{n}")
    return ", ".join(parts)


class CharTokenizer:
    """The paper's character vocabulary: 29 symbols, blank 0.

    Ids: 0 ``<blank>``, 1 space, 2 apostrophe ``'``, 3..28 ``A``..``Z``.

    ``encode`` first normalises the text (:meth:`normalize`): ASCII lower case becomes upper
    case, typographic apostrophes (``’ ‘ ʼ ′ ` ´``) become ``'``, and any run of whitespace
    becomes one space, trimmed at both ends. Nothing else is guessed (digits, punctuation and
    accented letters have no spelling that is safe to invent); such characters raise a
    ``ValueError`` naming the utterance and the characters, or are dropped when the tokenizer is
    built with ``unknown="drop"``.

    Args:
        unknown: ``"error"`` (default) or ``"drop"``: what to do with characters outside the
            vocabulary after normalisation.
    """

    kind = "char"
    symbols: tuple[str, ...] = CHAR_SYMBOLS
    vocab_size: int = len(CHAR_SYMBOLS)
    blank: int = BLANK

    def __init__(self, *, unknown: UnknownPolicy = "error") -> None:
        if unknown not in _UNKNOWN_POLICIES:
            raise ValueError(f"CharTokenizer: unknown={unknown!r} is not one of {list(_UNKNOWN_POLICIES)}")
        self.unknown: UnknownPolicy = unknown
        self._to_id = {s: i for i, s in enumerate(self.symbols) if i != BLANK}

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size}, unknown={self.unknown!r})"

    def normalize(self, text: str, *, utt_id: str | None = None) -> str:
        """Returns ``text`` mapped onto the vocabulary (see the class docstring).

        Raises:
            ValueError: characters outside the vocabulary remain and ``unknown="error"``.
        """
        text = " ".join(text.translate(_SAFE_MAP).split())
        bad = Counter(ch for ch in text if ch not in self._to_id)
        if not bad:
            return text
        if self.unknown == "drop":
            return " ".join("".join(ch for ch in text if ch in self._to_id).split())
        where = f"utterance {utt_id!r}" if utt_id is not None else "text"
        raise ValueError(
            f"{where}: characters outside the 29-symbol character vocabulary (space, apostrophe, A-Z): "
            f"{_describe_chars(bad)} in {text[:80]!r}{'...' if len(text) > 80 else ''}. "
            "Fix: normalise the transcripts (spell out digits, remove punctuation), "
            "or build CharTokenizer(unknown='drop') to drop these characters."
        )

    def encode(self, text: str, *, utt_id: str | None = None) -> list[int]:
        """Returns the ids of the normalised ``text`` (never the blank).

        Args:
            text: a transcript.
            utt_id: named in the error message when ``text`` cannot be encoded.
        """
        return [self._to_id[ch] for ch in self.normalize(text, utt_id=utt_id)]

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Returns the text of ``ids``, blanks dropped (repeats are kept: no CTC collapse)."""
        out = []
        for i in _as_id_list(ids):
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"CharTokenizer.decode: id {i} is outside 0..{self.vocab_size - 1}")
            if i != BLANK:
                out.append(self.symbols[i])
        return "".join(out)

    def save(self, directory: str | os.PathLike) -> Path:
        """Writes ``<directory>/tokenizer.json`` atomically; returns the folder."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"kind": self.kind, "format_version": FORMAT_VERSION, "unknown": self.unknown, "symbols": list(self.symbols)}
        atomic_write_bytes(directory / TOKENIZER_JSON, (json.dumps(meta, indent=2) + "\n").encode())
        return directory

    @classmethod
    def _from_meta(cls, meta: dict, directory: Path) -> CharTokenizer:
        if list(meta.get("symbols", [])) != list(cls.symbols):
            raise ValueError(
                f"{directory / TOKENIZER_JSON}: the saved character symbols differ from this version's "
                f"{list(cls.symbols)}; the checkpoint was trained with another vocabulary"
            )
        return cls(unknown=meta.get("unknown", "error"))


class BPETokenizer:
    """A sentencepiece model (BPE by default, or unigram) trained on the training transcripts.

    The blank is reserved inside the sentencepiece model itself: it is trained with
    ``pad_id=0`` (piece ``<blank>``), ``unk_id=1`` and no BOS/EOS, so sentencepiece ids *are*
    the CTC ids, ``encode`` can never produce 0 (sentencepiece never emits the pad piece), and
    the ``.model`` file means the same thing to any other tool that reads it (e.g. a lexicon
    decoder). ``vocab_size`` counts every id, ``<blank>`` and ``<unk>`` included; it is the CTC
    head's output size. Characters never seen in training encode to ``<unk>`` (id 1).

    Text is given to sentencepiece as is (its default ``nmt_nfkc`` normalisation, which also
    collapses extra whitespace); no case folding, so train and encode on the same casing.

    Build one with :meth:`train`, or reload a saved one with :func:`load_tokenizer`.
    """

    kind = "bpe"
    blank: int = BLANK
    unk: int = 1

    def __init__(self, model_proto: bytes, *, model_type: str = "bpe") -> None:
        import sentencepiece as spm

        self.model_type = model_type
        self._proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        if self._sp.pad_id() != BLANK or self._sp.id_to_piece(BLANK) != "<blank>":
            raise ValueError(
                "BPETokenizer: the sentencepiece model does not reserve id 0 as '<blank>' "
                "(train it with BPETokenizer.train, which sets pad_id=0, pad_piece='<blank>')"
            )
        self.vocab_size: int = int(self._sp.get_piece_size())

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, model_type={self.model_type!r})"

    # The processor is a C++ object: pickle the model bytes instead (DataLoader workers, Ray).
    def __getstate__(self) -> dict:
        return {"model_proto": self._proto, "model_type": self.model_type}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model_proto"], model_type=state["model_type"])

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        out_dir: str | os.PathLike | None,
        vocab_size: int,
        *,
        model_type: Literal["bpe", "unigram"] = "bpe",
        character_coverage: float = 1.0,
    ) -> BPETokenizer:
        """Trains a sentencepiece model on ``texts`` and saves it to ``out_dir`` (when given).

        Args:
            texts: the training transcripts, one utterance each.
            out_dir: folder to save the tokenizer to (see the module docstring); ``None`` keeps it
                in memory only.
            vocab_size: total number of ids, ``<blank>`` (0) and ``<unk>`` (1) included.
            model_type: ``"bpe"`` or ``"unigram"``.
            character_coverage: fraction of characters the model must cover; 1.0 keeps every
                character of the (small, clean) speech transcripts.

        Returns:
            The trained tokenizer.

        Raises:
            ValueError: bad arguments, no text, or a ``vocab_size`` the text cannot fill.
        """
        import sentencepiece as spm

        if model_type not in ("bpe", "unigram"):
            raise ValueError(f"BPETokenizer.train: model_type={model_type!r} is not one of ['bpe', 'unigram']")
        if vocab_size < 3:
            raise ValueError(f"BPETokenizer.train: vocab_size={vocab_size} must be >= 3 (blank, unk, one piece)")
        lines = [t.strip() for t in texts]
        lines = [t for t in lines if t]
        if not lines:
            raise ValueError("BPETokenizer.train: no non-empty training text")
        writer = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(lines),
                model_writer=writer,
                vocab_size=vocab_size,
                model_type=model_type,
                character_coverage=character_coverage,
                pad_id=BLANK,
                pad_piece="<blank>",
                unk_id=cls.unk,
                bos_id=-1,
                eos_id=-1,
                num_threads=1,  # deterministic and polite on shared CPUs; the text is small
                minloglevel=2,
            )
        except RuntimeError as exc:
            raise ValueError(
                f"BPETokenizer.train: sentencepiece could not build a {model_type} vocabulary of {vocab_size} "
                f"from {len(lines)} transcripts ({exc}). Fix: lower vocab_size or train on more text."
            ) from exc
        tok = cls(writer.getvalue(), model_type=model_type)
        if out_dir is not None:
            tok.save(out_dir)
        return tok

    def encode(self, text: str, *, utt_id: str | None = None) -> list[int]:
        """Returns the piece ids of ``text`` (never the blank; unseen characters give ``<unk>``)."""
        return list(self._sp.encode(text))

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Returns the text of ``ids``, blanks dropped (repeats are kept: no CTC collapse)."""
        id_list = _as_id_list(ids)
        for i in id_list:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"BPETokenizer.decode: id {i} is outside 0..{self.vocab_size - 1}")
        return self._sp.decode([i for i in id_list if i != BLANK])

    def pieces(self) -> list[str]:
        """Returns every piece, in id order."""
        return [self._sp.id_to_piece(i) for i in range(self.vocab_size)]

    def save(self, directory: str | os.PathLike) -> Path:
        """Writes ``tokenizer.model`` then ``tokenizer.json`` atomically; returns the folder."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(directory / TOKENIZER_MODEL, self._proto)
        meta = {
            "kind": self.kind,
            "format_version": FORMAT_VERSION,
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "model_file": TOKENIZER_MODEL,
            "model_sha256": hashlib.sha256(self._proto).hexdigest(),
        }
        atomic_write_bytes(directory / TOKENIZER_JSON, (json.dumps(meta, indent=2) + "\n").encode())
        return directory

    @classmethod
    def _from_meta(cls, meta: dict, directory: Path) -> BPETokenizer:
        model_path = directory / meta.get("model_file", TOKENIZER_MODEL)
        try:
            proto = model_path.read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{directory / TOKENIZER_JSON} names a sentencepiece model {model_path} that does not exist; "
                "save the tokenizer again with tokenizer.save(dir)"
            ) from None
        digest = hashlib.sha256(proto).hexdigest()
        if meta.get("model_sha256") not in (None, digest):
            raise ValueError(
                f"{model_path} does not match {directory / TOKENIZER_JSON} (SHA-256 {digest[:12]}..., "
                f"expected {meta['model_sha256'][:12]}...): the folder was partly overwritten; save the tokenizer again"
            )
        tok = cls(proto, model_type=meta.get("model_type", "bpe"))
        if "vocab_size" in meta and meta["vocab_size"] != tok.vocab_size:
            raise ValueError(f"{model_path}: vocab_size {tok.vocab_size} differs from the JSON's {meta['vocab_size']}")
        return tok


TOKENIZERS: dict[str, type] = {"char": CharTokenizer, "bpe": BPETokenizer}


def load_tokenizer(directory: str | os.PathLike) -> CharTokenizer | BPETokenizer:
    """Reloads the tokenizer saved in ``directory`` (either kind).

    Raises:
        FileNotFoundError: no ``tokenizer.json`` in ``directory``.
        ValueError: an unreadable or inconsistent tokenizer folder.
    """
    directory = Path(directory)
    meta_path = directory / TOKENIZER_JSON
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no tokenizer at {directory}: {TOKENIZER_JSON} is missing "
            "(write one with tokenizer.save(dir) or BPETokenizer.train(texts, dir, vocab_size))"
        ) from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{meta_path}: not valid JSON ({exc}); save the tokenizer again") from None
    kind = meta.get("kind") if isinstance(meta, dict) else None
    if kind not in TOKENIZERS:
        raise ValueError(f"{meta_path}: unknown tokenizer kind {kind!r}; valid kinds: {sorted(TOKENIZERS)}")
    if meta.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise ValueError(
            f"{meta_path}: format_version {meta['format_version']} is newer than this code's {FORMAT_VERSION}; "
            "update the project"
        )
    return TOKENIZERS[kind]._from_meta(meta, directory)

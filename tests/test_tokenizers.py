"""CharTokenizer and BPETokenizer: vocabularies, round trips, errors, save/load."""

from __future__ import annotations

import json
import pickle
import random
import string

import pytest
import torch

from orchestrator.data.tokenizers import (
    CHAR_SYMBOLS,
    BPETokenizer,
    CharTokenizer,
    Tokenizer,
    load_tokenizer,
)

WORDS = (
    "THE SPEECH ENCODER MIXES TOKENS WITH A POLYNOMIAL OF ORDER TWO WHILE ATTENTION LOOKS AT EVERY "
    "FRAME IT'S LINEAR IN TIME AND MEMORY HE SAID THAT SHE WOULDN'T COME BACK BEFORE THE NIGHT FELL"
).split()


def sentences(n: int = 200, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> tuple[BPETokenizer, object]:
    out = tmp_path_factory.mktemp("bpe")
    return BPETokenizer.train(sentences(), out, vocab_size=80), out


# ---------------------------------------------------------------------- characters


def test_char_vocabulary_is_the_papers_29_symbols():
    tok = CharTokenizer()
    assert isinstance(tok, Tokenizer)
    assert tok.vocab_size == 29 == len(CHAR_SYMBOLS) and tok.blank == 0
    assert tok.symbols[0] == "<blank>"
    assert tok.encode(" 'AZ") == [2, 3, 28]  # leading space trimmed by normalisation
    assert tok.encode("A Z") == [3, 1, 28]
    assert "".join(tok.symbols[1:]) == " '" + string.ascii_uppercase


def test_char_round_trip_and_decode_drops_blanks():
    tok = CharTokenizer()
    for text in sentences(20):
        ids = tok.encode(text)
        assert 0 not in ids and tok.decode(ids) == text
        assert tok.decode(torch.tensor([0] + ids + [0])) == text
    assert tok.decode([0, 3, 3, 0, 3]) == "AAA"  # no CTC collapse in decode
    with pytest.raises(ValueError, match="outside 0..28"):
        tok.decode([29])


def test_char_normalisation_maps_only_what_is_safe():
    tok = CharTokenizer()
    assert tok.normalize("  it\u2019s\tA  dog\n") == "IT'S A DOG"
    assert tok.decode(tok.encode("wouldn`t")) == "WOULDN'T"


def test_char_unknown_characters_name_the_utterance_and_the_characters():
    tok = CharTokenizer()
    with pytest.raises(ValueError) as err:
        tok.encode("Room 42, please.", utt_id="1089-134686-0000")
    msg = str(err.value)
    assert "'1089-134686-0000'" in msg
    for ch in ("'4' (DIGIT FOUR)", "'2' (DIGIT TWO)", "',' (COMMA)", "'.' (FULL STOP)"):
        assert ch in msg
    assert "unknown='drop'" in msg
    with pytest.raises(ValueError, match=r"'é' \(LATIN SMALL LETTER E WITH ACUTE\)"):
        tok.encode("café")
    assert CharTokenizer(unknown="drop").decode(CharTokenizer(unknown="drop").encode("Room 42, please.")) == "ROOM PLEASE"
    with pytest.raises(ValueError, match="unknown='ignore'"):
        CharTokenizer(unknown="ignore")


def test_char_save_and_load(tmp_path):
    CharTokenizer(unknown="drop").save(tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    assert isinstance(tok, CharTokenizer) and tok.unknown == "drop"
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["tokenizer.json"]  # no temporary left


# ---------------------------------------------------------------------- BPE


def test_bpe_reserves_blank_and_never_produces_it(bpe):
    tok, _ = bpe
    assert tok.vocab_size == 80 and tok.blank == 0
    assert tok.pieces()[:2] == ["<blank>", "<unk>"]
    for text in sentences(100, seed=1):
        ids = tok.encode(text)
        assert ids and min(ids) >= 1 and max(ids) < tok.vocab_size
        assert tok.decode(ids) == text
    assert tok.decode([0] + tok.encode("THE NIGHT") + [0]) == "THE NIGHT"
    assert tok.encode("ZQX") and 0 not in tok.encode("ZQX")  # unseen characters -> <unk> (1), never 0


def test_bpe_save_load_round_trip(bpe, tmp_path):
    tok, out = bpe
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json", "tokenizer.model"]
    again = load_tokenizer(out)
    assert isinstance(again, BPETokenizer) and again.vocab_size == tok.vocab_size
    for text in sentences(30, seed=2):
        assert again.encode(text) == tok.encode(text)
    copied = pickle.loads(pickle.dumps(tok))  # DataLoader workers and Ray pickle it
    assert copied.encode("THE SPEECH") == tok.encode("THE SPEECH")
    tok.save(tmp_path / "copy")
    assert load_tokenizer(tmp_path / "copy").pieces() == tok.pieces()


def test_bpe_unigram_and_bad_vocab_size(tmp_path):
    uni = BPETokenizer.train(sentences(), None, vocab_size=60, model_type="unigram")
    assert uni.vocab_size == 60 and 0 not in uni.encode("THE SPEECH ENCODER")
    with pytest.raises(ValueError, match="lower vocab_size"):
        BPETokenizer.train(sentences(20), tmp_path, vocab_size=5000)
    with pytest.raises(ValueError, match="model_type"):
        BPETokenizer.train(sentences(20), tmp_path, vocab_size=50, model_type="wordpiece")


def test_load_errors_are_clear(bpe, tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json is missing"):
        load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "tokenizer.json").write_text(json.dumps({"kind": "wordpiece"}))
    with pytest.raises(ValueError, match=r"unknown tokenizer kind 'wordpiece'.*\['bpe', 'char'\]"):
        load_tokenizer(tmp_path / "odd")
    tok, _ = bpe
    tok.save(tmp_path / "half")
    other = BPETokenizer.train(sentences(seed=3), None, vocab_size=70)
    (tmp_path / "half" / "tokenizer.model").write_bytes(other._proto)  # a crash between the two renames
    with pytest.raises(ValueError, match="partly overwritten"):
        load_tokenizer(tmp_path / "half")

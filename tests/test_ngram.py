"""The word n-gram LM builder: normalised back-off probabilities, KenLM agrees, no held-out words."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.data.ngram import BOS, EOS, UNK, ArpaModel, build_arpa, count_ngrams

TOY = [
    "the cat sat on the mat",
    "the dog sat on the log",
    "a cat saw the dog",
    "the cat sat",
    "dogs bark",
]


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_every_history_sums_to_one(tmp_path: Path, order: int) -> None:
    path = tmp_path / "lm.arpa"
    stats = build_arpa(TOY, path, order=order)
    lm = ArpaModel(path)
    assert lm.order == order and stats["order"] == order
    predicted = lm.vocab  # every word, </s> and <unk>; never <s>
    assert EOS in predicted and UNK in predicted and BOS not in predicted
    histories = {gram for gram in lm.probs if len(gram) < order}  # every listed n-gram as a history
    histories |= {(), ("THE", "BARK"), ("ZEBRA",), (BOS, "ZEBRA"), ("CAT", "ZEBRA", "ON")}  # unseen ones too
    for history in histories:
        total = sum(10 ** lm.logprob(history, w) for w in predicted)
        assert total == pytest.approx(1.0, abs=1e-5), history


def test_witten_bell_values_by_hand(tmp_path: Path) -> None:
    # After THE: c(THE .) = 6 tokens of N(THE .) = 4 types.
    counts = count_ngrams(TOY, 2)
    after_the = {g[1]: c for g, c in counts[1].items() if g[0] == "THE"}
    assert after_the == {"CAT": 2, "MAT": 1, "DOG": 2, "LOG": 1}
    path = tmp_path / "lm.arpa"
    build_arpa(TOY, path, order=2)
    lm = ArpaModel(path)
    unigram_total = sum(counts[0].values())
    unigram_types = len(counts[0])
    vocab_size = unigram_types + 1  # + <unk>
    p_cat = (counts[0][("CAT",)] + unigram_types / vocab_size) / (unigram_total + unigram_types)
    assert 10 ** lm.logprob([], "CAT") == pytest.approx(p_cat, rel=1e-6)
    p = (2 + 4 * p_cat) / (6 + 4)
    assert 10 ** lm.logprob(["THE"], "CAT") == pytest.approx(p, rel=1e-6)
    # an unseen bigram backs off with bo(THE) = N / (c + N)
    p_sat = 10 ** lm.logprob([], "SAT")
    assert 10 ** lm.logprob(["THE"], "SAT") == pytest.approx(4 / 10 * p_sat, rel=1e-6)


def test_kenlm_reads_the_file_and_agrees(tmp_path: Path) -> None:
    from flashlight.lib.text.decoder.kenlm import KenLM
    from flashlight.lib.text.dictionary import Dictionary

    path = tmp_path / "lm.arpa"
    build_arpa(TOY, path, order=3)
    ours = ArpaModel(path)
    words = Dictionary()
    for w in ours.vocab:
        if w != EOS:
            words.add_entry(w)
    kenlm = KenLM(str(path), words)
    for sentence in ["THE CAT SAT ON THE LOG", "A DOG SAW THE MAT", "ZEBRA CAT", "DOGS"]:
        state = kenlm.start(False)
        history, kenlm_total = [BOS], 0.0
        for w in sentence.split():
            state, s = kenlm.score(state, words.get_index(w if w in ours.vocab else UNK))
            assert s == pytest.approx(ours.logprob(history, w), abs=1e-4), (sentence, w)
            kenlm_total += s
            history.append(w)
        _, end = kenlm.finish(state)
        assert kenlm_total + end == pytest.approx(ours.sentence_logprob(sentence)[0], abs=1e-3)


def test_the_ctc_decoder_loads_it(tmp_path: Path) -> None:
    from orchestrator.data.tokenizers import CharTokenizer
    from orchestrator.train.decoding import BeamSearchDecoder, write_lexicon

    arpa, lexicon = tmp_path / "lm.arpa", tmp_path / "lexicon.txt"
    build_arpa(TOY, arpa, order=3)
    write_lexicon(TOY, CharTokenizer(), lexicon)
    BeamSearchDecoder(CharTokenizer(), beam_size=4, lm_path=str(arpa), lexicon_path=str(lexicon))


def test_held_out_text_never_enters_the_lm(tmp_path: Path) -> None:
    held_out = ["the zebra sat on the giraffe", "the cat sat"]
    path = tmp_path / "lm.arpa"
    stats = build_arpa(TOY, path, order=3, held_out=held_out)
    text = path.read_text()
    listed = {w for line in text.splitlines() if "\t" in line for w in line.split("\t")[1].split()}
    assert "ZEBRA" not in listed and "GIRAFFE" not in listed and "CAT" in listed
    assert stats["held_out_in_train"] == 1  # "the cat sat" is also a training sentence
    assert stats["held_out_oov_rate"] == pytest.approx(2 / 9)


def test_perplexity_prefers_in_domain_text(tmp_path: Path) -> None:
    path = tmp_path / "lm.arpa"
    build_arpa(TOY, path, order=3)
    lm = ArpaModel(path)
    assert lm.perplexity(["the cat sat on the mat"]) < lm.perplexity(["mat the on sat cat the"])
    with pytest.raises(ValueError, match="no training text"):
        build_arpa(["", "  "], tmp_path / "empty.arpa")


def test_histories_cover_all_prefixes() -> None:
    # KenLM needs every n-gram's history and suffix listed: the counts guarantee both
    # (<s> alone is added by the writer, as it is never predicted).
    counts = count_ngrams(TOY, 3)
    for n in (1, 2):
        for gram in counts[n]:
            assert gram[:-1] in counts[n - 1] or gram[:-1] == (BOS,), gram
            assert gram[1:] in counts[n - 1], gram


def test_arpa_vocabulary_reads_plain_and_gzip_files(tmp_path: Path) -> None:
    import gzip

    from orchestrator.data.ngram import arpa_vocabulary

    path = tmp_path / "lm.arpa"
    build_arpa(TOY, path, order=3)
    words = arpa_vocabulary(path)
    assert sorted(words) == sorted({w.upper() for t in TOY for w in t.split()})
    gz = tmp_path / "lm.arpa.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    assert arpa_vocabulary(gz) == words
    (tmp_path / "bad.bin").write_bytes(b"mmap lm http://kheafield.com/code format version 5\0")
    with pytest.raises(ValueError, match="bad.bin: no .*1-grams"):
        arpa_vocabulary(tmp_path / "bad.bin")

"""Test decoding with a word n-gram LM built from the training transcripts.

A fast test on constructed CTC emissions (a noisy "acoustic model" over the generated
corpus's test sentences) shows the LM lowers WER against the same beam without it; an end-to-end
test runs ``evaluate_run`` with ``eval.lm_from_train`` on a small generated corpus.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import pytest
import torch

from orchestrator.data import espeak
from orchestrator.data.ngram import ArpaModel, build_arpa
from orchestrator.data.synth import SUBSETS, list_voices, plan_corpus
from orchestrator.data.tokenizers import BLANK, CharTokenizer
from orchestrator.train.config import ConfigError, run_config_from_dict
from orchestrator.train.decoding import BeamSearchDecoder, bootstrap_wer_ci, prune_tokens, score, write_lexicon
from tests.conftest import micro_run_dict


def corpus_texts(seed: int = 0) -> dict[str, list[str]]:
    """The generated corpus's transcripts per subset at its default sizes (the plan, no audio)."""
    sizes = {s.name: s.default_size for s in SUBSETS}
    shards = plan_corpus(seed=seed, sizes=sizes, voices=list_voices(), variants=espeak.DEFAULT_VARIANTS)
    out: dict[str, list[str]] = {}
    for shard in shards:
        out.setdefault(shard.subset, []).extend(u.transcript for u in shard.utterances)
    return out


def noisy_emissions(
    texts: list[str], tok: CharTokenizer, words: list[str], *, confuse: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """CTC log-posteriors of a constructed acoustic model that confuses similar words.

    With probability ``confuse`` a word is heard as a mixture of itself and a rival: another
    word of ``words`` (the training vocabulary) of the same length, which the frames prefer
    (0.55 against 0.4 for each letter where they differ). A lexicon cannot tell the two apart,
    the context can. Each character gets one frame followed by a blank frame.
    """
    gen = torch.Generator().manual_seed(seed)
    by_length: dict[int, list[str]] = {}
    for w in sorted(set(words)):
        by_length.setdefault(len(w), []).append(w)
    v = tok.vocab_size
    rows: list[list[tuple[int, int | None]]] = []
    for text in texts:
        pairs: list[tuple[int, int | None]] = []
        for i, word in enumerate(text.split()):
            if i:
                pairs.append((tok.symbols.index(" "), None))
            rivals = [r for r in by_length.get(len(word), []) if r != word]
            rival = None
            if rivals and torch.rand((), generator=gen) < confuse:
                rival = rivals[int(torch.randint(len(rivals), (), generator=gen))]
            for k, c in enumerate(word):
                other = None if rival is None or rival[k] == c else tok.encode(rival[k])[0]
                pairs.append((tok.encode(c)[0], other))
        rows.append(pairs)
    frames = max(2 * len(r) + 1 for r in rows)
    probs = torch.full((len(texts), frames, v), 0.0)
    probs[:, :, BLANK] = 1.0
    for b, pairs in enumerate(rows):
        for k, (token, other) in enumerate(pairs):
            row = torch.full((v,), 0.05 / (v - 2))
            if other is None:
                row[token] = 0.95
            else:
                row[token], row[other] = 0.4, 0.55
            probs[b, 2 * k] = row / row.sum()
            probs[b, 2 * k + 1] = torch.full((v,), 0.05 / (v - 1))
            probs[b, 2 * k + 1, BLANK] = 0.95
    lengths = torch.tensor([2 * len(r) + 1 for r in rows])
    return probs.log(), lengths


@pytest.fixture(scope="module")
def corpus_lm(tmp_path_factory) -> dict:
    """LM and lexicon from the TRAINING transcripts of the generated corpus only."""
    texts = corpus_texts()
    folder = tmp_path_factory.mktemp("lm")
    arpa, lexicon = folder / "lm.arpa", folder / "lexicon.txt"
    held_out = texts["dev-clean"] + texts["test-clean"] + texts["test-other"]
    stats = build_arpa(texts["train-clean-100"], arpa, order=3, held_out=held_out)
    write_lexicon(texts["train-clean-100"], CharTokenizer(), lexicon)
    return {"texts": texts, "arpa": arpa, "lexicon": lexicon, "stats": stats}


def test_the_lm_sees_training_text_only(corpus_lm: dict) -> None:
    texts, stats = corpus_lm["texts"], corpus_lm["stats"]
    train = set(texts["train-clean-100"])
    for subset in ("dev-clean", "test-clean", "test-other"):
        assert not train & set(texts[subset]), f"{subset} sentences also in training"
    assert stats["held_out_in_train"] == 0 and stats["sentences"] == len(texts["train-clean-100"])
    listed = {w for line in corpus_lm["arpa"].read_text().splitlines() if "\t" in line
              for w in line.split("\t")[1].split()}
    train_words = {w for t in train for w in t.split()}
    assert listed - {"<s>", "</s>", "<unk>"} == train_words  # no dev/test-only word in the LM
    lm = ArpaModel(corpus_lm["arpa"])
    # the grammar's structure is learnt: test sentences are far likelier than shuffled ones
    test = texts["test-clean"][:50]
    shuffled = [" ".join(sorted(t.split())) for t in test]
    assert lm.perplexity(test) < 0.5 * lm.perplexity(shuffled)


@pytest.mark.parametrize("subset", ["test-clean", "test-other"])
def test_the_lm_lowers_wer_at_the_same_beam(corpus_lm: dict, subset: str) -> None:
    tok = CharTokenizer()
    refs = corpus_lm["texts"][subset]
    train_words = [w for t in corpus_lm["texts"]["train-clean-100"] for w in t.split()]
    log_probs, lengths = noisy_emissions(refs, tok, train_words, confuse=0.3, seed=1)
    settings = {"beam_size": 50, "beam_threshold": 25.0, "lexicon_path": str(corpus_lm["lexicon"])}
    plain = BeamSearchDecoder(tok, **settings)
    with_lm = BeamSearchDecoder(tok, lm_path=str(corpus_lm["arpa"]), lm_weight=0.8, lm_score_base="ln",
                                word_score=1.2, **settings)
    ids = [str(i) for i in range(len(refs))]
    start = time.perf_counter()
    s_plain = score(ids, refs, plain(log_probs, lengths))
    middle = time.perf_counter()
    s_lm = score(ids, refs, with_lm(log_probs, lengths))
    end = time.perf_counter()
    print(f"{subset}: WER {s_plain.wer:.4f} without LM ({middle - start:.2f} s), "
          f"{s_lm.wer:.4f} with ({end - middle:.2f} s) on {len(refs)} utterances")
    assert s_plain.wer > 0.1  # the constructed model errs often enough to leave the LM work
    low, high = bootstrap_wer_ci(s_lm.word_errors, s_lm.words, samples=500)
    plain_low, _ = bootstrap_wer_ci(s_plain.word_errors, s_plain.words, samples=500)
    assert s_lm.wer < 0.7 * s_plain.wer and high < plain_low  # a clear, significant gain


def test_paper_token_pruning_keeps_the_best_token() -> None:
    log_probs = torch.tensor([[[-0.1, -3.0, -6.0, -9.0], [-7.0, -6.0, -8.0, -9.0]]])
    pruned = prune_tokens(log_probs, -5.0)
    assert pruned[0, 0, :2].tolist() == pytest.approx([-0.1, -3.0])
    assert (pruned[0, 0, 2:] < -1e29).all()
    assert pruned[0, 1, 1] == -6.0 and (pruned[0, 1, [0, 2, 3]] < -1e29).all()  # the best stays


def test_lm_score_base_scales_the_weight(tmp_path: Path, corpus_lm: dict) -> None:
    # An alpha in natural-log units equals flashlight's log10 weight times ln 10.
    tok = CharTokenizer()
    refs = corpus_lm["texts"]["dev-clean"][:40]
    train_words = [w for t in corpus_lm["texts"]["train-clean-100"] for w in t.split()]
    log_probs, lengths = noisy_emissions(refs, tok, train_words, confuse=0.3, seed=2)
    common = {"beam_size": 20, "lexicon_path": str(corpus_lm["lexicon"]), "lm_path": str(corpus_lm["arpa"])}
    ln = BeamSearchDecoder(tok, lm_weight=0.8, lm_score_base="ln", **common)(log_probs, lengths)
    log10 = BeamSearchDecoder(tok, lm_weight=0.8 * math.log(10), **common)(log_probs, lengths)
    assert ln == log10
    with pytest.raises(ValueError, match="lm_score_base"):
        BeamSearchDecoder(tok, lm_score_base="log2")


def test_lm_config_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="eval.lm_from_train.*lexicon_from_train"):
        run_config_from_dict({"eval": {"lm_from_train": True, "lexicon_from_train": False}})
    with pytest.raises(ConfigError, match="eval.lm_from_train.*not both"):
        run_config_from_dict({"eval": {"lm_from_train": True, "lm_path": "x.arpa"}})
    with pytest.raises(ConfigError, match="eval.lm_order"):
        run_config_from_dict({"eval": {"lm_from_train": True, "lexicon_from_train": True, "lm_order": 1}})


def test_evaluate_run_decodes_without_and_with_the_lm(small_corpus: Path, tmp_path: Path) -> None:
    from orchestrator.train.evaluate import evaluate_run
    from orchestrator.train.finetune import finetune

    config = run_config_from_dict(micro_run_dict(
        small_corpus, tmp_path / "run", tmp_path / "cache",
        finetune={"init": "random", "steps": 2, "eval_every": 2},
        eval={"decoder": "beam", "beam_size": 8, "lexicon_from_train": True, "lm_from_train": True,
              "lm_weight": 0.8, "lm_score_base": "ln", "word_score": 1.2, "token_prune_min_logp": -5.0},
    ))
    assert finetune(config)["complete"]
    reports: list = []
    result = evaluate_run(config, report=lambda metrics, _: reports.append(metrics))
    clean = result["subsets"]["test-clean"]
    for key in ("wer", "wer_ci_low", "wer_ci_high", "wer_lm", "cer_lm", "wer_lm_ci_low", "wer_lm_ci_high"):
        assert math.isfinite(clean[key]) and clean[key] >= 0, key
        assert reports[0][f"test-clean/{key}"] == clean[key]
    assert clean["wer_lm_ci_low"] <= clean["wer_lm"] <= clean["wer_lm_ci_high"]
    assert clean["wer_lm_gain"] == pytest.approx(clean["wer"] - clean["wer_lm"])
    assert clean["wer_lm_gain_ci_low"] <= clean["wer_lm_gain"] <= clean["wer_lm_gain_ci_high"]
    assert result["lm"]["held_out_in_train"] == 0 and result["lm"]["order"] == 3
    out = tmp_path / "run" / "eval"
    for name in ("lm.arpa", "lexicon.txt", "test-clean.tsv", "test-clean.lm.tsv", "results.json"):
        assert (out / name).is_file(), name
    rows = (out / "test-clean.lm.tsv").read_text().splitlines()
    assert len(rows) == 1 + clean["utterances"]
    # the LM came from the training transcripts: no test-only word in it
    from orchestrator.train.data import load_utterances as load

    train_words = {w for u in load(config.data, config.data.train_subsets) for w in u.text.upper().split()}
    arpa_words = {w for line in (out / "lm.arpa").read_text().splitlines() if "\t" in line
                  for w in line.split("\t")[1].split()} - {"<s>", "</s>", "<unk>"}
    assert arpa_words == train_words
    # The paper's layout: a user-supplied word LM, the lexicon spelled from its words, the
    # decoding without LM lexicon-free.
    paper_style = dataclasses.replace(config, output_dir=str(tmp_path / "run2"), eval=dataclasses.replace(
        config.eval, lm_from_train=False, lm_path=str(out / "lm.arpa"), lexicon_from_train=False,
        lexicon_from_lm=True, lexicon_without_lm=False, beam_threshold=10.0))
    checkpoint = result["checkpoint"]
    second = evaluate_run(paper_style, checkpoint=checkpoint)
    assert second["lexicon"] == "lm" and second["lm"]["from_train"] is False
    lexicon = (tmp_path / "run2" / "eval" / "lexicon.txt").read_text().split("\n")
    assert {line.split("\t")[0] for line in lexicon if line} == train_words
    assert math.isfinite(second["subsets"]["test-clean"]["wer_lm"])


def test_lexicon_from_a_binary_lm_is_one_clear_error(tmp_path: Path) -> None:
    from orchestrator.train.evaluate import prepare_language_files

    binary = tmp_path / "4-gram.bin"
    binary.write_bytes(b"mmap lm http://kheafield.com/code format version 5\0\0")
    config = run_config_from_dict({"eval": {"lm_path": str(binary), "lexicon_from_lm": True},
                                   "output_dir": str(tmp_path / "run")})
    with pytest.raises(ValueError, match=r"eval.lexicon_from_lm: .*4-gram.bin: .*give eval.lexicon_path instead"):
        prepare_language_files(config, CharTokenizer())
    missing = run_config_from_dict({"eval": {"lm_path": str(tmp_path / "none.arpa")}})
    with pytest.raises(ValueError, match="eval.lm_path: .*none.arpa does not exist"):
        prepare_language_files(missing, CharTokenizer())


def test_kenlm_chatter_is_hidden_other_stderr_kept(corpus_lm: dict, capfd) -> None:
    import os

    from orchestrator.train.decoding import _kenlm_progress_hidden

    BeamSearchDecoder(CharTokenizer(), lm_path=str(corpus_lm["arpa"]), lexicon_path=str(corpus_lm["lexicon"]))
    with _kenlm_progress_hidden():
        os.write(2, b"Reading lm.arpa\n----5---10---15---20---25\n****\na real warning\n")
    err = capfd.readouterr().err
    assert "binary file" not in err and "Reading" not in err and "****" not in err
    assert "a real warning" in err

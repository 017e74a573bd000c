"""The generated speech corpus (orchestrator.data.synth): layout, audio, determinism, resume, CLI.

The corpora here are tiny (a few utterances per subset); the whole module runs in about 15 s,
most of it the worker server's one-off torch import.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from orchestrator.data import espeak, synth, synth_plan
from orchestrator.data.grammar import TRANSCRIPT_RE, Grammar, number_words, vocabulary

TINY = {"train-clean-100": 12, "dev-clean": 4, "test-clean": 4, "test-other": 4}
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "a"
    summary = synth.generate_corpus(out, seed=0, sizes=TINY, workers=2)
    return out, summary


def _transcripts(root: Path) -> dict[str, str]:
    texts = {}
    for path in root.glob("*/*/*/*.trans.txt"):
        for line in path.read_text().splitlines():
            utt_id, text = line.split(" ", 1)
            texts[utt_id] = text
    return texts


def _subset_of(root: Path, utt_id: str) -> str:
    return next(root.glob(f"*/{utt_id.split('-')[0]}")).parent.name


# --- layout and audio -------------------------------------------------------------------


def test_layout_and_transcripts(corpus):
    root, summary = corpus
    assert summary["counts"] == TINY and summary["generated"] == sum(TINY.values())
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == sorted(
        [*TINY, "corpus.json", "SPEAKERS.TXT"])
    line_re = re.compile(r"^(\d+)-(\d+)-(\d{4}) ([A-Z' ]+)$")
    for subset, size in TINY.items():
        n_utts = 0
        for speaker in (root / subset).iterdir():
            for chapter in speaker.iterdir():
                trans = chapter / f"{speaker.name}-{chapter.name}.trans.txt"
                lines = trans.read_text().splitlines()
                ids = []
                for line in lines:
                    m = line_re.match(line)
                    assert m, line
                    assert (m[1], m[2]) == (speaker.name, chapter.name)
                    assert TRANSCRIPT_RE.match(m[4]) and set(m[4].split()) <= vocabulary()
                    assert set(m[4]) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZ' ")
                    ids.append(f"{m[1]}-{m[2]}-{m[3]}")
                assert ids == sorted(ids)
                files = sorted(p.name for p in chapter.iterdir())
                assert files == sorted([f"{i}.flac" for i in ids] + [trans.name])
                n_utts += len(ids)
        assert n_utts == size, subset

    meta = json.loads((root / "corpus.json").read_text())
    assert meta["complete"] and meta["config"]["seed"] == 0
    assert meta["config"]["sizes"] == TINY and meta["sample_rate"] == 16000
    assert meta["vocabulary_size"] >= 300 and meta["generator"] == "orchestrator.data.synth"
    assert {s: v["utterances"] for s, v in meta["subsets"].items()} == TINY
    speaker_dirs = {p.name for p in root.glob("*/*") if p.is_dir() and p.parent.name in TINY}
    assert set(meta["speakers"]) == speaker_dirs
    table = (root / "SPEAKERS.TXT").read_text()
    assert all(re.search(rf"^{sid}\s+\|", table, re.M) for sid in speaker_dirs)


def test_audio_is_16k_mono_speech_of_plausible_length(corpus):
    root, _ = corpus
    meta = json.loads((root / "corpus.json").read_text())
    texts = _transcripts(root)
    for path in root.glob("*/*/*/*.flac"):
        info = sf.info(str(path))
        assert (info.samplerate, info.channels, info.format, info.subtype) == (
            16000, 1, "FLAC", "PCM_16")
        audio, _ = sf.read(str(path), dtype="float32")
        assert np.sqrt(np.mean(audio ** 2)) > 0.01 and np.abs(audio).max() > 0.05, path
        text, rate = texts[path.stem], meta["speakers"][path.stem.split("-")[0]]["rate"]
        seconds = info.frames / info.samplerate
        assert 1.3 < seconds < 6.6, (path, seconds)
        # eSpeak reads about 14 to 20 characters a second at 175 wpm, scaled by the rate.
        assert 0.7 < seconds / synth_plan.estimate_seconds(text, rate) < 1.4, (text, rate, seconds)


def test_speakers_are_held_out_and_dev_test_sentences_not_in_train(corpus):
    root, _ = corpus
    meta = json.loads((root / "corpus.json").read_text())
    combos = {}
    for sid, sp in meta["speakers"].items():
        combos.setdefault((sp["voice"], sp["variant"], sp["rate"], sp["pitch"]), []).append(sid)
    assert all(len(ids) == 1 for ids in combos.values())
    texts = _transcripts(root)
    by_subset: dict[str, set[str]] = {}
    for utt_id, text in texts.items():
        by_subset.setdefault(_subset_of(root, utt_id), set()).add(text)
    for held_out in ("dev-clean", "test-clean", "test-other"):
        assert not by_subset[held_out] & by_subset["train-clean-100"]


def test_default_plan_keeps_dev_and_test_sentences_out_of_train():
    shards = synth.plan_corpus(seed=3, sizes={s.name: s.default_size for s in synth.SUBSETS},
                               voices=espeak.list_voices(), variants=espeak.DEFAULT_VARIANTS)
    texts: dict[str, list[str]] = {}
    for shard in shards:
        texts.setdefault(shard.subset, []).extend(u.transcript for u in shard.utterances)
    assert {k: len(v) for k, v in texts.items()} == {
        s.name: s.default_size for s in synth.SUBSETS}
    train = set(texts["train-clean-100"])
    for name in ("dev-clean", "test-clean", "test-other"):
        assert not train & set(texts[name]), name
    everything = [t for v in texts.values() for t in v]
    assert len(set(everything)) == len(everything)
    # Many speakers, none shared between subsets; every dialect voice is used.
    speakers = [(sh.subset, sh.speaker) for sh in shards]
    assert len({sp for _, sp in speakers}) == len(speakers) >= 130
    assert {sp.voice for _, sp in speakers} == set(espeak.list_voices())


# --- determinism ------------------------------------------------------------------------


def _samples(root: Path) -> dict[str, np.ndarray]:
    return {p.relative_to(root).as_posix(): sf.read(str(p), dtype="int16")[0]
            for p in sorted(root.glob("*/*/*/*.flac"))}


def test_same_seed_gives_identical_audio_whatever_the_workers(corpus, tmp_path):
    root, _ = corpus
    again = tmp_path / "again"
    synth.generate_corpus(again, seed=0, sizes=TINY, workers=1)
    a, b = _samples(root), _samples(again)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        assert (root / key).read_bytes() == (again / key).read_bytes()
    assert _transcripts(root) == _transcripts(again)
    assert (root / "corpus.json").read_bytes() == (again / "corpus.json").read_bytes()


def test_another_seed_gives_another_corpus(corpus, tmp_path):
    root, _ = corpus
    other = tmp_path / "other"
    synth.generate_corpus(other, seed=1, sizes={"train-clean-100": 3, "dev-clean": 1},
                          workers=1)
    a, b = _transcripts(root), _transcripts(other)
    assert not set(a) & set(b) and not set(a.values()) & set(b.values())
    audio_a = {p.read_bytes() for p in root.glob("*/*/*/*.flac")}
    assert not audio_a & {p.read_bytes() for p in other.glob("*/*/*/*.flac")}
    assert json.loads((other / "corpus.json").read_text())["config"]["seed"] == 1


# --- names ------------------------------------------------------------------------------


def test_voices_and_variants_come_from_the_shipped_data():
    voices = espeak.list_voices()
    assert {"en-us", "en-gb-x-rp", "en-gb-scotland", "en-029"} <= set(voices)
    assert set(espeak.DEFAULT_VARIANTS) <= set(espeak.list_variants())
    assert synth.list_voices() == voices


@pytest.mark.parametrize("field, value, message", [
    ("voice", "en-xx", "unknown eSpeak voice 'en-xx'"),
    ("voice", "fr", "unknown eSpeak voice 'fr'"),
    ("variant", "m99", "unknown eSpeak voice variant 'm99'"),
    ("variant", "M1", "unknown eSpeak voice variant 'M1'"),
    ("rate", 20, "speaker rate 20"),
    ("pitch", 101, "speaker pitch 101"),
])
def test_unknown_voice_or_variant_is_rejected(field, value, message):
    fields = {"voice": "en-us", "variant": "m1", "rate": 175, "pitch": 50, field: value}
    with pytest.raises(ValueError, match=re.escape(message)):
        espeak.SpeakerSpec(**fields).validate()


def test_generate_rejects_bad_names_before_writing(tmp_path):
    out = tmp_path / "c"
    with pytest.raises(ValueError, match="unknown eSpeak voice variant 'nope'"):
        synth.generate_corpus(out, sizes={"train-clean-100": 2}, variants=["m1", "nope"])
    with pytest.raises(ValueError, match="did you mean en-us"):
        synth.generate_corpus(out, sizes={"train-clean-100": 2}, voices=["en-uss"])
    with pytest.raises(ValueError, match="--train"):
        synth.generate_corpus(out, sizes={"train-clean-100": -1})
    with pytest.raises(ValueError, match="unknown subset"):
        synth.generate_corpus(out, sizes={"train-other-500": 1})
    # 1 voice x 1 variant x 13 rates x 7 pitches = 91 speakers, 3000 utterances need 100.
    with pytest.raises(ValueError, match="needs 100 distinct speakers .* allow 91 more"):
        synth.generate_corpus(out, sizes={"train-clean-100": 3000}, voices=["en-us"],
                              variants=["m1"])
    assert not out.exists()


# --- resume and folder identity ----------------------------------------------------------


def test_rerun_skips_finished_shards_and_resumes_identically(corpus, tmp_path):
    root, summary = corpus
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    again = synth.generate_corpus(copy, seed=0, sizes=TINY, workers=2)
    assert again["generated"] == 0 and again["shards_skipped"] == summary["shards"]

    # An interrupted shard: one file gone, the marker gone, a stale temporary file left.
    victim = sorted(copy.glob("dev-clean/*/*/*.flac"))[1]
    victim.unlink()
    (victim.parent / f".{victim.name}.999.tmp").write_bytes(b"partial")
    for marker in copy.glob(".synth/done/dev-clean/*.json"):
        marker.unlink()
    resumed = synth.generate_corpus(copy, seed=0, sizes=TINY, workers=2)
    assert resumed["generated"] == TINY["dev-clean"]
    assert resumed["shards_skipped"] == summary["shards"] - 1
    assert victim.read_bytes() == (root / victim.relative_to(copy)).read_bytes()
    assert not list(copy.glob("**/*.tmp"))


def test_a_folder_with_another_corpus_or_other_files_is_refused(corpus, tmp_path):
    root, _ = corpus
    with pytest.raises(ValueError, match=r"already holds another generated corpus \(there: "
                                         r"seed=0; this run: seed=7\)"):
        synth.generate_corpus(root, seed=7, sizes=TINY)
    with pytest.raises(ValueError, match="there: dev-clean=4; this run: dev-clean=5"):
        synth.generate_corpus(root, seed=0, sizes={**TINY, "dev-clean": 5})
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty and holds no corpus.json"):
        synth.generate_corpus(busy, sizes={"train-clean-100": 1})
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]


# --- grammar ----------------------------------------------------------------------------


def test_grammar_is_seeded_and_stays_in_the_alphabet():
    g1, g2, g3 = (Grammar(random.Random(s)) for s in (5, 5, 6))
    a = [g1.sentence().transcript for _ in range(500)]
    assert a == [g2.sentence().transcript for _ in range(500)]
    assert a != [g3.sentence().transcript for _ in range(500)]
    words = vocabulary()
    assert len(words) >= 300
    for text in a:
        assert TRANSCRIPT_RE.match(text) and set(text.split()) <= words, text
    assert any("'" in t for t in a)
    assert number_words(342) == "three hundred forty two" and number_words(40) == "forty"


# --- CLI --------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.data.synth", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, message", [
    (["--out", "{tmp}", "--train", "-3"], "--train (size of train-clean-100) must be"),
    (["--out", "{tmp}", "--train", "many"], "argument --train: invalid int value"),
    (["--out", "{tmp}", "--variants", "m1,zz9"], "unknown eSpeak voice variant 'zz9'"),
    (["--out", "{tmp}", "--workers", "0"], "--workers must be an integer >= 1"),
    (["--train", "3"], "--out DIR is required"),
    (["--out", "{tmp}", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_cli_bad_argument_exits_2_with_one_line(tmp_path, args, message):
    result = _cli(*(a.replace("{tmp}", str(tmp_path / "x")) for a in args))
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_cli_generates_and_prints_a_json_summary(tmp_path):
    result = _cli("--out", str(tmp_path / "c"), "--train", "2", "--dev", "1", "--test", "1",
                  "--test-other", "0", "--workers", "1", "--quiet", "--seed", "4")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    summary = json.loads(result.stdout)
    assert summary["counts"] == {"train-clean-100": 2, "dev-clean": 1, "test-clean": 1}
    assert summary["generated"] == 4 and summary["utt_per_s"] > 0 and summary["audio_hours"] > 0
    assert len(list((tmp_path / "c").glob("*/*/*/*.flac"))) == 4

"""Corpus reader: manifests, bad data, audio decoding, the cache, S3 (moto server), the CLI.

Fixtures are tiny FLAC/WAV files written on the fly; S3 is an in-process moto server on
127.0.0.1 at a free port, started and stopped by this module.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from orchestrator.data import s3 as s3_mod
from orchestrator.data.audio import AudioError, resampled_length
from orchestrator.data.librispeech import (
    CorpusError,
    load_audio,
    load_manifest,
    main,
    split_s3_uri,
    is_s3_uri,
    upload_corpus,
)
from tests.conftest import free_port

LOGGER = "orchestrator.data.librispeech"

# (speaker, chapter) -> [(duration s, transcript as written in the file)]
CORPUS = {
    ("19", "198"): [(1.0, "NORTHANGER ABBEY"), (0.5, "  THE  LONG   PAUSE  ")],
    ("26", "495"): [(2.0, "IT WAS A DARK NIGHT"), (0.25, "YES")],
}


def tone(seconds: float, rate: int = 16000, freq: float = 440.0) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def make_corpus(root: Path, subset: str = "dev-clean", spec=CORPUS, ext: str = "flac") -> dict[str, tuple[float, str]]:
    """Write a LibriSpeech-layout subset; returns id -> (duration, normalised text)."""
    expected = {}
    for (spk, chap), utts in spec.items():
        folder = root / subset / spk / chap
        folder.mkdir(parents=True, exist_ok=True)
        lines = []
        for i, (seconds, text) in enumerate(utts):
            uid = f"{spk}-{chap}-{i:04d}"
            sf.write(folder / f"{uid}.{ext}", tone(seconds), 16000)
            lines.append(f"{uid} {text}")
            expected[uid] = (seconds, " ".join(text.split()))
        (folder / f"{spk}-{chap}.trans.txt").write_text("\n".join(lines) + "\n")
    return expected


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text, text
    return text


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    # Nothing may land in the real ~/.cache, even when a test forgets cache_dir.
    monkeypatch.setenv("POM_ABLATIONS_CACHE", str(tmp_path / "default-cache"))


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "LibriSpeech"
    return root, make_corpus(root)


# -- local manifests ---------------------------------------------------------------------------


def test_manifest_of_a_valid_corpus(corpus, tmp_path, caplog):
    root, expected = corpus
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        m = load_manifest(root, "dev-clean", cache_dir=tmp_path / "cache")
    assert [u.id for u in m.utterances] == sorted(expected)
    for u in m.utterances:
        seconds, text = expected[u.id]
        assert u.duration == pytest.approx(seconds, abs=1e-9)  # frames / rate from the header
        assert u.text == text  # as written, whitespace collapsed
        assert u.speaker == u.id.split("-")[0]
        assert Path(u.path).is_file() and Path(u.path).is_absolute()
    assert m.total_seconds == pytest.approx(sum(s for s, _ in expected.values()))
    assert m.skipped == [] and m.too_short == m.too_long == 0
    assert m.speakers == ["19", "26"]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_manifest_is_cached_and_rebuilt_when_the_corpus_changes(corpus, tmp_path, monkeypatch):
    root, expected = corpus
    calls = []
    real_info = sf.info
    monkeypatch.setattr(sf, "info", lambda *a, **k: calls.append(a[0]) or real_info(*a, **k))
    cache = tmp_path / "cache"

    first = load_manifest(root, "dev-clean", cache_dir=cache)
    assert len(calls) == len(expected) and not first.from_cache
    assert Path(first.cache_path).is_file()
    assert not list(Path(first.cache_path).parent.glob(".*.tmp"))  # written atomically

    calls.clear()
    second = load_manifest(root, "dev-clean", cache_dir=cache)
    assert calls == [] and second.from_cache
    assert second.utterances == first.utterances

    # A new utterance (audio + transcript line) -> rebuilt.
    folder = root / "dev-clean" / "19" / "198"
    sf.write(folder / "19-198-0009.flac", tone(0.75), 16000)
    with open(folder / "19-198.trans.txt", "a") as f:
        f.write("19-198-0009 ADDED LATER\n")
    third = load_manifest(root, "dev-clean", cache_dir=cache)
    assert not third.from_cache and calls
    assert "19-198-0009" in {u.id for u in third.utterances}

    # A changed file (same name, other length) -> rebuilt with the new duration.
    sf.write(folder / "19-198-0000.flac", tone(1.25), 16000)
    fourth = load_manifest(root, "dev-clean", cache_dir=cache)
    assert not fourth.from_cache
    assert {u.id: u.duration for u in fourth.utterances}["19-198-0000"] == pytest.approx(1.25)

    # A damaged cache file is rebuilt, not fatal.
    Path(fourth.cache_path).write_text("{not json")
    fifth = load_manifest(root, "dev-clean", cache_dir=cache)
    assert not fifth.from_cache and fifth.utterances == fourth.utterances


def test_missing_root(tmp_path):
    with pytest.raises(CorpusError) as err:
        load_manifest(tmp_path / "nowhere", "dev-clean", cache_dir=tmp_path)
    text = one_line(err.value)
    assert "nowhere" in text and "does not exist" in text


def test_missing_and_empty_subset_list_existing_subsets(corpus, tmp_path):
    root, _ = corpus
    (root / "train-other-500").mkdir()  # exists but empty
    with pytest.raises(CorpusError) as err:
        load_manifest(root, "test-clean", cache_dir=tmp_path)
    text = one_line(err.value)
    assert "'test-clean' not found" in text and "existing subsets: dev-clean" in text
    with pytest.raises(CorpusError) as err:
        load_manifest(root, "train-other-500", cache_dir=tmp_path)
    text = one_line(err.value)
    assert "holds no audio" in text and "dev-clean" in text
    assert "existing subsets: dev-clean" in text and "train-other-500," not in text


def test_bad_audio_is_skipped_counted_and_reported_once(corpus, tmp_path, caplog):
    root, expected = corpus
    folder = root / "dev-clean" / "19" / "198"
    corrupt = folder / "19-198-0007.flac"
    corrupt.write_bytes(np.random.default_rng(0).bytes(4096))
    empty = folder / "19-198-0008.flac"
    empty.write_bytes(b"")
    dangling = folder / "19-198-0009.flac"
    dangling.symlink_to(tmp_path / "gone.flac")  # unreadable: the target does not exist
    silent = folder / "19-198-0010.wav"
    sf.write(silent, np.zeros(0, np.float32), 16000)  # a valid header with zero frames
    with open(folder / "19-198.trans.txt", "a") as f:
        for i in (7, 8, 9, 10):
            f.write(f"19-198-{i:04d} SOMETHING\n")

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        m = load_manifest(root, "dev-clean", cache_dir=tmp_path / "cache")
    assert sorted(u.id for u in m.utterances) == sorted(expected)
    reasons = {s.path: s.reason for s in m.skipped}
    assert set(reasons) == {str(p) for p in (corrupt, empty, dangling, silent)}
    assert all(s.kind == "bad_audio" for s in m.skipped)
    assert "not a readable audio file" in reasons[str(corrupt)]
    assert "empty file" in reasons[str(empty)]
    assert "cannot open" in reasons[str(dangling)]
    assert "no audio frames" in reasons[str(silent)]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert all(str(p) in warnings[0].getMessage() for p in (corrupt, empty, dangling, silent))

    # From the cache: the same skips, reported again in one warning.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        again = load_manifest(root, "dev-clean", cache_dir=tmp_path / "cache")
    assert again.from_cache and again.skipped == m.skipped
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file_is_skipped(corpus, tmp_path):
    root, expected = corpus
    path = root / "dev-clean" / "26" / "495" / "26-495-0000.flac"
    path.chmod(0)
    try:
        m = load_manifest(root, "dev-clean", cache_dir=tmp_path)
    finally:
        path.chmod(0o644)
    assert [s.path for s in m.skipped] == [str(path)] and m.skipped[0].kind == "bad_audio"


def test_transcript_and_audio_mismatches_are_skipped_and_reported(corpus, tmp_path, caplog):
    root, expected = corpus
    folder = root / "dev-clean" / "26" / "495"
    sf.write(folder / "26-495-0042.flac", tone(0.5), 16000)  # audio, no transcript line
    with open(folder / "26-495.trans.txt", "a") as f:
        f.write("26-495-0077 A LINE WITHOUT AUDIO\n")
        f.write("26-495-0000 A DUPLICATE LINE\n")
    lone = root / "dev-clean" / "33" / "1"  # a folder with audio and no transcript file at all
    lone.mkdir(parents=True)
    sf.write(lone / "33-1-0000.flac", tone(0.5), 16000)
    stray = root / "dev-clean" / "19" / "199"  # an id already used in 19/198
    stray.mkdir(parents=True)
    sf.write(stray / "19-198-0000.flac", tone(0.5), 16000)
    (stray / "19-199.trans.txt").write_text("19-198-0000 SAME ID ELSEWHERE\n")

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        m = load_manifest(root, "dev-clean", cache_dir=tmp_path)
    assert sorted(u.id for u in m.utterances) == sorted(expected)
    assert {u.id: u.text for u in m.utterances}["26-495-0000"] == "IT WAS A DARK NIGHT"  # first line kept
    kinds = {(Path(s.path).name, s.kind) for s in m.skipped}
    assert kinds == {
        ("26-495-0042.flac", "no_transcript"),
        ("26-495.trans.txt", "no_audio"),
        ("26-495.trans.txt", "duplicate"),
        ("33-1-0000.flac", "no_transcript"),
        ("19-198-0000.flac", "duplicate"),
    }
    assert m.skipped_counts() == {"duplicate": 2, "no_audio": 1, "no_transcript": 2}
    assert {u.id: u.path for u in m.utterances}["19-198-0000"].endswith("19/198/19-198-0000.flac")
    message = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "26-495-0077" in message and "26-495-0042.flac" in message and "33-1-0000.flac" in message


def test_duration_filter_counts_what_it_removes(corpus, tmp_path):
    root, expected = corpus  # durations 1.0, 0.5, 2.0, 0.25
    m = load_manifest(root, "dev-clean", cache_dir=tmp_path, min_duration=0.4, max_duration=1.5)
    assert sorted(u.duration for u in m.utterances) == [0.5, 1.0]
    assert (m.too_short, m.too_long) == (1, 1)
    assert "1 too short, 1 too long" in m.summary()
    with pytest.raises(CorpusError) as err:  # the paper's 2-60 s filter on tiny utterances
        load_manifest(root, "dev-clean", cache_dir=tmp_path, min_duration=3, max_duration=60)
    assert "removes all 4" in one_line(err.value)
    with pytest.raises(CorpusError):
        load_manifest(root, "dev-clean", cache_dir=tmp_path, min_duration=5, max_duration=2)


def test_all_items_bad_is_an_error(tmp_path):
    folder = tmp_path / "LS" / "train" / "1" / "2"
    folder.mkdir(parents=True)
    (folder / "1-2-0000.flac").write_bytes(b"junk")
    (folder / "1-2.trans.txt").write_text("1-2-0000 HELLO\n")
    with pytest.raises(CorpusError) as err:
        load_manifest(tmp_path / "LS", "train", cache_dir=tmp_path / "cache")
    assert "no usable utterance" in one_line(err.value) and "1-2-0000.flac" in str(err.value)


# -- audio ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("rate", "ext"), [(8000, "flac"), (16000, "flac"), (22050, "wav"), (48000, "wav")])
def test_load_audio_resamples_to_16k(tmp_path, rate, ext):
    path = tmp_path / f"a.{ext}"
    frames = round(0.7 * rate)
    sf.write(path, tone(0.7, rate=rate), rate)
    wave = load_audio(path)
    assert wave.dtype == torch.float32 and wave.ndim == 1
    assert wave.shape[0] == resampled_length(frames, rate, 16000) == math.ceil(frames * 16000 / rate)
    # The content survives: a 440 Hz tone is still a 440 Hz tone at 16 kHz (edges aside).
    ref = torch.from_numpy(tone(0.7, rate=16000))[: wave.shape[0]]
    inner = slice(400, wave.shape[0] - 400)
    assert torch.allclose(wave[inner], ref[inner], atol=2e-3)
    assert load_audio(path, target_rate=None).shape[0] == frames


def test_stereo_is_mixed_down_to_mono(tmp_path):
    left, right = tone(0.5), tone(0.5, freq=1000.0)
    sf.write(tmp_path / "s.flac", np.stack([left, right], axis=1), 16000)
    wave = load_audio(tmp_path / "s.flac")
    assert wave.shape == (8000,)
    assert torch.allclose(wave, torch.from_numpy((left + right) / 2), atol=1e-4)  # 16-bit FLAC


def test_load_audio_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.flac"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(AudioError) as err:
        load_audio(bad)
    assert str(bad) in one_line(err.value) and isinstance(err.value, CorpusError)
    with pytest.raises(AudioError, match="no such file"):
        load_audio(tmp_path / "missing.flac")


def test_s3_uri_helpers():
    assert is_s3_uri("s3://b/k") and not is_s3_uri("/data/x") and not is_s3_uri(Path("s3:/b"))
    assert split_s3_uri("s3://bucket/a/b.flac") == ("bucket", "a/b.flac")
    assert split_s3_uri("s3://bucket") == ("bucket", "")
    with pytest.raises(CorpusError):
        split_s3_uri("s3:///key")
    with pytest.raises(CorpusError):
        split_s3_uri("/local/path")


# -- S3 (moto server) ----------------------------------------------------------------------------

_buckets = itertools.count()


def _aws_env(monkeypatch, tmp_path, endpoint: str | None) -> None:
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    if endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture
def s3_corpus(moto_endpoint, monkeypatch, tmp_path):
    """A fixture corpus uploaded to a fresh bucket: (local root, s3 root, expected)."""
    _aws_env(monkeypatch, tmp_path, moto_endpoint)
    local = tmp_path / "LibriSpeech"
    expected = make_corpus(local)
    uri = f"s3://corpus-{next(_buckets)}/LibriSpeech"
    report = upload_corpus(local, uri, create_bucket=True)
    assert report.uploaded == len(expected) + len(CORPUS) and report.unchanged == 0
    return local, uri, expected


def test_s3_manifest_audio_and_cache(s3_corpus, tmp_path, monkeypatch):
    local, uri, expected = s3_corpus
    cache = tmp_path / "cache"
    calls = []
    real_info = sf.info
    monkeypatch.setattr(sf, "info", lambda *a, **k: calls.append(a[0]) or real_info(*a, **k))
    events = s3_mod.get_client().meta.events
    gets = []
    counter = lambda **kw: gets.append(kw["params"]["Key"])  # noqa: E731
    events.register("before-parameter-build.s3.GetObject", counter)
    try:
        m = load_manifest(uri, "dev-clean", cache_dir=cache)
        local_m = load_manifest(local, "dev-clean", cache_dir=tmp_path / "local-cache")
        assert [(u.id, u.duration, u.text, u.speaker) for u in m.utterances] == [
            (u.id, u.duration, u.text, u.speaker) for u in local_m.utterances
        ]
        assert all(u.path.startswith(f"{uri}/dev-clean/") for u in m.utterances)
        assert len(gets) == len(expected) + len(CORPUS)  # every object fetched once
        assert not list(cache.rglob("*.part"))

        gets.clear()
        calls.clear()
        again = load_manifest(uri, "dev-clean", cache_dir=cache)
        assert again.from_cache and again.utterances == m.utterances
        assert gets == [] and calls == []  # one listing, no download, no header read

        u = m.utterances[0]
        wave = load_audio(u.path, cache_dir=cache)
        assert gets == []  # the manifest build already cached it
        local_path = local / "dev-clean" / u.path.split("/dev-clean/")[1]
        assert torch.equal(wave, load_audio(local_path))

        # A fresh cache downloads once, then hits.
        fresh = tmp_path / "fresh"
        load_audio(u.path, cache_dir=fresh)
        load_audio(u.path, cache_dir=fresh)
        assert len(gets) == 1

        # Re-uploading sends nothing; an added utterance rebuilds the manifest.
        assert upload_corpus(local, uri).uploaded == 0
        folder = local / "dev-clean" / "26" / "495"
        sf.write(folder / "26-495-0005.flac", tone(0.4), 16000)
        with open(folder / "26-495.trans.txt", "a") as f:
            f.write("26-495-0005 NEW\n")
        assert upload_corpus(local, uri).uploaded == 2
        gets.clear()
        third = load_manifest(uri, "dev-clean", cache_dir=cache)
        assert not third.from_cache and "26-495-0005" in {x.id for x in third.utterances}
        assert sorted(k.rsplit("/", 1)[1] for k in gets) == ["26-495-0005.flac", "26-495.trans.txt"]
    finally:
        events.unregister("before-parameter-build.s3.GetObject", counter)


def test_s3_missing_prefix_bucket_and_subset(s3_corpus, tmp_path):
    _, uri, _ = s3_corpus
    bucket = split_s3_uri(uri)[0]
    with pytest.raises(CorpusError) as err:
        load_manifest(f"s3://{bucket}/NoSuchPrefix", "dev-clean", cache_dir=tmp_path)
    text = one_line(err.value)
    assert f"s3://{bucket}/NoSuchPrefix does not exist" in text and "upload" in text

    with pytest.raises(CorpusError) as err:
        load_manifest("s3://no-such-bucket-here/LibriSpeech", "dev-clean", cache_dir=tmp_path)
    text = one_line(err.value)
    assert "bucket 'no-such-bucket-here' does not exist" in text and "AWS_ENDPOINT_URL" in text

    with pytest.raises(CorpusError) as err:
        load_manifest(uri, "train-clean-100", cache_dir=tmp_path)
    assert "'train-clean-100' not found" in one_line(err.value) and "existing subsets: dev-clean" in str(err.value)


def test_s3_wrong_credentials(s3_corpus, tmp_path, monkeypatch):
    from moto.core.authorization import enable_iam_authentication

    _, uri, _ = s3_corpus
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with enable_iam_authentication(), pytest.raises(CorpusError) as err:
        load_manifest(uri, "dev-clean", cache_dir=tmp_path)
    text = one_line(err.value)
    bucket = split_s3_uri(uri)[0]
    assert f"bucket '{bucket}'" in text and "InvalidAccessKeyId" in text
    assert "AWS_ACCESS_KEY_ID" in text and "AWS_SECRET_ACCESS_KEY" in text


def test_s3_missing_credentials(monkeypatch, tmp_path, moto_endpoint):
    _aws_env(monkeypatch, tmp_path, moto_endpoint)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(CorpusError) as err:
        load_manifest("s3://some-bucket/LibriSpeech", "dev-clean", cache_dir=tmp_path)
    text = one_line(err.value)
    assert "no AWS credentials" in text and "some-bucket" in text and "AWS_ACCESS_KEY_ID" in text


def test_s3_unreachable_endpoint_fails_fast(monkeypatch, tmp_path):
    _aws_env(monkeypatch, tmp_path, f"http://127.0.0.1:{free_port()}")  # nothing listens there
    start = time.monotonic()
    with pytest.raises(CorpusError) as err:
        load_manifest("s3://some-bucket/LibriSpeech", "dev-clean", cache_dir=tmp_path)
    assert time.monotonic() - start < 15
    text = one_line(err.value)
    assert "cannot reach" in text and "some-bucket" in text and "AWS_ENDPOINT_URL" in text
    with pytest.raises(CorpusError, match="cannot reach"):
        load_audio("s3://some-bucket/a.flac", cache_dir=tmp_path)


# -- command line --------------------------------------------------------------------------------


def test_cli_manifest_prints_counts(corpus, tmp_path, capsys):
    root, expected = corpus
    assert main(["manifest", str(root), "dev-clean", "--cache-dir", str(tmp_path), "--min-duration", "0.4"]) == 0
    out = capsys.readouterr().out
    assert "utterances: 3 " in out and "2 speakers" in out and "1 too short" in out and "(built)" in out


@pytest.mark.parametrize(
    "argv",
    [
        ["manifest", "/no/such/corpus", "dev-clean"],
        ["upload", "/no/such/corpus", "s3://b/p"],
        ["upload", ".", "/not/s3"],
    ],
)
def test_cli_errors_are_one_line_exit_2(argv, tmp_path, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_cli_upload_then_manifest(moto_endpoint, monkeypatch, tmp_path, capsys):
    _aws_env(monkeypatch, tmp_path, moto_endpoint)
    local = tmp_path / "corpus"
    make_corpus(local, subset="train")
    uri = f"s3://cli-{next(_buckets)}/synthetic"
    assert main(["upload", str(local), uri]) == 2  # no bucket yet: says how to create it
    assert "--create-bucket" in capsys.readouterr().err
    assert main(["upload", str(local), uri, "--create-bucket"]) == 0
    assert "uploaded 6 file(s)" in capsys.readouterr().out
    assert main(["manifest", uri, "train", "--cache-dir", str(tmp_path / "c")]) == 0
    assert "utterances: 4 " in capsys.readouterr().out

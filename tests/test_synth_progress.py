"""Corpus generation is not silent: progress lines with count/total, rate and ETA."""

from __future__ import annotations

import re

from orchestrator.data.synth import _Progress, generate_corpus


def test_progress_line_has_count_rate_and_eta(capsys) -> None:
    meter = _Progress(200, enabled=True, every_s=0.0)
    meter.update(50)
    meter.update(200, final=True)
    lines = capsys.readouterr().err.splitlines()
    assert re.fullmatch(r"synth: 50/200 utterances \(25%\), [\d.]+ utt/s, ETA \d+ s", lines[0])
    assert re.fullmatch(r"synth: 200/200 utterances \(100%\), [\d.]+ utt/s, done in \d+ s", lines[1])
    quiet = _Progress(10, enabled=False, every_s=0.0)
    quiet.update(5, final=True)
    assert capsys.readouterr().err == ""


def test_generation_reports_while_shards_run(tmp_path, capsys, monkeypatch) -> None:
    import orchestrator.data.synth as synth

    monkeypatch.setattr(synth, "PROGRESS_EVERY_S", 0.05)
    generate_corpus(tmp_path / "c", seed=0, sizes={"train-clean-100": 24, "dev-clean": 2, "test-clean": 2},
                    workers=2, progress=True)
    err = capsys.readouterr().err
    counts = [int(m) for m in re.findall(r"^synth: (\d+)/28 utterances", err, re.M)]
    assert len(counts) >= 3 and counts == sorted(counts) and counts[-1] == 28, err
    assert re.search(r"^synth: 28/28 utterances \(100%\), [\d.]+ utt/s, done in \d+ s$", err, re.M), err

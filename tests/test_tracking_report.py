"""MLflow tracking layer (real SQLite store) and the sweep report."""

from __future__ import annotations

import math

import pytest

from orchestrator.report import markdown_table, pareto_front, sort_rows, write_report
from orchestrator.tracking import Tracker, TrackingError, flatten_params, redact_uri


@pytest.fixture()
def tracker(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact folder is ./mlruns
    return Tracker.open(f"sqlite:///{tmp_path / 'mlflow.db'}", "unit")


def test_runs_are_found_again_not_duplicated(tracker):
    parent = tracker.sweep_run("sweep-1", "sweep-1")
    assert tracker.sweep_run("sweep-1", "sweep-1") == parent
    child = tracker.trial_run(parent, "sweep-1/t0", "trial-t0")
    assert tracker.trial_run(parent, "sweep-1/t0", "trial-t0") == child
    other = tracker.trial_run(parent, "sweep-1/t1", "trial-t1")
    assert other != child
    assert {r.info.run_id for r in tracker.children(parent)} == {child, other}


def test_params_logged_once_and_changes_refused(tracker):
    parent = tracker.sweep_run("s", "s")
    run = tracker.trial_run(parent, "s/t", "t")
    tracker.log_params(run, {"model": {"plan": "pom", "dims": [1, 2]}})
    tracker.log_params(run, {"model": {"plan": "pom"}})  # same value again: fine
    with pytest.raises(TrackingError, match="model.plan"):
        tracker.log_params(run, {"model": {"plan": "mha"}})
    assert tracker.client.get_run(run).data.params == {"model.plan": "pom", "model.dims": "[1, 2]"}


def test_unreachable_server_is_one_clear_error():
    with pytest.raises(TrackingError) as info:
        Tracker.open("http://127.0.0.1:9", "x")
    assert "start the server" in str(info.value) and "\n" not in str(info.value)


def test_redact_and_flatten():
    assert redact_uri("postgresql+psycopg2://mlflow:s3cret@127.0.0.1:5432/db") == "postgresql+psycopg2://mlflow:***@127.0.0.1:5432/db"
    assert flatten_params({"a": {"b": 1, "c": {"d": "x"}}}) == {"a.b": "1", "a.c.d": "x"}


def test_pareto_front():
    points = [(1.0, 0.5), (2.0, 0.4), (3.0, 0.45), (0.5, 0.9), (math.nan, 0.1)]
    assert pareto_front(points) == [3, 0, 1]


def test_report_from_mlflow(tracker, tmp_path):
    parent = tracker.sweep_run("s", "s")
    for i, (wer, mem, status) in enumerate([(0.4, 10.0, "FINISHED"), (0.2, 30.0, "FINISHED"), (math.nan, 5.0, "FAILED")]):
        run = tracker.trial_run(parent, f"s/t{i}", f"t{i}")
        tracker.log_params(run, {"sampled": {"model.attention_layers": i}})
        tracker.set_tags(run, {"layer_plan": f"{i}xmha_relpos+{4 - i}xpom"})
        metrics = {"encoder_peak_mem_mb": mem, "encoder_time_s": 0.1 * (i + 1), "params": 1e6}
        if not math.isnan(wer):
            metrics.update({"dev_wer": wer, "test/test-clean/wer": wer + 0.01, "test/test-clean/wer_ci_low": wer,
                            "test/test-clean/wer_ci_high": wer + 0.02})
        tracker.log_metrics(run, metrics)
        if status == "FAILED":
            tracker.set_tags(run, {"failure_reason": "loss became NaN"})
        tracker.finish(run, status)
    rows = write_report(tracker, parent, tmp_path / "report", objectives=[("dev_wer", "min")], quiet=True)
    assert [r["metrics"].get("dev_wer") for r in rows][:2] == [0.2, 0.4]
    text = (tmp_path / "report" / "report.md").read_text()
    assert "1xmha_relpos+3xpom" in text and "test-clean WER" in text and "loss became NaN" in text
    assert (tmp_path / "report" / "dev_wer_vs_encoder_peak_mem_mb.png").stat().st_size > 1000
    artifacts = {a.path for a in tracker.client.list_artifacts(parent, "report")}
    assert "report/report.md" in artifacts
    assert "| 1 |" in markdown_table(sort_rows(rows, "dev_wer", "min"), "dev_wer")


def test_trials_stopped_early_are_closed_with_their_last_objective(tracker, tmp_path):
    """ASHA stops a trial from outside: its run must not stay RUNNING, and keeps the WER Tune saw."""
    from types import SimpleNamespace

    from orchestrator.report import mark_stopped_trials

    parent = tracker.sweep_run("s", "s")
    done = tracker.trial_run(parent, "s/aaa", "aaa")
    tracker.log_metrics(done, {"dev_wer": 0.5})
    tracker.finish(done, "FINISHED")
    stopped = tracker.trial_run(parent, "s/bbb", "bbb")
    results = [SimpleNamespace(metrics={"trial_id": "aaa", "dev_wer": 0.5, "training_iteration": 4}),
               SimpleNamespace(metrics={"trial_id": "bbb", "dev_wer": 0.9, "finetune_step": 50, "training_iteration": 2})]
    assert mark_stopped_trials(tracker, parent, results, ["dev_wer"], "ASHA") == ["s/bbb"]
    run = tracker.client.get_run(stopped)
    assert run.info.status == "KILLED" and run.data.metrics["dev_wer"] == 0.9
    assert run.data.tags["stopped_early"] == "ASHA at iteration 2"
    assert tracker.client.get_run(done).info.status == "FINISHED"
    assert mark_stopped_trials(tracker, parent, results, ["dev_wer"], "ASHA") == []  # idempotent
    rows = write_report(tracker, parent, tmp_path / "report", objectives=[("dev_wer", "min")], quiet=True)
    assert sorted(r["status"] for r in rows) == ["FINISHED", "STOPPED"]
    text = (tmp_path / "report" / "report.md").read_text()
    assert "1 stopped early" in text and "STOPPED: ASHA at iteration 2" in text


# -- MLflow as a researcher sees it ----------------------------------------------------------------


def test_experiment_opens_as_model_training(tmp_path):
    """MLflow 3 shows an experiment without the kind tag as GenAI; ours must be model training."""
    from mlflow.tracking import MlflowClient

    from orchestrator.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker.open(uri, "fresh")
    client = MlflowClient(tracking_uri=uri)
    assert client.get_experiment(tracker.experiment_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    old = client.create_experiment("made-before")  # an experiment from before the tag existed
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(old).tags
    assert Tracker.open(uri, "made-before").experiment_id == old
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"


def test_trial_runs_are_named_by_plan_and_short_id(tracker):
    from orchestrator.tracking import trial_run_name

    name = trial_run_name("2xmha_relpos+2xpom(k3,D2)", "sweep-1/abc_00001")
    plan, short = name.split(" · ")
    assert plan == "2xmha_relpos+2xpom(k3,D2)" and len(short) == 6
    assert trial_run_name("2xmha_relpos+2xpom(k3,D2)", "sweep-1/abc_00001") == name  # stable on restart
    assert trial_run_name("2xmha_relpos+2xpom(k3,D2)", "sweep-1/abc_00002") != name
    parent = tracker.sweep_run("sweep-1", "sweep-1")
    run = tracker.trial_run(parent, "sweep-1/abc_00001", "trial-abc_00001")
    tracker.set_run_name(run, name)
    assert tracker.client.get_run(run).info.run_name == name
    assert tracker.trial_run(parent, "sweep-1/abc_00001", "other") == run
    assert tracker.client.get_run(run).info.run_name == name


def test_description_holds_markdown_and_is_cut_to_mlflow_limit(tracker):
    from orchestrator.tracking import MAX_TAG_LENGTH, NOTE_TAG

    parent = tracker.sweep_run("s", "s")
    tracker.set_description(parent, "| a | b |\n|---|---|\n| 1 | 2 |")
    assert tracker.client.get_run(parent).data.tags[NOTE_TAG].startswith("| a | b |")
    tracker.set_description(parent, "\n".join(f"| row {i} | {'x' * 50} |" for i in range(400)))
    note = tracker.client.get_run(parent).data.tags[NOTE_TAG]
    assert len(note) <= MAX_TAG_LENGTH and note.endswith("(cut: see report/report.md)")


# -- significance, replicates and the time breakdown, from MLflow alone --------------------------

WORDS = ["ALPHA", "BRAVO", "CHARLIE", "DELTA", "ECHO", "FOXTROT"]


def _records(tmp_path, name: str, subset: str, n: int, wrong_every: int | None, start: int = 0):
    """A ``<subset>.tsv`` like the evaluation writes; every ``wrong_every``-th utterance has one substituted word."""
    import random

    rng = random.Random(subset)
    lines = ["id\tword_errors\twords\treference\thypothesis"]
    for i in range(start, start + n):
        ref = [rng.choice(WORDS) for _ in range(4)]
        hyp = list(ref)
        if wrong_every and i % wrong_every == 0:
            hyp[0] = "ZULU"
        lines.append(f"utt-{i:04d}\t{int(hyp != ref)}\t{len(ref)}\t{' '.join(ref)}\t{' '.join(hyp)}")
    folder = tmp_path / name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{subset}.tsv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def _sweep_with_records(tracker, tmp_path):
    """Four finished trials: the best, an identical twin (other seed), a clearly worse one, one on other utterances."""
    from orchestrator.tracking import trial_run_name

    parent = tracker.sweep_run("s", "s")
    trials = [  # plan, sampled, seed, wrong_every (None = perfect), dev_wer, utterance offset
        ("2xmha_relpos+2xpom(k3,D2)", 2, 0, 10, 0.10, 0),
        ("2xmha_relpos+2xpom(k3,D2)", 2, 1, 10, 0.11, 0),
        ("4xpom(k3,D2)", 0, 0, 1, 0.60, 0),
        ("1xmha_relpos+3xpom(k3,D2)", 1, 0, 10, 0.30, 500),
    ]
    for i, (plan, layers, seed, wrong, dev_wer, start) in enumerate(trials):
        key = f"s/t{i}"
        run = tracker.trial_run(parent, key, f"t{i}")
        tracker.set_run_name(run, trial_run_name(plan, key))
        tracker.log_params(run, {"sampled": {"model.attention_layers": layers, "seed": seed},
                                 "config": {"data": {"dev_subsets": ["dev-clean"]}}})
        tracker.set_tags(run, {"layer_plan": plan})
        folder = _records(tmp_path / "eval", f"t{i}", "dev-clean", 150, wrong, start)
        _records(tmp_path / "eval", f"t{i}", "test-clean", 150, wrong, start)
        tracker.log_eval_records(run, folder)
        tracker.log_metrics(run, {"dev_wer": dev_wer, "dev_cer": dev_wer / 2, "test_wer": dev_wer,
                                  "test/test-clean/wer": dev_wer, "test/test-clean/wer_ci_low": dev_wer - 0.01,
                                  "test/test-clean/wer_ci_high": dev_wer + 0.01, "params": 1e6,
                                  "time/startup_s": 5.0, "time/pretrain_s": 40.0, "time/handoff_s": 2.0,
                                  "time/finetune_s": 40.0, "time/eval_s": 8.0, "time/profile_s": 3.0,
                                  "time/total_s": 100.0})
        tracker.finish(run, "FINISHED")
    return parent


def test_report_tests_every_trial_against_the_best(tracker, tmp_path):
    from orchestrator.tracking import NOTE_TAG

    parent = _sweep_with_records(tracker, tmp_path)
    rows = write_report(tracker, parent, tmp_path / "report", objectives=[("dev_wer", "min")], quiet=True,
                        bootstrap_samples=500)
    by_plan_seed = {(r["plan"], r["seed"]): r for r in rows}
    twin = by_plan_seed[("2xmha_relpos+2xpom(k3,D2)", "1")]["vs_best"]
    for split in ("dev", "test"):
        assert twin[split]["wer"].difference == 0.0 and not twin[split]["wer"].significant
    worse = by_plan_seed[("4xpom(k3,D2)", "0")]["vs_best"]
    assert worse["test"]["wer"].significant and worse["test"]["wer"].low > 0
    assert worse["test"]["cer"].significant
    other = by_plan_seed[("1xmha_relpos+3xpom(k3,D2)", "0")]
    assert "not scored on the same utterances" in other["vs_best_error"]

    text = (tmp_path / "report" / "report.md").read_text()
    opening = text.split("\n\n")[1]
    assert opening.startswith("Best by dev_wer: ")
    assert "it beats 4xpom(k3,D2) by 22.5 WER points" in opening and "(dev_wer 0.105 ± 0.007 over 2 seeds" in opening
    assert "Δ test WER vs best" in text and "| best |" in text and " *" in text
    assert "## Not compared" in text and "1xmha_relpos+3xpom(k3,D2)" in text
    assert "| 2xmha_relpos+2xpom(k3,D2) | model.attention_layers=2 | 0, 1 |" in text and "(n=2)" in text
    assert "training + evaluation (pre-train, fine-tune, eval) is 88.0% of it" in text
    assert "| handoff | 8.0 | 2.0% |" in text
    assert f"#/experiments/{tracker.experiment_id}/runs?workflowType=machine_learning&orderByKey=metrics.%60dev_wer%60" in text
    note = tracker.client.get_run(parent).data.tags[NOTE_TAG]
    assert note.startswith("Best by dev_wer") and "| # | run | mixer plan |" in note
    rows_again = write_report(tracker, parent, tmp_path / "again", objectives=[("dev_wer", "min")], quiet=True,
                              bootstrap_samples=500)
    assert [r["vs_best"] for r in rows_again] == [r["vs_best"] for r in rows]  # seeded: same intervals


def test_report_command_from_mlflow_alone(tracker, tmp_path, capsys):
    from orchestrator.report import main

    _sweep_with_records(tracker, tmp_path)
    code = main(["s", "--tracking-uri", tracker.uri, "--experiment", "unit", "--out", str(tmp_path / "cli"),
                 "--bootstrap-samples", "200"])
    out = capsys.readouterr().out
    assert code == 0 and out.startswith("Best by dev_wer")
    assert "Δtest WER" in out and "* = the 95% paired-bootstrap CI excludes 0" in out
    assert (tmp_path / "cli" / "report.md").is_file()


def test_headline_without_records_or_finished_trials():
    from orchestrator.report import headline

    row = {"status": "FINISHED", "plan": "4xpom(k3,D2)", "name": "4xpom(k3,D2) · abcdef", "metrics": {"dev_wer": 0.5}}
    text = headline([row], None, "dev_wer")
    assert text.startswith("Best by dev_wer: 4xpom(k3,D2) (dev_wer 0.500)") and "no per-utterance records" in text
    failed = {**row, "status": "FAILED"}
    assert headline([failed], None, "dev_wer").startswith("No trial finished")

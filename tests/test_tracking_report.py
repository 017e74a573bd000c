"""MLflow tracking layer (real SQLite store) and the sweep report."""

from __future__ import annotations

import math

import pytest

from orchestrator.report import markdown_table, pareto_front, sort_rows, write_report
from orchestrator.tracking import Tracker, TrackingError, flatten_params, redact_uri


@pytest.fixture()
def tracker(tmp_path):
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

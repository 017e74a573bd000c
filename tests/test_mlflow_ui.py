"""The MLflow UI as a researcher opens it: a real ``mlflow server`` and headless Chromium.

The sweep's runs (a parent and its trials, made with :class:`Tracker` as the sweep makes them)
must be on the rendered experiment page that the report links to: the model-training runs
table, with every trial on its own row under its plan-and-id name.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from orchestrator.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, Tracker, experiment_page_url, trial_run_name
from tests.conftest import free_port

pytestmark = pytest.mark.slow

PLANS = ("2xmha_relpos+2xpom(k3,D2)", "1xmha_relpos+3xpom(k3,D2)", "4xpom(k3,D2)")


def _require(what: str, present: bool) -> None:
    # Skipped on a laptop without it; in CI (`make test` installs it) a missing one is a failure.
    if not present:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(what)


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 90.0) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"mlflow server not healthy after {timeout_s} s: {log.read_text()[-2000:]}")


def _dump_dom(chromium: str, url: str, profile: Path) -> str:
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
           "--virtual-time-budget=30000", "--dump-dom", url]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_experiment_page_lists_the_sweep_runs(tmp_path, monkeypatch):
    chromium = shutil.which("chromium")
    _require("chromium is not installed (make system-deps: apt-get install -y chromium)", chromium is not None)
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact folder is ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker.open(uri, "hybrid-ui")
    parent = tracker.sweep_run("ui-sweep-1", "hybrid-ui-sweep-1")
    names = []
    for i, plan in enumerate(PLANS):
        key = f"ui-sweep-1/trial_{i:05d}"
        run = tracker.trial_run(parent, key, f"trial-{i}")
        names.append(trial_run_name(plan, key))
        tracker.set_run_name(run, names[-1])
        tracker.set_tags(run, {"layer_plan": plan})
        tracker.log_metrics(run, {"dev_wer": 0.3 + 0.1 * i})
        tracker.finish(run)
    tracker.set_description(parent, "| # | run |\n|---|---|\n" + "\n".join(f"| {i} | {n} |" for i, n in enumerate(names)))
    tracker.finish(parent)
    experiment = tracker.client.get_experiment(tracker.experiment_id)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--default-artifact-root",
             str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True,
        )
    try:
        _wait_healthy(base, server, log)
        url = experiment_page_url(base, tracker.experiment_id, order_by_metric="dev_wer")
        dom = _dump_dom(chromium, url, tmp_path / "chromium-profile")
        assert "Model training" in dom and ">Runs<" in dom, dom[-3000:]
        for name in ["hybrid-ui-sweep-1", *names]:
            assert name in dom, f"{name!r} is not on the rendered page {url}"
        assert dom.index(names[0]) < dom.index(names[1]) < dom.index(names[2])  # sorted by dev_wer
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its uvicorn worker
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)

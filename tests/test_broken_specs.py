"""Broken specs and run files: each is one line naming the file (or the --set) and the key, exit
code 2, in seconds, with nothing generated or started; and the two config traps of issue 9."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from orchestrator.errors import SpecError, UserError
from orchestrator.spec import load_spec
from orchestrator.train.config import load_run_config

REPO = Path(__file__).resolve().parent.parent


def spec_dict(tmp: Path, **sections) -> dict:
    """A small valid spec on the embedded demo preset, writing only under ``tmp``."""
    data = {
        "sweep": {"name": "bs", "num_trials": 1, "sampler": "grid", "scheduler": {"type": "fifo"}},
        "search": {"finetune.head_lr": {"values": [0.001]}},
        "preset": "demo",
        "data": {"root": str(tmp / "synth"), "cache_dir": str(tmp / "cache")},
        "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "bs"},
        "storage": {"path": str(tmp / "runs")},
    }
    data.update(sections)
    return data


def write(tmp: Path, data, name: str = "spec.yaml") -> Path:
    path = tmp / name
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def sweep_cli(tmp: Path, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "orchestrator.sweep", *args], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=timeout)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


# ------------------------------------------------------------------------------ the spec loader


@pytest.mark.parametrize(
    ("sections", "key", "fragment"),
    [
        ({"model": {"param_budget": 1}}, "model.param_budget", "below the smallest model"),
        ({"model": {"param_budget": 1e13}}, "model.param_budget", "more than this plan reaches"),
        ({"tracking": {"uri": "ftp://example.org/mlflow"}}, "tracking.uri", "is not a tracking URI MLflow can use"),
        ({"storage": {"path": "gs://bucket/x"}}, "storage.path", "neither a folder nor s3://"),
        ({"data": {"root": "gs://bucket/LibriSpeech"}}, "data.root", "neither a folder nor s3://"),
        ({"sweep": {"name": "bs", "objective": "pretrain_loss"}}, "sweep.objective.metric", "allowed: dev_wer"),
        ({"sweep": {"name": "bs", "extra_objectives": [{"metric": "finetune_loss"}], "scheduler": {"type": "fifo"}}},
         "sweep.extra_objectives[0].metric", "is not a metric a trial reports"),
        ({"sweep": {"name": "bs", "num_trials": 3.0}}, "sweep.num_trials", "expected an integer, got float 3.0"),
        ({"pretrain": {"steps": 3.0}}, "pretrain.steps", "expected an integer, got float 3.0"),
        ({"sweep": {"name": "bs", "objective": "encoder_time_s"}, "profile": {"enabled": False}}, "sweep.objective",
         "only measured with profile.enabled: true"),
    ],
)
def test_broken_spec_is_one_line_naming_file_and_key(tmp_path, sections, key, fragment):
    path = write(tmp_path, spec_dict(tmp_path, **sections))
    start = time.monotonic()
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {key}: ") and fragment in message and "\n" not in message, message
    assert time.monotonic() - start < 30
    assert not (tmp_path / "synth").exists() and not (tmp_path / "runs").exists()


def test_objective_list_is_what_trials_report():
    """Trap 2: the objectives a spec may name are the metric list every trial reports."""
    from orchestrator.metrics import OBJECTIVE_METRICS

    assert "pretrain_loss" not in OBJECTIVE_METRICS and "finetune_loss" not in OBJECTIVE_METRICS
    worker = (REPO / "orchestrator" / "worker.py").read_text() + (REPO / "orchestrator" / "trial_driver.py").read_text()
    profile = (REPO / "orchestrator" / "profile.py").read_text()
    for metric in OBJECTIVE_METRICS:  # every name is written by the trial's code (test_wer: "test_{key}")
        assert f'"{metric}"' in worker + profile or metric in ("test_wer", "test_cer"), metric
    assert 'f"test_{key}"' in worker


def test_unknown_objective_fails_the_dry_run(tmp_path):
    path = write(tmp_path, spec_dict(tmp_path, sweep={"name": "bs", "objective": {"metric": "pretrain_loss"}}))
    line = one_error_line(sweep_cli(tmp_path, str(path), "--dry-run"))
    assert line.startswith(f"error: {path}: sweep.objective.metric: 'pretrain_loss' is not a metric a trial reports; allowed: ")


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\xff\xfe", "not a text file"),
        ("sweep: {name: a}\nsearch: {pretrain.lr: {values: [0.1]}}\nsweep: {name: b}\n", "found the key 'sweep' twice"),
        ("search:\n  pretrain.lr: {values: [0.1], values: [0.2]}\n", "found the key 'values' twice"),
    ],
)
def test_unreadable_spec_files(tmp_path, content, fragment):
    path = write(tmp_path, content)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and fragment in message and "\n" not in message, message


def test_binary_spec_through_the_cli(tmp_path):
    path = write(tmp_path, bytes(range(256)) * 4)
    line = one_error_line(sweep_cli(tmp_path, str(path)))
    assert line.startswith(f"error: {path}: not a text file")


def test_bad_set_is_named(tmp_path):
    path = write(tmp_path, spec_dict(tmp_path))
    with pytest.raises(SpecError, match=r"^--set sweep\.num_trials=0: sweep\.num_trials: must be >= 1, got 0$"):
        load_spec(path, ["sweep.max_failures=1", "sweep.num_trials=0"])
    with pytest.raises(SpecError, match=r"^--set model\.encoder\.conv_kernel=4: model: encoder\.conv_kernel must be an odd"):
        load_spec(path, ["model.encoder.conv_kernel=4"])
    own = write(tmp_path, spec_dict(tmp_path, sweep={"name": "bs", "num_trials": 0}), "own.yaml")
    with pytest.raises(SpecError, match=rf"^{re.escape(str(own))}: sweep\.num_trials: must be >= 1"):  # the file's own key
        load_spec(own, ["sweep.seed=1"])
    with pytest.raises(SpecError, match=r"^--set 'sweep\.num_trials=\[': the value is not valid YAML"):
        load_spec(path, ["sweep.num_trials=["])
    with pytest.raises(SpecError, match=r"^--set sweep\.name\.x=1: sweep\.name\.x: sweep\.name holds a value"):
        load_spec(path, ["sweep.name.x=1"])


# ------------------------------------------------------------------------------ the run CLI


def test_run_cli_bad_values_are_one_line(tmp_path, capsys):
    from orchestrator.run import main

    assert main(["pretrain", "--set", "pretrain.steps=3.0", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --set pretrain.steps=3.0: pretrain.steps: expected an integer, got float 3.0"
    config = tmp_path / "c.yaml"
    config.write_text("pretrain: {steps: 5}\npretrain: {steps: 6}\n")
    assert main(["pretrain", "--config", str(config)]) == 2
    assert "found the key 'pretrain' twice" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------ resources


def test_impossible_resources_refused_before_the_corpus(tmp_path):
    path = write(tmp_path, spec_dict(tmp_path, resources={"workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 1000}))
    start = time.monotonic()
    line = one_error_line(sweep_cli(tmp_path, str(path)))
    assert line.startswith(f"error: {path}: resources.gpus_per_worker=1000: no node of this machine has 1000 GPUs"), line
    assert time.monotonic() - start < 60
    assert not (tmp_path / "synth").exists(), "the corpus was generated before the resources were checked"
    assert not (tmp_path / "runs").exists()
    line = one_error_line(sweep_cli(tmp_path, str(path), "--set", "resources.workers=64", "--set", "resources.gpus_per_worker=0"))
    assert line.startswith("error: --set resources.workers=64: resources.workers=64: this machine fits "), line


def test_resources_against_cluster_nodes(tmp_path):
    from orchestrator.preflight import PreflightError, check_resources

    spec = load_spec(write(tmp_path, spec_dict(tmp_path, resources={"workers": 3, "cpus_per_worker": 2})))
    nodes = [{"CPU": 4.0, "GPU": 0.0}, {"CPU": 2.0}]
    check_resources(spec, nodes, "the Ray cluster")  # 2 + 1 workers of 2 CPUs
    with pytest.raises(PreflightError, match=r"resources\.workers=3: the Ray cluster fits 2 worker\(s\)"):
        check_resources(spec, [{"CPU": 4.0}], "the Ray cluster")
    with pytest.raises(PreflightError, match=r"resources\.cpus_per_worker=2: no node of the Ray cluster has 2 CPUs"):
        check_resources(spec, [{"CPU": 1.0}] * 8, "the Ray cluster")
    assert issubclass(PreflightError, UserError)
    pinned = load_spec(write(tmp_path, spec_dict(tmp_path, resources={"driver": {"on_demand": 0.01}}), "pinned.yaml"))
    with pytest.raises(PreflightError, match=r"resources\.driver\.on_demand=0\.01: no node of this machine has it"):
        check_resources(pinned, [{"CPU": 2.0}], "this machine")
    check_resources(pinned, [{"CPU": 2.0}, {"CPU": 1.0, "on_demand": 1.0}], "the Ray cluster")


# ------------------------------------------------------------------------------ trap 1


def test_model_section_keeps_the_run_presets_model(tmp_path):
    """``--set model.encoder.dropout_p=0.2`` and ``model: {encoder: ...}`` keep the tiny model (d128 x 4)."""
    plain = load_run_config(None)
    changed = load_run_config(None, ["model.encoder.dropout_p=0.2"])
    dims = lambda c: (c.model.encoder.model_dim, c.model.encoder.num_layers)  # noqa: E731
    assert dims(plain) == dims(changed) == (128, 4) and changed.model.encoder.dropout_p == 0.2
    spec = load_spec(write(tmp_path, spec_dict(tmp_path, model={"encoder": {"dropout_p": 0.2}})))
    demo = load_spec(write(tmp_path, spec_dict(tmp_path), "plain.yaml"))
    assert dims(spec.base) == dims(demo.base) == (128, 4) and spec.base.model.encoder.dropout_p == 0.2
    assert spec.base.model.frontend == demo.base.model.frontend  # the demo preset's front-end is kept


def test_run_presets_and_model_presets_do_not_share_names():
    from models.config import PRESETS as MODEL_PRESETS
    from orchestrator.train.presets import RUN_PRESETS

    assert not set(MODEL_PRESETS) & set(RUN_PRESETS)
    with pytest.raises(UserError, match=r"preset: 'tiny' is not a run preset \('tiny' is a model preset: set model\.preset\)"):
        load_run_config(None, ["preset=tiny"])


# ------------------------------------------------------------------------------ README examples


def test_readme_search_example_runs_as_written(tmp_path):
    """The README's search block (with ``when: {model.plan: pom}`` on a fixed run value) loads."""
    readme = (REPO / "README.md").read_text()
    block = re.search(r"```yaml\n(search:\n.*?)```", readme, re.S).group(1)
    search = yaml.safe_load(block)["search"]
    assert "model.plan_options.degree" in search
    data = spec_dict(tmp_path, search=search, model={"plan": "pom", "attention_layers": 1},
                     sweep={"name": "bs", "num_trials": 2})
    spec = load_spec(write(tmp_path, data))
    degree = next(p for p in spec.search if p.path == "model.plan_options.degree")
    assert degree.when == ()  # decided at load: model.plan is pom in every trial
    # on an attention plan the condition never holds: the parameter is not sampled
    data["model"] = {"plan": "mha_relpos"}
    spec = load_spec(write(tmp_path, data, "mha.yaml"))
    assert "model.plan_options.degree" not in {p.path for p in spec.search}
    # still a condition on another search parameter when model.plan is searched
    data["search"] = {**search, "model.plan": {"values": ["pom", "mha_relpos"]}}
    spec = load_spec(write(tmp_path, data, "both.yaml"))
    degree = next(p for p in spec.search if p.path == "model.plan_options.degree")
    assert degree.when == (("model.plan", ("pom",)),)


def test_when_on_an_unknown_path(tmp_path):
    data = spec_dict(tmp_path, search={"pretrain.lr": {"values": [0.1], "when": {"model.nothing": 2}}})
    with pytest.raises(SpecError, match=r"search\.pretrain\.lr\.when\.model\.nothing: no search parameter and no run value"):
        load_spec(write(tmp_path, data))


def test_max_failures_defaults_to_surviving_a_node():
    from orchestrator.spec import DEFAULT_MAX_FAILURES

    for path in sorted((REPO / "search_spaces").glob("*.yaml")):
        spec = load_spec(path, check_run=False)
        assert spec.sweep.max_failures == DEFAULT_MAX_FAILURES >= 1, path


def test_trials_start_from_the_resolved_run(tmp_path):
    """The run preset is applied once, when the sweep starts: the trials' sections name no preset."""
    from orchestrator.spec import build_run_config
    from orchestrator.tuner import absolute_run

    spec = load_spec(write(tmp_path, spec_dict(tmp_path, model={"plan": "pom", "attention_layers": 1})))
    run = absolute_run(spec)
    assert "preset" not in run and run["model"]["preset"] == "tiny" and run["pretrain"]["steps"] == 200
    assert build_run_config(run, {}) == build_run_config(spec.run, {}, source=spec.source) == spec.base
    assert build_run_config(run, {"finetune.head_lr": 0.003}).finetune.head_lr == 0.003


def test_resources_checked_against_a_live_ray_cluster(tmp_path):
    """With --address the check reads the live nodes of the cluster (here a 1-CPU Ray), before the corpus."""
    import shutil
    import tempfile

    import ray

    from orchestrator.preflight import PreflightError, preflight, ray_nodes

    spec = load_spec(write(tmp_path, spec_dict(tmp_path, resources={"cpus_per_worker": 2})))
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # Ray's socket paths must stay short
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, _temp_dir=ray_tmp)
    try:
        assert [node.get("CPU") for node in ray_nodes()] == [1.0]
        with pytest.raises(PreflightError, match=r"resources\.cpus_per_worker=2: no node of the Ray cluster has 2 CPUs"):
            preflight(spec, nodes=ray_nodes)
    finally:
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not (tmp_path / "synth").exists()

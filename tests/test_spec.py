"""Sweep specs: valid ones load, broken ones give one line naming file, key and fix (exit 2)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from orchestrator.search import define_by_run, grid, sample_preview
from orchestrator.spec import SpecError, load_spec

VALID = {
    "sweep": {"name": "t", "objective": {"metric": "dev_wer", "mode": "min"}, "num_trials": 3, "sampler": "tpe"},
    "preset": "cpu",
    "model": {"preset": "tiny", "plan": "pom", "attention_layers": 1},
    "search": {
        "model.attention_layers": {"values": [0, 1, 2]},
        "model.plan": {"values": ["pom", "summary_mixing"]},
        "pretrain.lr": {"min": 1e-4, "max": 1e-2, "distribution": "log_uniform"},
        "pretrain.warmup_steps": {"min": 10, "max": 50, "distribution": "int", "when": {"model.plan": "pom"}},
    },
}


def write(tmp_path: Path, data, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def broken(**changes):
    data = copy.deepcopy(VALID)
    for dotted, value in changes.items():
        node = data
        parts = dotted.split("__")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        if value is DELETE:
            node.pop(parts[-1])
        else:
            node[parts[-1]] = value
    return data


DELETE = object()


def test_valid_spec_loads(tmp_path):
    spec = load_spec(write(tmp_path, VALID))
    assert spec.sweep.name == "t"
    assert [p.path for p in spec.search][:3] == ["model.attention_layers", "model.plan", "pretrain.lr"]
    cond = next(p for p in spec.search if p.path == "pretrain.warmup_steps")
    assert cond.when == (("model.plan", ("pom",)),)


def test_conditional_parameter_only_sampled_when_active(tmp_path):
    spec = load_spec(write(tmp_path, VALID))
    samples = sample_preview(spec, 12)
    assert len(samples) == 12
    for s in samples:
        assert ("pretrain.warmup_steps" in s) == (s["model.plan"] == "pom")
        assert 1e-4 <= s["pretrain.lr"] <= 1e-2


def test_grid_respects_when(tmp_path):
    data = broken(sweep__sampler="grid", search={
        "model.plan": {"values": ["pom", "summary_mixing"]},
        "model.attention_layers": {"values": [0, 2], "when": {"model.plan": "pom"}},
    })
    spec = load_spec(write(tmp_path, data))
    combos = grid(spec)
    assert combos == [
        {"model.plan": "pom", "model.attention_layers": 0},
        {"model.plan": "pom", "model.attention_layers": 2},
        {"model.plan": "summary_mixing"},
    ]


def test_set_override(tmp_path):
    spec = load_spec(write(tmp_path, VALID), ["sweep.num_trials=7", "search.pretrain.lr={values: [0.001]}"])
    assert spec.sweep.num_trials == 7
    assert next(p for p in spec.search if p.path == "pretrain.lr").values == (0.001,)


BROKEN = [
    ("unknown top key", broken(sweeps={"name": "x"}), "sweeps: unknown key"),
    ("unknown sweep key", broken(sweep__trials=3), "sweep.trials: unknown key"),
    ("bad objective metric", broken(sweep__objective={"metric": "wer"}), "sweep.objective.metric"),
    ("bad mode", broken(sweep__objective={"metric": "dev_wer", "mode": "lowest"}), "sweep.objective.mode"),
    ("bad sampler", broken(sweep__sampler="bayes"), "sweep.sampler"),
    ("zero trials", broken(sweep__num_trials=0), "sweep.num_trials"),
    ("string trials", broken(sweep__num_trials="four"), "sweep.num_trials"),
    ("empty search", broken(search={}), "search: the search space is empty"),
    ("missing search", broken(search=DELETE), "search: missing section"),
    ("param without values", broken(search={"pretrain.lr": {}}), "search.pretrain.lr"),
    ("min above max", broken(search={"pretrain.lr": {"min": 1.0, "max": 0.1}}), "min (1.0) must be below max"),
    ("log range from zero", broken(search={"pretrain.lr": {"min": 0, "max": 1, "distribution": "log_uniform"}}), "search.pretrain.lr.min"),
    ("bad distribution", broken(search={"pretrain.lr": {"min": 0.1, "max": 1, "distribution": "gaussian"}}), "search.pretrain.lr.distribution"),
    ("values and range", broken(search={"pretrain.lr": {"values": [1], "min": 0, "max": 1}}), "either values or min/max"),
    ("when on missing param", broken(search={"pretrain.lr": {"values": [0.1], "when": {"model.degree": 2}}}), "search.pretrain.lr.when.model.degree: no search parameter"),
    ("when value not a value", broken(search={"model.plan": {"values": ["pom"]}, "pretrain.lr": {"values": [0.1], "when": {"model.plan": "mha"}}}), "'mha' is not one of its values"),
    ("unknown param key", broken(search={"pretrain.lr": {"choices": [0.1]}}), "search.pretrain.lr.choices: unknown key"),
    ("path outside run sections", broken(search={"trainer.lr": {"values": [0.1]}}), "must start with a run section"),
    ("path to unknown config field", broken(search={"pretrain.learning_rate": {"values": [0.1]}}), "search.pretrain.learning_rate"),
    ("bad mixer value", broken(search={"model.plan": {"values": ["pom", "transformer"]}}), "search.model.plan: value 'transformer'"),
    ("bad base config", broken(pretrain={"stepz": 3}), "pretrain.stepz"),
    ("negative resources", broken(resources={"workers": 0}), "resources.workers"),
    ("asha with extra objectives", broken(sweep__extra_objectives=[{"metric": "encoder_peak_mem_mb"}], sweep__scheduler={"type": "asha"}), "sweep.scheduler.type"),
    ("empty values list", broken(search={"model.plan": {"values": []}}), "search.model.plan.values"),
    ("non-mapping section", broken(tracking=["sqlite"]), "tracking: expected a mapping"),
]


@pytest.mark.parametrize("name,data,expected", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_specs_fail_with_one_clear_line(tmp_path, name, data, expected):
    path = write(tmp_path, data)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(path)), message
    assert expected in message, message


@pytest.mark.parametrize("text,expected", [
    ("", "the spec is empty"),
    ("sweep: [unclosed", "not valid YAML"),
    ("- a\n- b\n", "expected a mapping of sections"),
])
def test_unreadable_specs(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(SpecError, match=expected):
        load_spec(path)


def test_missing_file(tmp_path):
    with pytest.raises(SpecError, match="no such spec file"):
        load_spec(tmp_path / "nope.yaml")


def test_define_by_run_with_optuna(tmp_path):
    import optuna

    spec = load_spec(write(tmp_path, VALID))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    space = define_by_run(spec)
    for _ in range(5):
        trial = study.ask()
        assert space(trial) is None
        assert set(trial.params) <= {p.path for p in spec.search}


SHIPPED = sorted((Path(__file__).resolve().parent.parent / "search_spaces").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_search_spaces_are_valid(path):
    spec = load_spec(path)
    assert spec.search and spec.sweep.name == path.stem


def test_paper_scale_is_one_override():
    hybrid = Path(__file__).resolve().parent.parent / "search_spaces" / "hybrid.yaml"
    from orchestrator.spec import build_run_config

    tiny = build_run_config(load_spec(hybrid).run, {})
    paper = build_run_config(load_spec(hybrid, ["preset=paper"]).run, {})
    assert tiny.model.encoder.num_layers == 4 and paper.model.encoder.num_layers == 12
    assert paper.pretrain.steps == 200_000 and paper.model.encoder.model_dim > 400


def test_cli_exit_code_and_one_line(tmp_path, capsys):
    from orchestrator.sweep import main

    path = write(tmp_path, broken(sweep__sampler="bayes"))
    assert main([str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {path}: sweep.sampler")


def test_cli_subprocess_reports_bad_spec(tmp_path):
    import subprocess
    import sys

    path = write(tmp_path, broken(search={}))
    proc = subprocess.run([sys.executable, "-m", "orchestrator.sweep", str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {path}: search: the search space is empty; add at least one parameter, e.g. pretrain.lr: {{values: [1e-3]}}"]

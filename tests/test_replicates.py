"""Replicate seeds (``sweep.seeds``): the spec, the Tune wiring, the run's seed and the report's means."""

from __future__ import annotations

import io
import math

import pytest
import yaml

from orchestrator import replicates
from orchestrator.spec import SpecError, build_run_config, load_spec
from orchestrator.stats import Record

SPEC = {
    "sweep": {"name": "r", "num_trials": 3, "sampler": "tpe", "seeds": [0, 1]},
    "preset": "cpu",
    "model": {"preset": "tiny", "plan": "pom", "attention_layers": 1},
    "search": {"model.attention_layers": {"values": [0, 1, 2]}},
}


def spec_file(tmp_path, **sweep):
    data = {**SPEC, "sweep": {**SPEC["sweep"], **sweep}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# -- the spec --------------------------------------------------------------------------------


def test_seeds_default_to_none_and_load_as_a_tuple(tmp_path):
    assert load_spec(spec_file(tmp_path), check_run=False).sweep.seeds == (0, 1)
    assert load_spec(spec_file(tmp_path), ["sweep.seeds=[]"], check_run=False).sweep.seeds == ()
    data = {k: v for k, v in SPEC.items()}
    data["sweep"] = {k: v for k, v in SPEC["sweep"].items() if k != "seeds"}
    path = tmp_path / "plain.yaml"
    path.write_text(yaml.safe_dump(data))
    assert load_spec(path, check_run=False).sweep.seeds == ()


@pytest.mark.parametrize("seeds,expected", [
    ([0, -1], "sweep.seeds[1]: must be >= 0"),
    ([3, 1, 3], "sweep.seeds: [3, 1, 3] repeats a seed"),
    ([0, "one"], "sweep.seeds[1]"),
    ([0, 1.5], "sweep.seeds[1]"),
    (2, "sweep.seeds"),
])
def test_bad_seeds_are_one_line_naming_file_and_key(tmp_path, seeds, expected):
    path = spec_file(tmp_path, seeds=seeds)
    with pytest.raises(SpecError) as info:
        load_spec(path, check_run=False)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path)) and expected in message, message


@pytest.mark.parametrize("path", ["pretrain.seed", "finetune.seed"])
def test_a_searched_seed_with_sweep_seeds_is_refused(tmp_path, path):
    data = {**SPEC, "search": {**SPEC["search"], path: {"values": [0, 1]}}}
    file = tmp_path / "spec.yaml"
    file.write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError) as info:
        load_spec(file, check_run=False)
    assert str(info.value).startswith(f"{file}: search.{path}: sweep.seeds sets the seed of every run")
    assert path in [p.path for p in load_spec(file, ["sweep.seeds=[]"], check_run=False).search]  # alone: allowed


# -- the trial's seed and its pre-training ----------------------------------------------------


def test_replicate_index_picks_the_seed_and_leaves_the_config():
    config = {"model/attention_layers": 2, replicates.TRIAL_INDEX: 1}
    assert replicates.replicate_seed((7, 11), config) == 11 and replicates.TRIAL_INDEX not in config
    config = {"model/attention_layers": 2}
    assert replicates.replicate_seed((), config) is None and replicates.seed_params(None) == {}
    assert replicates.seed_params(11) == {"pretrain.seed": 11, "finetune.seed": 11}
    with pytest.raises(ValueError, match="outside sweep.seeds"):
        replicates.replicate_seed((7,), {replicates.TRIAL_INDEX: 1})


def test_replicates_with_other_seeds_never_share_a_pretraining(tmp_path):
    from orchestrator.trial_driver import pretrain_key

    spec = load_spec(spec_file(tmp_path))
    params = {"model.attention_layers": 2}
    configs = {seed: build_run_config(spec.run, {**params, **replicates.seed_params(seed)}) for seed in (0, 1)}
    assert configs[1].pretrain.seed == configs[1].finetune.seed == 1
    assert pretrain_key(configs[0]) != pretrain_key(configs[1])
    again = build_run_config(spec.run, {**params, **replicates.seed_params(0)})
    assert pretrain_key(again) == pretrain_key(configs[0])  # same seed, same configuration: shared


# -- the Tune wiring ----------------------------------------------------------------------------


def _suggest(search_alg, n):
    return [(f"t{i}", search_alg.suggest(f"t{i}")) for i in range(n)]


def test_each_configuration_runs_once_per_seed_and_the_searcher_sees_the_mean(tmp_path):
    from orchestrator.replicate_search import ReplicateSearcher
    from orchestrator.tuner import search_setup

    search_alg, space, num_samples = search_setup(load_spec(spec_file(tmp_path, seeds=[5, 6, 7]), check_run=False))
    assert isinstance(search_alg, ReplicateSearcher) and search_alg.repeat == 3 and space is None
    assert num_samples == 9
    trials = _suggest(search_alg, 4)
    first = {k: v for k, v in trials[0][1].items() if k != replicates.TRIAL_INDEX}
    assert [c[replicates.TRIAL_INDEX] for _, c in trials] == [0, 1, 2, 0]
    assert all({k: v for k, v in c.items() if k != replicates.TRIAL_INDEX} == first for _, c in trials[:3])
    for (trial_id, _), wer in zip(trials[:3], (0.2, 0.4, math.nan)):
        search_alg.on_trial_complete(trial_id, {"dev_wer": wer})
    (told,) = [t for t in search_alg.searcher._ot_study.trials if t.state.name == "COMPLETE"]
    assert told.values == [pytest.approx(0.3)]  # the mean of the finite replicates

    plain, _, n = search_setup(load_spec(spec_file(tmp_path, seeds=[]), check_run=False))
    assert not isinstance(plain, ReplicateSearcher) and n == 3


def test_multi_objective_replicates_average_each_objective(tmp_path):
    from orchestrator.tuner import search_setup

    spec = load_spec(spec_file(tmp_path, sampler="nsga2", extra_objectives=[{"metric": "params"}],
                               scheduler={"type": "fifo"}), check_run=False)
    search_alg, _, num_samples = search_setup(spec)
    assert num_samples == 6
    trials = _suggest(search_alg, 4)
    search_alg.on_trial_complete("t0", {"dev_wer": 0.2, "params": 10.0})
    search_alg.on_trial_complete("t1", {"dev_wer": 0.4, "params": 10.0})
    search_alg.on_trial_complete("t2", None, error=True)  # every replicate failed: a failed trial, no NaN
    search_alg.on_trial_complete("t3", {"dev_wer": math.nan})
    states = {t.number: (t.state.name, t.values) for t in search_alg.searcher._ot_study.trials}
    assert states[0] == ("COMPLETE", [pytest.approx(0.3), pytest.approx(10.0)])
    assert states[1][0] == "FAIL"
    assert len(trials) == 4


def test_grid_gets_a_replicate_axis(tmp_path):
    from orchestrator.tuner import GRID_KEY, search_setup

    search_alg, space, num_samples = search_setup(load_spec(spec_file(tmp_path, sampler="grid"), check_run=False))
    assert search_alg is None and num_samples == 1
    assert space[GRID_KEY]["grid_search"] == [{"model.attention_layers": v} for v in (0, 1, 2)]
    assert space[replicates.TRIAL_INDEX] == {"grid_search": [0, 1]}


def test_dry_run_counts_the_replicates(tmp_path, monkeypatch):
    from orchestrator import tuner

    monkeypatch.setattr(tuner, "estimate_step_seconds", lambda spec, params: 1.0)
    out = io.StringIO()
    result = tuner.dry_run(load_spec(spec_file(tmp_path)), out=out)
    first = out.getvalue().splitlines()[0]
    assert first.startswith("# sweep r: 3 trials (tpe)") and "each run once per seed [0, 1]: 6 trials in all" in first
    assert result["num_trials"] == 6 and result["configurations"] == 3
    assert " x 6 trials x " in out.getvalue()


# -- the report ---------------------------------------------------------------------------------


def _records(n: int, wrong_every: int | None) -> dict[str, Record]:
    return {f"dev-clean/u{i}": Record(word_errors=int(bool(wrong_every) and i % wrong_every == 0), words=4,
                                      char_errors=3 * int(bool(wrong_every) and i % wrong_every == 0), chars=20)
            for i in range(n)}


def _row(name, plan, layers, seed, dev_wer, wrong_every, status="FINISHED"):
    records = {"dev": _records(200, wrong_every)} if status == "FINISHED" else {}
    return {"run_id": name, "name": name, "trial": name, "status": status, "plan": plan, "reason": "",
            "sampled": {"model.attention_layers": layers}, "seed": str(seed), "dev_subsets": ("dev-clean",),
            "metrics": {"dev_wer": dev_wer, "dev_cer": dev_wer / 2, "test/test-clean/wer_ci_low": dev_wer - 0.01},
            "records": records, "pretrain_reused": "false"}


def test_report_groups_by_configuration_and_uses_the_means():
    from orchestrator.report import add_comparisons, headline, sort_rows, terminal_table

    rows = sort_rows([
        _row("a0", "2xmha+2xpom", 2, 0, 0.10, 10), _row("a1", "2xmha+2xpom", 2, 1, 0.14, 5),
        _row("b0", "4xpom", 0, 0, 0.50, 1), _row("b1", "4xpom", 0, 1, 0.60, 1),
        _row("c0", "1xmha+3xpom", 1, 0, 0.05, 20), _row("c1", "1xmha+3xpom", 1, 1, math.nan, None, "FAILED"),
        _row("d0", "3xmha+1xpom", 3, 0, 0.06, 20),
    ], "dev_wer", "min")
    assert replicates.row_seed({"replicate_seed": "3", "config.finetune.seed": "0"}, {}) == "3"
    assert replicates.row_seed({"config.finetune.seed": "4"}, {"finetune.seed": 2}) == "2"
    assert replicates.by_configuration([rows[0], rows[1]]) is None  # no configuration repeated

    configs = sort_rows(replicates.by_configuration(rows), "dev_wer", "min")
    assert [(r["plan"], r["seed"]) for r in configs] == [
        ("1xmha+3xpom", "0"), ("3xmha+1xpom", "0"), ("2xmha+2xpom", "0, 1"), ("4xpom", "0, 1"), ("1xmha+3xpom", "1")]
    merged = configs[2]
    assert merged["metrics"]["dev_wer"] == pytest.approx(0.12)
    std, n = merged["spread"]["dev_wer"]
    assert n == 2 and std == pytest.approx(math.sqrt(2) * 0.02)
    assert "test/test-clean/wer_ci_low" not in merged["metrics"]  # no mean of interval ends
    assert [m["name"] for m in merged["members"]] == ["a0", "a1"] and "seed" not in merged["sampled"]
    # per utterance, the mean errors of the seeds: 20 + 40 wrong of 200 -> 30 of 200 in the mean
    assert sum(r.word_errors for r in merged["records"]["dev"].values()) == pytest.approx(30.0)
    assert "vs_best" not in configs[0] and rows[0].get("vs_best") is None  # copies: trial rows untouched

    best = add_comparisons(configs, samples=300)
    assert best is configs[0]
    assert configs[3]["vs_best"]["dev"]["wer"].significant  # 4xpom: every utterance wrong
    best["is_best"] = True
    text = headline(configs, best, "dev_wer")
    assert text.startswith("Best by dev_wer: c0 (dev_wer 0.050).")  # its plan also names a failed trial
    assert "beats 2xmha+2xpom by 2.5 WER points" in text and "4xpom by 23.8 WER points" in text
    assert "the other differences (3xmha+1xpom) are within noise" in text

    configs = sort_rows(replicates.by_configuration([r for r in rows if r["name"][0] in "ab"]), "dev_wer", "min")
    top = add_comparisons(configs, samples=300)
    assert headline(configs, top, "dev_wer").startswith("Best by dev_wer: 2xmha+2xpom (dev_wer 0.120 ± 0.028 over 2 seeds).")
    table = terminal_table(configs, "dev_wer")
    assert "±sd (n)" in table.splitlines()[0] and "0.0283 (2)" in table and "2xmha+2xpom · 2 seeds" in table

    section = "\n".join(replicates.section(configs, "dev_wer"))
    assert "| 2xmha+2xpom | model.attention_layers=2 | 0, 1 | a0, a1 | 0.1200 ± 0.0283 (n=2) |" in section
    assert "| 4xpom | model.attention_layers=0 | 0, 1 | b0, b1 | 0.5500 ± 0.0707 (n=2) |" in section
    assert replicates.section(None, "dev_wer") == []


def test_replicates_scored_on_other_utterances_are_not_averaged():
    a, b = _row("a0", "p", 1, 0, 0.1, 10), _row("a1", "p", 1, 1, 0.2, 10)
    b["records"] = {"dev": dict(list(b["records"]["dev"].items())[:50])}
    (merged,) = replicates.by_configuration([a, b])
    assert merged["records"] == {} and "not scored on the same utterances" in merged["records_error"]

"""The trial profile (orchestrator/profile.py): its scopes as a spec sets them and a worker runs
them, and its peak memory against benchmarks/mixer_profile.py's (one measurement, one quantity)."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]


def test_profile_scope_defaults_follow_the_scope() -> None:
    paper = load_spec(ROOT / "search_spaces" / "paper_base.yaml", check_run=False).profile
    assert (paper.scope, paper.lengths_s, paper.batch_size) == ("paper", (10.0, 20.0, 40.0, 80.0), 6)
    hybrid = load_spec(ROOT / "search_spaces" / "hybrid.yaml", check_run=False,
                       overrides=["profile.scope=paper", "profile.lengths_s=[3]"]).profile
    assert (hybrid.scope, hybrid.lengths_s) == ("paper", (3.0,))  # what the file or --set gives wins


def test_unknown_profile_scope_is_one_line_naming_the_key() -> None:
    from orchestrator.errors import UserError

    with pytest.raises(UserError) as info:
        load_spec(ROOT / "search_spaces" / "hybrid.yaml", check_run=False, overrides=["profile.scope=everything"])
    text = str(info.value)
    assert "profile.scope" in text and "encoder, paper" in text and "\n" not in text


def test_worker_profiles_in_the_paper_scope() -> None:
    from models.builder import build_ctc
    from models.config import make_config
    from orchestrator.profile import tensor_bytes
    from orchestrator.worker import ProfileSettings, profile_trial

    class Config:  # what profile_trial reads of a run config
        model = make_config("tiny", plan="pom")

    settings = ProfileSettings(scope="paper", lengths_s=(1.0,), batch_size=1, repeats=1)
    encoder_only = profile_trial(Config, ProfileSettings(scope="encoder", lengths_s=(1.0,), batch_size=1, repeats=1))
    paper = profile_trial(Config, settings)
    assert paper["encoder_peak_mem_mb"] * 2**20 > tensor_bytes(build_ctc(Config.model))  # weights included
    assert paper["encoder_peak_mem_mb"] > encoder_only["encoder_peak_mem_mb"] > 0


def _bench_single(plan: str, scope: str, seconds: float, batch: int) -> dict:
    from benchmarks import mixer_profile

    args = mixer_profile.parse_args([
        "--single", "--encoder", "--plan", plan, "--preset", "tiny", "--scope", scope, "--length", str(seconds),
        "--pass", "fwd", "--batch", str(batch), "--repeats", "1", "--min-seconds", "0", "--max-seconds", "1",
        "--no-rss", "--threads", "0", "--device", "cpu",
    ])
    return mixer_profile.run_single(args)


def test_trial_profile_memory_is_the_benchmarks_for_pure_pom() -> None:
    """The sweep's encoder profile and benchmarks/mixer_profile.py measure one quantity one way
    (the allocator peak): for a pure-PoM plan it is > 0 and within 20% of the benchmark's."""
    from models.config import make_config
    from orchestrator.profile import profile_model

    bench = _bench_single("pom", "encoder", 4.0, 2)["peak_alloc_bytes"]
    profile = profile_model(make_config("tiny", plan="pom"), scope="encoder", lengths_s=(1.0, 4.0), batch_size=2,
                            repeats=1, device="cpu")
    peak = profile["encoder_peak_mem_mb"] * 2**20
    assert profile["encoder_peak_mem_mb/4s"] == profile["encoder_peak_mem_mb"] > profile["encoder_peak_mem_mb/1s"] > 0
    assert bench > 0 and abs(peak - bench) <= 0.2 * bench, (peak, bench)


def test_paper_scope_counts_frontend_head_weights_and_inputs() -> None:
    from models.builder import build_ctc
    from models.config import make_config
    from orchestrator.profile import profile_model, tensor_bytes

    config = make_config("tiny", plan="pom")
    paper = profile_model(config, scope="paper", lengths_s=(2.0, 4.0), batch_size=2, repeats=1, device="cpu")
    assert set(paper) == {"encoder_time_s", "encoder_peak_mem_mb", "encoder_time_s/2s", "encoder_peak_mem_mb/2s",
                          "encoder_time_s/4s", "encoder_peak_mem_mb/4s"}
    weights = tensor_bytes(build_ctc(config))
    inputs = 2 * 400 * config.frontend.n_mels * 4  # 2 x 4 s of 10 ms fbank frames, float32
    assert paper["encoder_peak_mem_mb"] * 2**20 > weights + inputs
    assert paper["encoder_peak_mem_mb/4s"] > paper["encoder_peak_mem_mb/2s"]
    # The benchmark's paper scope (weights + inputs + the call's peak) measures the same, and
    # its front-end + encoder scope (no CTC head) less.
    bench = _bench_single("pom", "paper", 4.0, 2)["peak_total_bytes"]
    assert abs(paper["encoder_peak_mem_mb"] * 2**20 - bench) <= 0.2 * bench
    assert _bench_single("pom", "frontend+encoder", 4.0, 2)["peak_total_bytes"] < bench

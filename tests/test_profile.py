"""The trial profile's scopes (orchestrator/profile.py) as a spec sets them and a worker runs them."""

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

"""Parameter counts: the paper's two ~95M base encoders, per-component reports, budget matching, CLI.

The base/large models are built on the meta device: counted, never run.
"""

from __future__ import annotations

import json

import pytest
import torch

from models.builder import build_best_rq, build_ctc
from models.config import make_config
from models.params import config_parameters, count_budget, count_parameters, main, match_model_dim


@pytest.mark.parametrize(("plan", "model_dim"), [("mha_relpos", 576), ("pom", 488)])
def test_base_encoders_are_about_95m(plan: str, model_dim: int) -> None:
    config = make_config("base", plan=plan)
    assert config.encoder.model_dim == model_dim
    pretrain = config_parameters(config)["pretrain"]  # front-end + encoder + BEST-RQ head
    assert abs(pretrain - 95e6) / 95e6 < 0.03, pretrain


def test_base_summary_mixing_is_matched_to_95m() -> None:
    config = make_config("base", plan="summary_mixing")  # the paper's f, s, c widths: d each
    assert config.encoder.model_dim % 8 == 0
    assert abs(config_parameters(config)["pretrain"] - 95e6) / 95e6 < 0.03, config.encoder.model_dim


def test_released_options_keep_the_published_counts() -> None:
    # the released encoder (xavier init, no q/k/v bias, LayerNorm over (freq, channels)) against
    # today's choices: the parameter counts differ by a few thousand, not by a percent
    released = config_parameters(make_config("base", plan="mha_relpos"))["pretrain"]
    plain = config_parameters(
        make_config("base", plan="mha_relpos", plan_options={"bias": True}, frontend={"norm": "channels"})
    )["pretrain"]
    assert 0 < plain - released < 0.001 * released


def test_large_estimate_is_about_315m() -> None:
    for plan in ("mha_relpos", "pom"):
        assert abs(count_budget(make_config("large", plan=plan)) - 315e6) / 315e6 < 0.03


def test_count_parameters_components_add_up() -> None:
    config = make_config("tiny", plan="pom", attention_layers=2, model_dim=32, encoder={"ffn_dim": 48})
    rq_counts = count_parameters(build_best_rq(config))
    assert rq_counts["total"] == rq_counts["frontend"] + rq_counts["encoder"] + rq_counts["best_rq_head"]
    parts = [v for k, v in rq_counts.items() if k.startswith("encoder.")]
    assert sum(parts) == rq_counts["encoder"]
    assert {"encoder.mixer.mha_relpos", "encoder.mixer.pom"} <= set(rq_counts)
    head = build_best_rq(config).heads
    assert rq_counts["best_rq_head"] == sum(p.numel() for p in head.parameters())  # quantizer: buffers only
    ctc_counts = count_parameters(build_ctc(config))
    assert "best_rq_head" not in ctc_counts and ctc_counts["total"] == sum(
        ctc_counts[k] for k in ("frontend", "encoder", "ctc_head")
    )
    assert ctc_counts["encoder"] == rq_counts["encoder"]


def test_match_model_dim_is_the_closest_multiple() -> None:
    base = make_config("tiny", plan="mha", model_dim=64)
    target = 900_000
    d = match_model_dim(base, target)
    assert d % 8 == 0 and d % 4 == 0

    def pretrain(dim: int) -> int:
        return count_budget(make_config("tiny", plan="mha", model_dim=dim))

    assert abs(pretrain(d) - target) <= abs(pretrain(d - 8) - target)
    assert abs(pretrain(d) - target) <= abs(pretrain(d + 8) - target)


def test_make_config_matches_other_plans_to_the_budget() -> None:
    hybrid = make_config("base", plan="pom", attention_layers=4)
    assert hybrid.encoder.model_dim % 8 == 0
    assert abs(count_budget(hybrid) - 95e6) / 95e6 < 0.03
    assert match_model_dim("pom", 95e6, preset="base") == 488  # the paper's choice is the closest


def test_cli_table_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--preset", "base"]) == 0
    table = capsys.readouterr().out
    assert "12xmha_relpos d576" in table and "12xpom(k2,D2) d488" in table and "pretrain" in table
    assert main(["--preset", "tiny", "--plan", "pom", "--attention-layers", "1", "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert result["plan"] == "1xmha_relpos+3xpom(k2,D2)" and result["counts"]["pretrain"] > 0
    assert main(["--preset", "base", "--plan", "pom", "--target", "60e6", "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert abs(result["counts"]["pretrain"] - 60e6) / 60e6 < 0.02
    assert main(["--preset", "tiny", "--plan", "nope"]) == 2
    assert "unknown mixer" in capsys.readouterr().err


def test_counting_allocates_nothing() -> None:
    with torch.device("meta"):
        model = build_best_rq(make_config("large"))
    assert next(model.parameters()).is_meta

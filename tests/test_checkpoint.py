"""Checkpoints: atomic writes, and a resumed run ending bit-identical to an uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from orchestrator.train.checkpoint import latest_checkpoint, list_checkpoints, load_state, save_checkpoint
from orchestrator.train.config import run_config_from_dict
from orchestrator.train.finetune import finetune
from orchestrator.train.pretrain import pretrain
from tests.conftest import micro_run_dict


class Preempted(Exception):
    """Raised by a report callback to stop a run the way a killed worker would."""


def _stop_at_checkpoint(step: int, seen: list):
    def report(metrics, checkpoint_dir):
        seen.append(metrics)
        if checkpoint_dir is not None and metrics["step"] == step:
            raise Preempted(step)

    return report


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resume"


def _assert_same_optimizer(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    for index, state in a["state"].items():
        for name, value in state.items():
            other = b["state"][index][name]
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(other)), f"optimizer state {index}.{name} differs"


# ---------------------------------------------------------------------------------------------
# save_checkpoint


def test_save_checkpoint_is_atomic_and_keeps_the_newest(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        save_checkpoint(root, step, {"step": step, "w": torch.full((2,), float(step))}, keep=2, meta={"x": step})
    assert [p.name for p in list_checkpoints(root)] == ["step-00000002", "step-00000003"]
    assert latest_checkpoint(root).name == "step-00000003"
    assert json.loads((root / "step-00000003" / "meta.json").read_text()) == {"step": 3, "x": 3}

    def broken(folder: Path) -> None:
        (folder / "partial.bin").write_bytes(b"x")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(root, 4, {"step": 4}, write_files=broken)
    # Nothing half-written is visible: the newest complete checkpoint is still step 3.
    assert latest_checkpoint(root).name == "step-00000003"
    assert not any(p.name.startswith(".step-") for p in root.iterdir())
    assert load_state(latest_checkpoint(root))["step"] == 3


def test_load_state_names_a_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no checkpoint at"):
        load_state(tmp_path)


# ---------------------------------------------------------------------------------------------
# Resume == uninterrupted (bit-exact: CPU kernels are deterministic, deterministic algorithms on,
# DataLoader num_workers=0, every RNG and the sampler position restored).


def test_pretrain_resume_is_bit_identical(small_corpus: Path, tmp_path: Path) -> None:
    sections = {"pretrain": {"steps": 4, "accum_steps": 2, "checkpoint_every": 2, "deterministic": True}}
    full = run_config_from_dict(micro_run_dict(small_corpus, tmp_path / "full", tmp_path / "cache", **sections))
    split = run_config_from_dict(micro_run_dict(small_corpus, tmp_path / "split", tmp_path / "cache", **sections))

    full_reports: list = []
    full_result = pretrain(full, report=lambda m, c: full_reports.append(m))

    first: list = []
    with pytest.raises(Preempted):
        pretrain(split, report=_stop_at_checkpoint(2, first))
    assert latest_checkpoint(tmp_path / "split" / "pretrain" / "checkpoints").name == "step-00000002"
    second: list = []
    split_result = pretrain(split, report=lambda m, c: second.append(m))
    assert [m["step"] for m in second] == [3, 4]

    a, b = load_state(full_result["checkpoint"]), load_state(split_result["checkpoint"])
    assert a["step"] == b["step"] == 4
    _assert_same_state(a["model"], b["model"])
    _assert_same_optimizer(a["optimizer"], b["optimizer"])
    assert a["sampler"] == b["sampler"]
    # The reported metrics after the resume are the uninterrupted run's, to the bit.
    for key in ("pretrain/loss", "pretrain/accuracy", "pretrain/grad_norm"):
        assert [m[key] for m in full_reports[2:]] == [m[key] for m in second]

    # A complete run pointed at the same folder does no more steps.
    again = pretrain(split, report=lambda m, c: pytest.fail("a complete run must not train"))
    assert again["complete"] and again["step"] == 4


def test_finetune_resume_is_bit_identical(small_corpus: Path, tmp_path: Path) -> None:
    # Augmentation on (speed perturbation + SpecAugment generators are resumed too) and a frozen
    # encoder warm-up that ends after the interruption.
    sections = {
        "finetune": {
            "steps": 3, "checkpoint_every": 10, "eval_every": 3, "freeze_encoder_steps": 2,
            "deterministic": True, "init": "random",
            "augment": {"speed_factors": [0.9, 1.0, 1.1], "time_mask_width": 20},
        }
    }
    full = run_config_from_dict(micro_run_dict(small_corpus, tmp_path / "full", tmp_path / "cache", **sections))
    split = run_config_from_dict(micro_run_dict(small_corpus, tmp_path / "split", tmp_path / "cache", **sections))

    full_reports: list = []
    full_result = finetune(full, report=lambda m, c: full_reports.append(m))
    stopped = finetune(split, stop_after=1)  # stops (with a checkpoint) inside the frozen warm-up
    assert stopped["step"] == 1 and not stopped["complete"]
    second: list = []
    split_result = finetune(split, report=lambda m, c: second.append(m))

    a, b = load_state(full_result["checkpoint"]), load_state(split_result["checkpoint"])
    _assert_same_state(a["model"], b["model"])
    _assert_same_optimizer(a["optimizer"], b["optimizer"])
    assert full_reports[-1]["dev/wer"] == second[-1]["dev/wer"]
    assert full_reports[-1]["finetune/loss"] == second[-1]["finetune/loss"]
    assert (Path(split_result["checkpoint"]) / "tokenizer" / "tokenizer.json").exists()

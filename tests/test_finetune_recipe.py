"""The paper's fine-tuning recipe pieces: NewBob annealing, a budget in epochs, best-dev checkpoint
selection, and the shared training-stage loop they run in (resume included)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from orchestrator.train.checkpoint import best_checkpoint, checkpoint_to_test, list_checkpoints, load_state
from orchestrator.train.config import ConfigError, run_config_from_dict
from orchestrator.train.data import load_utterances, make_loader
from orchestrator.train.evaluate import evaluate_run
from orchestrator.train.finetune import finetune, steps_per_epochs
from orchestrator.train.loop import Objective, run_stage
from orchestrator.train.metrics import Counters
from orchestrator.train.schedule import NewBob, NewBobScheduler, make_scheduler
from tests.conftest import micro_run_dict

# ---------------------------------------------------------------------------------------------
# NewBob


def _two_groups(head_lr: float = 1.0, encoder_lr: float = 0.1) -> torch.optim.Optimizer:
    return torch.optim.AdamW([
        {"params": [nn.Parameter(torch.zeros(1))], "lr": head_lr, "name": "head"},
        {"params": [nn.Parameter(torch.zeros(1))], "lr": encoder_lr, "name": "encoder"},
    ])


def _newbob(optimizer, patience: int = 0, warmup: int = 0) -> NewBobScheduler:
    settings = NewBob(factors={"head": 0.5, "encoder": 0.7}, threshold=0.0025, patience=patience)
    return make_scheduler(optimizer, "newbob", warmup, 100, newbob=settings)


def _lrs(optimizer) -> list[float]:
    return [g["lr"] for g in optimizer.param_groups]


def test_newbob_anneals_each_group_by_its_factor_below_the_threshold() -> None:
    opt = _two_groups()
    sched = _newbob(opt)
    assert _lrs(opt) == [1.0, 0.1]
    assert not sched.observe(10.0)  # the first loss has nothing to compare with
    assert not sched.observe(9.0)  # 10 % better
    assert not sched.observe(9.0 * (1 - 0.0026))  # just above the 0.25 % threshold
    assert sched.observe(9.0 * (1 - 0.0026) * (1 - 0.0024))  # just below: anneal at once (patience 0)
    assert _lrs(opt) == pytest.approx([0.5, 0.07])
    assert sched.get_last_lr() == pytest.approx([0.5, 0.07])
    assert sched.observe(20.0)  # worse: anneal again
    assert _lrs(opt) == pytest.approx([0.25, 0.049])
    for _ in range(3):  # the annealed rates stay between evaluations
        opt.step()
        sched.step()
    assert _lrs(opt) == pytest.approx([0.25, 0.049])


def test_newbob_patience_and_warmup() -> None:
    opt = _two_groups()
    sched = _newbob(opt, patience=1, warmup=4)
    assert _lrs(opt) == pytest.approx([0.25, 0.025])  # warm-up step 1 of 4
    sched.observe(1.0)
    assert not sched.observe(1.0)  # the first evaluation without improvement is tolerated
    assert sched.observe(1.0)  # the second anneals
    assert _lrs(opt) == pytest.approx([0.125, 0.0175])
    for _ in range(5):
        opt.step()
        sched.step()
    assert _lrs(opt) == pytest.approx([0.5, 0.07])  # warm-up done, the annealing kept


def test_newbob_state_resumes_exactly() -> None:
    opt = _two_groups()
    sched = _newbob(opt, patience=1)
    for loss in (5.0, 5.0, 5.0, 4.0):
        sched.observe(loss)
        opt.step()
        sched.step()
    opt2 = _two_groups()
    resumed = _newbob(opt2, patience=1)
    opt2.load_state_dict(opt.state_dict())
    resumed.load_state_dict(sched.state_dict())
    assert _lrs(opt2) == _lrs(opt) and resumed.scales == sched.scales
    for loss in (4.0, 4.0, 3.0):  # both anneal (or not) in step from here
        assert resumed.observe(loss) == sched.observe(loss)
        for o, s in ((opt, sched), (opt2, resumed)):
            o.step()
            s.step()
        assert _lrs(opt2) == _lrs(opt)
    with pytest.raises(ValueError, match="only fine-tuning"):
        make_scheduler(_two_groups(), "newbob", 0, 10)


# ---------------------------------------------------------------------------------------------
# Config: steps or epochs


def test_exactly_one_of_steps_and_epochs(tmp_path: Path) -> None:
    base = micro_run_dict(tmp_path, tmp_path / "run", tmp_path / "cache")
    with pytest.raises(ConfigError, match=r"finetune.epochs: set exactly one of finetune.steps and finetune.epochs"):
        run_config_from_dict({**base, "finetune": {**base["finetune"], "epochs": 3}})
    with pytest.raises(ConfigError, match="finetune.epochs"):
        run_config_from_dict({**base, "finetune": {**base["finetune"], "steps": None}})
    config = run_config_from_dict({**base, "finetune": {**base["finetune"], "epochs": 3, "steps": None}})
    assert config.finetune.epochs == 3 and config.finetune.steps is None
    with pytest.raises(ConfigError, match="eval_every"):
        run_config_from_dict({**base, "finetune": {**base["finetune"], "eval_every": "weekly"}})


def test_paper_preset_is_the_released_finetuning_recipe() -> None:
    ft = run_config_from_dict({"preset": "paper"}).finetune
    assert (ft.epochs, ft.steps, ft.schedule, ft.eval_every) == (30, None, "newbob", "epoch")
    assert (ft.head_lr, ft.encoder_lr, ft.weight_decay) == (3e-4, 5e-5, 1e-3)
    assert (ft.newbob_head_factor, ft.newbob_encoder_factor, ft.newbob_threshold, ft.newbob_patience) == (0.5, 0.7, 0.0025, 0)
    assert ft.precision == "fp16"
    a = ft.augment
    assert a.speed_factors == (0.95, 1.0, 1.05) and a.drop_freq_bands == (1, 3) and a.drop_freq_width == 0.05
    assert a.drop_chunk_count == (1, 5) and a.drop_chunk_length == (1000, 2000) and a.concat_clean
    assert a.num_freq_masks == 0 and a.num_time_masks == 0  # no SpecAugment in the released recipe


# ---------------------------------------------------------------------------------------------
# The shared loop with a scripted validation metric: best-dev selection and its resume


class _Regression(Objective):
    """A linear model on the first samples of each wave, with a scripted dev WER per evaluation."""

    stage = "finetune"

    def __init__(self, config, wers: list[float]) -> None:
        super().__init__(config, config.finetune)
        self.wers = wers
        self.evaluations = 0
        self.best_record = None

    def prepare(self, resume):
        utterances = load_utterances(self.config.data, self.config.data.train_subsets)
        return make_loader(utterances, self.config.data, max_batch_seconds=12.0, seed=0, shuffle=True)

    def model_config(self):
        return {"toy": 1}

    def build(self, steps):
        model = nn.Linear(16, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        return model, optimizer, make_scheduler(optimizer, "constant", 0, steps)

    def compute_loss(self, model, batch, runtime):
        loss = (model(batch["waves"][:, :16]).squeeze(-1) - 1.0).pow(2).mean()
        counters = Counters()
        counters.add("loss", float(loss.detach()), 1.0)
        return loss, counters

    def summary(self, counters, elapsed, *, step, epoch):
        return {"stage": "finetune", "step": step, "finetune/loss": counters.means()["loss"]}

    def evaluate_now(self, step, steps):
        return True

    def validate(self, step, metrics):
        wer = self.wers[step - 1]  # step-indexed, so a resumed run sees the same sequence
        metrics["dev/wer"] = wer
        if self.best_record is None or wer < self.best_record["dev_wer"]:
            self.best_record = {"step": step, "dev_wer": wer}
            return True
        return False

    def restore(self, state, mine):
        self.best_record = state["meta"]["best"]

    def meta(self):
        return {"best": self.best_record}

    def best(self):
        return self.best_record


WERS = [0.5, 0.3, 0.6, 0.7, 0.4, 0.9]


def _toy_run(small_corpus: Path, out: Path):
    return run_config_from_dict(micro_run_dict(
        small_corpus, out, out.parent / "cache",
        finetune={"steps": len(WERS), "checkpoint_every": 100, "keep_checkpoints": 1, "deterministic": True},
    ))


def test_best_dev_checkpoint_is_kept_and_named(small_corpus: Path, tmp_path: Path) -> None:
    config = _toy_run(small_corpus, tmp_path / "full")
    reports: list = []
    result = run_stage(_Regression(config, WERS), report=lambda m, c: reports.append((m["step"], c is not None)))
    # a checkpoint at each new best (steps 1, 2) and at the end (6), none at the worse ones
    assert reports == [(1, True), (2, True), (3, False), (4, False), (5, False), (6, True)]
    root = tmp_path / "full" / "finetune" / "checkpoints"
    # keep_checkpoints=1 keeps the newest, and the best besides it
    assert [p.name for p in list_checkpoints(root)] == ["step-00000002", "step-00000006"]
    path, pointer = best_checkpoint(root)
    assert path.name == "step-00000002" and pointer["dev_wer"] == 0.3 and pointer["step"] == 2
    assert checkpoint_to_test(root) == path  # the test evaluation loads the best, not the newest
    assert result["step"] == 6

    # Preempted after the best and a worse evaluation, then resumed: the same best, still on disk.
    config = _toy_run(small_corpus, tmp_path / "split")
    run_stage(_Regression(config, WERS), stop_after=3)
    split = tmp_path / "split" / "finetune" / "checkpoints"
    assert best_checkpoint(split)[0].name == "step-00000002"
    run_stage(_Regression(config, WERS))
    assert json.loads((split / "best.json").read_text()) == json.loads((root / "best.json").read_text())
    a, b = load_state(root / "step-00000006"), load_state(split / "step-00000006")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


# ---------------------------------------------------------------------------------------------
# Fine-tuning: epochs, NewBob, the wave augmentation chain, best-dev selection, resume


def _recipe_sections(**extra) -> dict:
    return {"finetune": {
        "steps": None, "epochs": 2, "eval_every": "epoch", "schedule": "newbob", "warmup_steps": 0,
        "weight_decay": 1e-3, "init": "random", "max_batch_seconds": 30.0, "checkpoint_every": 100,
        "keep_checkpoints": 1, "deterministic": True,
        "augment": {"speed_factors": [0.95, 1.0, 1.05], "drop_freq_bands": [1, 3], "drop_chunk_count": [1, 5],
                    "drop_chunk_length": [1000, 2000], "concat_clean": True, "num_freq_masks": 0, "num_time_masks": 0},
        **extra,
    }}


def test_finetune_by_epochs_with_the_paper_recipe_resumes_bit_identical(small_corpus: Path, tmp_path: Path) -> None:
    full = run_config_from_dict(micro_run_dict(small_corpus, tmp_path / "full", tmp_path / "cache", **_recipe_sections()))
    split = run_config_from_dict(micro_run_dict(small_corpus, tmp_path / "split", tmp_path / "cache", **_recipe_sections()))
    sampler = make_loader(load_utterances(full.data, full.data.train_subsets), full.data, max_batch_seconds=30.0,
                          seed=0, shuffle=True).sampler
    expected = len(sampler.batches(0)) + len(sampler.batches(1))
    assert steps_per_epochs(sampler, 2, 1) == expected and steps_per_epochs(sampler, 2, 2) == -(-expected // 2)

    reports: list = []
    result = finetune(full, report=lambda m, c: reports.append(m))
    assert result["step"] == expected and result["complete"]
    evals = [m for m in reports if "dev/wer" in m]
    assert [m["step"] for m in evals] == [len(sampler.batches(0)), expected]  # once per epoch
    assert reports[-1]["finetune/epoch"] == pytest.approx(2.0)
    root = tmp_path / "full" / "finetune" / "checkpoints"
    best = min(evals, key=lambda m: m["dev/wer"])  # the first of equals
    assert result["best"] == {"step": best["step"], "dev_wer": best["dev/wer"]}
    assert best_checkpoint(root)[0].name == f"step-{best['step']:08d}"
    assert evaluate_run(full)["checkpoint"] == str(best_checkpoint(root)[0])

    stopped = finetune(split, stop_after=len(sampler.batches(0)) + 1)  # inside the second epoch
    assert not stopped["complete"]
    second: list = []
    resumed = finetune(split, report=lambda m, c: second.append(m))
    assert resumed["step"] == expected and resumed["best"] == result["best"]
    a, b = load_state(result["checkpoint"]), load_state(resumed["checkpoint"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["scheduler"]["scales"] == b["scheduler"]["scales"]
    assert second[-1]["finetune/loss"] == reports[-1]["finetune/loss"]
    assert second[-1]["dev/loss"] == reports[-1]["dev/loss"]
    again = finetune(split, report=lambda m, c: pytest.fail("a complete run must not train"))
    assert again["complete"] and again["best"] == result["best"]

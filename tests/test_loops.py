"""The training loops in plain unit tests: pre-training, fine-tuning, evaluation, config, CLI,
metric reduction across processes, DDP, and (slow) learning end to end."""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from orchestrator.data.tokenizers import CharTokenizer
from orchestrator.train.config import ConfigError, load_run_config, run_config_from_dict
from orchestrator.train.decoding import BeamSearchDecoder, bootstrap_wer_ci, score
from orchestrator.train.evaluate import evaluate_run
from orchestrator.train.finetune import finetune
from orchestrator.train.metrics import Counters, perplexity
from orchestrator.train.pretrain import pretrain
from tests.conftest import micro_run_dict

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# Loops, single process


def test_pretrain_finetune_evaluate_in_one_process(small_corpus: Path, tmp_path: Path) -> None:
    config = run_config_from_dict(
        micro_run_dict(small_corpus, tmp_path / "run", tmp_path / "cache",
                       finetune={"freeze_encoder_steps": 1},
                       eval={"decoder": "beam", "beam_size": 4, "lexicon_from_train": True})
    )
    reports: list = []
    report = lambda metrics, checkpoint_dir: reports.append((metrics, checkpoint_dir))  # noqa: E731

    pre = pretrain(config, report=report)
    assert pre["complete"] and pre["step"] == 4
    assert [m["step"] for m, _ in reports] == [1, 2, 3, 4]
    assert [c is not None for _, c in reports] == [False, True, False, True]
    for metrics, _ in reports:
        assert math.isfinite(metrics["pretrain/loss"]) and 0 <= metrics["pretrain/accuracy"] <= 1
        assert 1 <= metrics["pretrain/code_perplexity"] <= 64  # codebook_size of the micro model
        assert metrics["pretrain/audio_seconds_per_second"] > 0
    run = tmp_path / "run"
    assert (run / "pretrain" / "config.yaml").exists()
    state = torch.load(pre["checkpoint"] / "state.pt", weights_only=False)
    assert {"model", "optimizer", "scheduler", "sampler", "ranks", "config", "step"} <= state.keys()
    assert int(state["model"]["normalizer.count"]) > 0  # normaliser statistics saved with the model

    reports.clear()
    ft = finetune(config, report=report)
    assert ft["init"]["loaded"] > 0 and ft["init"]["missing_keys"] == ["head"]
    assert set(ft["init"]["skipped_keys"]) == {"heads", "quantizer"}
    evals = [m for m, _ in reports if "dev/wer" in m]
    assert [m["step"] for m in evals] == [2, 4]
    assert 0 <= evals[-1]["dev/wer"] and evals[-1]["dev-clean/wer"] == evals[-1]["dev/wer"]
    assert [m["finetune/encoder_frozen"] for m, _ in reports] == [1.0, 0.0, 0.0, 0.0]
    ft_state = torch.load(ft["checkpoint"] / "state.pt", weights_only=False)
    # the encoder was initialised from pre-training: the normaliser statistics are the same
    assert torch.equal(ft_state["model"]["normalizer.mean"], state["model"]["normalizer.mean"])

    reports.clear()
    result = evaluate_run(config, report=report)
    test = result["subsets"]["test-clean"]
    assert test["utterances"] == 8 and test["words"] > 0
    assert test["wer_ci_low"] <= test["wer"] <= test["wer_ci_high"]
    saved = json.loads((run / "eval" / "results.json").read_text())
    assert saved["subsets"]["test-clean"]["wer"] == test["wer"]
    assert len((run / "eval" / "test-clean.tsv").read_text().splitlines()) == 1 + 8
    # lexicon-constrained decoding: only words of the training transcripts come out
    lexicon = {line.split("\t")[0] for line in (run / "eval" / "lexicon.txt").read_text().splitlines()}
    assert "THE" in lexicon and result["lexicon"] == "train"
    for line in (run / "eval" / "test-clean.tsv").read_text().splitlines()[1:]:
        assert set(line.split("\t")[4].split()) <= lexicon
    assert reports[0][0]["test-clean/wer"] == test["wer"]


def test_finetune_needs_a_pretraining_checkpoint(small_corpus: Path, tmp_path: Path) -> None:
    config = run_config_from_dict(micro_run_dict(small_corpus, tmp_path / "run", tmp_path / "cache"))
    with pytest.raises(ValueError, match="no checkpoint.*finetune.init=random"):
        finetune(config)


def test_bpe_finetuning_and_beam_search(small_corpus: Path, tmp_path: Path) -> None:
    config = run_config_from_dict(micro_run_dict(
        small_corpus, tmp_path / "run", tmp_path / "cache",
        finetune={"init": "random", "tokenizer": "bpe", "vocab_size": 40, "steps": 2, "eval_every": 2},
        eval={"decoder": "beam", "beam_size": 4, "lexicon_from_train": True},
    ))
    ft = finetune(config)
    assert ft["complete"]
    tok = json.loads((Path(ft["checkpoint"]) / "tokenizer" / "tokenizer.json").read_text())
    assert tok["kind"] == "bpe" and tok["vocab_size"] == 40
    with_lexicon = evaluate_run(config)  # the lexicon spells each training word in BPE pieces
    assert with_lexicon["subsets"]["test-clean"]["utterances"] == 8 and with_lexicon["lexicon"] == "train"
    lexicon_free = evaluate_run(dataclasses.replace(config, eval=dataclasses.replace(config.eval, lexicon_from_train=False)))
    assert lexicon_free["lexicon"] is None and lexicon_free["subsets"]["test-clean"]["words"] > 0


# ---------------------------------------------------------------------------------------------
# Decoding and scoring


def test_beam_search_agrees_with_greedy_on_a_peaked_path() -> None:
    tok = CharTokenizer()
    ids = tok.encode("HELLO WORLD")
    log_probs = torch.full((1, 2 * len(ids) + 4, tok.vocab_size), -12.0)
    frame = 0
    for i in ids:  # each token then a blank, so repeated letters (LL) survive CTC collapsing
        log_probs[0, frame, i] = 0.0
        log_probs[0, frame + 1, 0] = 0.0
        frame += 2
    log_probs[0, frame:, 0] = 0.0
    log_probs = log_probs.log_softmax(-1)
    lengths = torch.tensor([log_probs.shape[1]])
    assert BeamSearchDecoder(tok, beam_size=4)(log_probs, lengths) == ["HELLO WORLD"]


@pytest.mark.parametrize("preferred", ["A", "B"])
def test_beam_search_with_a_token_ngram_lm(tmp_path: Path, preferred: str) -> None:
    # Two equally likely emissions, 'A' or 'B': a token-level n-gram LM that prefers one decides.
    tok = CharTokenizer()
    tokens = ["|" if s == " " else s for s in tok.symbols[1:]]
    logp = {t: (-0.1 if t == preferred else -3.0) for t in tokens}
    # KenLM wants at least a bigram model: unigrams with back-off weights and one bigram.
    lines = ["\\data\\", f"ngram 1={len(tokens) + 3}", "ngram 2=1", "", "\\1-grams:",
             "-99\t<s>\t0", "-1.0\t</s>", "-5.0\t<unk>\t0"]
    lines += [f"{p}\t{t}\t0" for t, p in logp.items()]
    lines += ["", "\\2-grams:", f"-0.1\t<s> {preferred}", "", "\\end\\", ""]
    arpa = tmp_path / "lm.arpa"
    arpa.write_text("\n".join(lines))
    log_probs = torch.full((1, 3, tok.vocab_size), -20.0)
    a, b = tok.encode("A")[0], tok.encode("B")[0]
    log_probs[0, 1, a] = log_probs[0, 1, b] = math.log(0.5)
    log_probs[0, 0, 0] = log_probs[0, 2, 0] = 0.0
    lengths = torch.tensor([3])
    decoder = BeamSearchDecoder(tok, beam_size=8, lm_path=str(arpa), lm_weight=2.0)
    assert decoder(log_probs, lengths) == [preferred]


def test_scores_and_bootstrap_interval() -> None:
    s = score(["a", "b", "c"], ["the cat sat", "a dog", "hello"], ["THE CAT SAT", "A FROG", ""])
    assert s.word_errors == [0, 1, 1] and s.words == [3, 2, 1]
    assert s.wer == pytest.approx(2 / 6)
    assert s.char_errors[0] == 0 and s.chars == [11, 5, 5]
    low, high = bootstrap_wer_ci(s.word_errors, s.words, samples=500, seed=1)
    assert 0 <= low <= s.wer <= high <= 1
    assert all(math.isnan(x) for x in bootstrap_wer_ci([], [], samples=10))
    # identical utterances give a degenerate interval
    assert bootstrap_wer_ci([1] * 20, [4] * 20, samples=50) == (0.25, 0.25)


def test_schedules() -> None:
    from orchestrator.train.schedule import make_scheduler

    def lrs(name: str) -> list[float]:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = make_scheduler(opt, name, warmup_steps=4, total_steps=8)
        out = []
        for _ in range(8):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    assert lrs("noam")[:4] == [0.25, 0.5, 0.75, 1.0] and lrs("noam")[7] == pytest.approx((4 / 8) ** 0.5)
    assert lrs("linear") == pytest.approx([0.25, 0.5, 0.75, 1.0, 0.75, 0.5, 0.25, 0.0])
    assert lrs("constant")[3:] == [1.0] * 5
    with pytest.raises(ValueError, match="valid schedules"):
        lrs("cosine")


def test_perplexity_detects_collapse() -> None:
    assert perplexity(torch.ones(64)) == pytest.approx(64.0)
    assert perplexity(torch.tensor([100.0] + [0.0] * 63)) == pytest.approx(1.0)
    assert math.isnan(perplexity(torch.zeros(4)))


# ---------------------------------------------------------------------------------------------
# Config and CLI


def test_config_is_strict_and_round_trips(tmp_path: Path) -> None:
    config = load_run_config(REPO / "orchestrator" / "configs" / "tiny.yaml")
    assert run_config_from_dict(config.to_dict()) == config
    path = tmp_path / "bad.yaml"
    cases = {
        "pretrain: {precison: fp32}": "bad.yaml: pretrain.precison: unknown key; allowed keys: accum_steps",
        "pretrain: {precision: fp8}": "pretrain.precision: 'fp8' is not allowed; allowed values: auto, fp32, bf16, fp16",
        "finetune: {tokenizer: words}": "finetune.tokenizer: 'words' is not allowed",
        "finetune: {augment: {speed_factors: [3.0]}}": "finetune.augment",
        "data: {min_duration: 5, max_duration: 2}": "data.min_duration",
        "model: {preset: tiny, encoder: {dropout_p: 2}}": "encoder.dropout_p",
        "model: {preset: tiny, plan: nope}": "unknown mixer 'nope'",
        "colour: blue": "colour: unknown key; allowed keys: data, device, eval",
        "- a list": "expected a mapping",
    }
    for text, expected in cases.items():
        path.write_text(text)
        with pytest.raises(ConfigError) as info:
            load_run_config(path)
        assert expected in str(info.value) and "bad.yaml" in str(info.value), str(info.value)
    path.write_text("pretrain: {steps: 7}\n")
    config = load_run_config(path, ["pretrain.lr=3e-4", "model.preset=tiny", "model.plan=pom", "model.attention_layers=2"])
    assert config.pretrain.steps == 7 and config.pretrain.lr == 3e-4
    assert config.model.encoder.mixer_names == ("mha_relpos", "mha_relpos", "pom", "pom")
    with pytest.raises(ConfigError, match="--set"):
        load_run_config(path, ["pretrain.stepz=3"])


def _run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "orchestrator.run", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_errors_are_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    from orchestrator.run import main

    monkeypatch.chdir(tmp_path)

    def run(*args: str) -> tuple[int, str]:
        try:
            code = main(list(args))
        except SystemExit as exit_:  # argparse errors
            code = exit_.code
        return code, capsys.readouterr().err.strip()

    assert run("pretrain", "--config", "missing.yaml") == (2, "error: missing.yaml: no such config file")
    (tmp_path / "c.yaml").write_text("pretrain: {steps: 0}\n")
    code, err = run("pretrain", "--config", "c.yaml")
    assert code == 2 and err.startswith("error: c.yaml: pretrain.steps: must be >= 1")
    code, err = run("evaluate", "--out", str(tmp_path / "nothing"))
    assert code == 2 and "no fine-tuning checkpoint" in err and len(err.splitlines()) == 1
    code, err = run("train")
    assert code == 2 and err.startswith("error: argument stage: invalid choice")


def test_cli_runs_a_stage(small_corpus: Path, tmp_path: Path) -> None:
    config = micro_run_dict(small_corpus, tmp_path / "run", tmp_path / "cache", pretrain={"steps": 2})
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    done = _run_cli("pretrain", "--config", "run.yaml", "--set", "pretrain.log_every=2", "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("[pretrain] step 2  pretrain/loss")
    assert json.loads(lines[-1])["complete"] is True


# ---------------------------------------------------------------------------------------------
# Across processes (gloo on CPU)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=120),  # a deadlock fails the test instead of hanging it
    )


def _counters_worker(rank: int, world: int, port: int, out: str) -> None:
    _init(rank, world, port)
    try:
        c = Counters()
        c.add("loss", [10.0, 40.0][rank], count=rank + 1)  # rank 0: 10 over 1 item, rank 1: 40 over 2
        c.add_total("seconds", 1.5)
        c.add_vector("usage", torch.tensor([rank, 1.0, 0.0]))
        reduced = c.reduce()
        torch.save({"means": reduced.means(), "usage": reduced.vectors["usage"]}, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_counters_reduce_across_processes(tmp_path: Path) -> None:
    mp.start_processes(_counters_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="fork")
    for rank in range(2):
        got = torch.load(tmp_path / f"{rank}.pt")
        # a weighted mean over all items (50 / 3), not the mean of the ranks' means (20)
        assert got["means"]["loss"] == pytest.approx(50 / 3)
        assert got["means"]["seconds"] == pytest.approx(3.0)
        assert got["usage"].tolist() == [1.0, 2.0, 0.0]


def _ddp_worker(rank: int, world: int, port: int, corpus: str, out: str) -> None:
    _init(rank, world, port)
    try:
        config = run_config_from_dict(micro_run_dict(
            Path(corpus), Path(out) / "run", Path(out) / f"cache{rank}",
            pretrain={"steps": 3, "max_batch_seconds": 9.0, "checkpoint_every": 3},
            finetune={"steps": 2, "init": "pretrain", "freeze_encoder_steps": 1, "max_batch_seconds": 9.0},
        ))
        reports: list = []
        pre = pretrain(config, report=lambda m, c: reports.append(m))
        weights = torch.load(Path(pre["checkpoint"]) / "state.pt", weights_only=False)["model"] if rank == 0 else None
        from orchestrator.train.data import load_utterances, make_loader

        sampler = make_loader(load_utterances(config.data, config.data.train_subsets), config.data,
                              max_batch_seconds=9.0, seed=0, shuffle=True, rank=rank, world_size=world).sampler
        ft = finetune(config, report=lambda m, c: reports.append(m))
        from orchestrator.train.runtime import unwrap  # noqa: F401  (imported in the worker on purpose)

        torch.save({
            "reports": reports,
            "num_batches": [len(sampler.batches(e)) for e in range(3)],
            "stats": sampler.stats(0),
            "dev_wer": ft["metrics"]["dev/wer"],
            "weights": weights,
        }, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ddp_two_processes_gloo(small_corpus: Path, tmp_path: Path) -> None:
    mp.start_processes(_ddp_worker, args=(2, _free_port(), str(small_corpus), str(tmp_path)), nprocs=2,
                       start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"{rank}.pt", weights_only=False) for rank in range(2))
    # uneven lengths (1.8 to 5.4 s) and dynamic batches, yet the same number of batches per rank
    assert r0["num_batches"] == r1["num_batches"]
    # every report is identical on both ranks: the metrics were reduced before reporting
    assert [m["step"] for m in r0["reports"]] == [m["step"] for m in r1["reports"]]
    def without_timing(metrics: dict) -> dict:  # wall-clock throughput is measured per rank
        return {k: v for k, v in metrics.items() if "seconds" not in k}

    for a, b in zip(r0["reports"], r1["reports"]):
        assert without_timing(a) == without_timing(b)
    assert r0["dev_wer"] == r1["dev_wer"]
    # and the checkpoint (written by rank 0) exists and is complete
    assert r0["weights"] is not None and int(r0["weights"]["normalizer.count"]) > 0


# ---------------------------------------------------------------------------------------------
# Learning, end to end (slow)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_learning_end_to_end(tmp_path: Path) -> None:
    """On a small generated corpus, BEST-RQ improves and fine-tuning brings WER clearly below 1."""
    from orchestrator.data.synth import generate_corpus

    corpus = tmp_path / "synth"
    generate_corpus(corpus, seed=3, sizes={"train-clean-100": 600, "dev-clean": 60}, workers=2)
    config = run_config_from_dict({
        "preset": "cpu",
        "data": {"root": str(corpus), "generate": False, "cache_dir": str(tmp_path / "cache"),
                 "dev_subsets": ["dev-clean"], "test_subsets": ["dev-clean"]},
        "pretrain": {"steps": 150, "log_every": 25, "checkpoint_every": 1000},
        "finetune": {"steps": 400, "log_every": 50, "eval_every": 400, "checkpoint_every": 1000},
        "eval": {"bootstrap_samples": 0},
        "output_dir": str(tmp_path / "run"),
        "device": "cpu",
    })
    reports: list = []
    pretrain(config, report=lambda m, c: reports.append(m))
    first, last = reports[0], reports[-1]
    assert last["pretrain/loss"] < first["pretrain/loss"] - 0.3
    assert last["pretrain/accuracy"] > first["pretrain/accuracy"] + 0.02
    ft_reports: list = []
    ft = finetune(config, report=lambda m, c: ft_reports.append(m))
    losses = [m["finetune/loss"] for m in ft_reports if "finetune/loss" in m]
    assert losses[-1] < 0.7 * losses[0], losses
    assert ft["metrics"]["dev/cer"] < 0.8, ft["metrics"]
    # the tiny preset's test decoding: beam search over the words of the training transcripts.
    # Measured here (2 cores, 178 s for the whole test): greedy WER 0.93 / CER 0.44, lexicon WER 0.71.
    dev = evaluate_run(config)["subsets"]["dev-clean"]
    print(f"learning: greedy dev WER {ft['metrics']['dev/wer']:.3f} CER {ft['metrics']['dev/cer']:.3f}; "
          f"lexicon dev WER {dev['wer']:.3f} CER {dev['cer']:.3f}")
    assert dev["wer"] < 0.8, dev

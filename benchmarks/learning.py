"""End-to-end learning benchmark: BEST-RQ pre-training then character CTC fine-tuning of the
``tiny`` encoder on the generated corpus, and the same fine-tuning budget from random init.

Usage:
    python benchmarks/learning.py                          # the tiny preset, prints JSON
    python benchmarks/learning.py --out runs/bench-learning --threads 2
    python benchmarks/learning.py --set pretrain.steps=200 --set finetune.steps=300 --skip-random
    python benchmarks/learning.py --quick --out /tmp/bench-learning-quick   # seconds: checks the benchmark itself

The corpus (``data.root`` of the preset, ``data/synth`` by default) is generated first if it is
missing; its generation is timed separately and is not part of ``wall_seconds``, which covers
pre-training plus fine-tuning from the pre-trained encoder (the acceptance target: dev WER below
0.35 within 600 s on 2 CPU cores). The random-init fine-tuning runs afterwards with the same
budget and is timed on its own. Each run folder is fresh: an existing ``--out`` is refused so a
resumed half-run is never reported as one measurement.

Two dev WERs are reported: ``dev_wer``, greedy best-path decoding (the validation metric of the
fine-tuning loop), and ``dev_wer_lexicon``, beam search constrained to the words of the training
transcripts (no language model; seconds, outside ``wall_seconds``). ``cpu_seconds`` is this
process's CPU time: on a machine shared with other jobs, wall time overstates what two
dedicated cores need.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

# Sleep, do not spin, while waiting for work: on a CPU shared with other jobs, OpenMP's default
# spin-waiting burns several times the useful CPU time (measured: 7 s instead of 1 s per step).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.errors import cli_main, configure_logging  # noqa: E402
from orchestrator.train.config import load_run_config  # noqa: E402
from orchestrator.train.data import ensure_corpus  # noqa: E402
from orchestrator.train.evaluate import evaluate_run  # noqa: E402
from orchestrator.train.finetune import finetune  # noqa: E402
from orchestrator.train.loop import ProgressPrinter  # noqa: E402
from orchestrator.train.pretrain import pretrain  # noqa: E402
from orchestrator.train.runtime import cpu_has_native_bf16  # noqa: E402


def _collect(into: list, verbose: bool):
    printer = ProgressPrinter(stream=sys.stderr)

    def report(metrics, checkpoint_dir):
        into.append(dict(metrics))
        if verbose:
            printer(metrics, checkpoint_dir)

    return report


def _cpu_seconds() -> float:
    """User + system CPU time of this process (all its threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _lexicon_wer(config) -> dict:
    """Dev WER/CER of the fine-tuned model with beam search constrained to the training words."""
    dev = config.data.dev_subsets
    config = dataclasses.replace(
        config,
        data=dataclasses.replace(config.data, test_subsets=dev),
        eval=dataclasses.replace(config.eval, decoder="beam", lexicon_from_train=True, lexicon_path=None,
                                 bootstrap_samples=0, beam_size=32),
    )
    subsets = evaluate_run(config)["subsets"]
    words = sum(r["words"] for r in subsets.values())
    return {
        "wer": sum(r["wer"] * r["words"] for r in subsets.values()) / max(1, words),
        "cer": sum(r["cer"] * r["words"] for r in subsets.values()) / max(1, words),
    }


def _cpu_has_bf16() -> bool:
    return not torch.cuda.is_available() and cpu_has_native_bf16()


class _Timer:
    def __enter__(self):
        self.wall, self.cpu, self.load = time.perf_counter(), _cpu_seconds(), os.getloadavg()[0]
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.wall
        self.cpu = _cpu_seconds() - self.cpu
        self.load = (self.load + os.getloadavg()[0]) / 2


def quick_sets(out: Path) -> list[str]:
    """``--quick``: a 64-utterance corpus of its own under ``out`` and a few steps per stage."""
    sizes = "{train-clean-100: 40, dev-clean: 8, test-clean: 8, test-other: 8}"
    return [f"data.root={out / 'corpus'}", f"data.synth_sizes={sizes}", "pretrain.steps=4",
            "pretrain.checkpoint_every=2", "finetune.steps=4", "finetune.eval_every=2", "finetune.checkpoint_every=2"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "orchestrator/configs/tiny.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    parser.add_argument("--out", default="runs/bench-learning", help="fresh folder for the runs")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--skip-random", action="store_true", help="skip the random-init baseline")
    parser.add_argument("--quick", action="store_true",
                        help="a 64-utterance corpus under --out and 4 steps per stage (checks the benchmark itself)")
    parser.add_argument(
        "--precision", choices=["auto", "fp32", "bf16"], default="auto",
        help="training precision; auto = bf16 autocast where the CPU has native bf16 (AMX or AVX512-BF16), else fp32",
    )
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    configure_logging(quiet=not args.verbose)
    return cli_main(lambda: _benchmark(args))


def _benchmark(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)

    precision = args.precision if args.precision != "auto" else ("bf16" if _cpu_has_bf16() else "fp32")
    out = Path(args.out)
    quick = quick_sets(out.resolve()) if args.quick else []
    args.overrides = [f"pretrain.precision={precision}", f"finetune.precision={precision}", *quick, *args.overrides]
    if out.exists() and any(out.iterdir()):
        print(f"error: {out} exists and is not empty; pass a fresh --out", file=sys.stderr)
        return 2
    pre_config = load_run_config(args.config, args.overrides, output_dir=str(out / "pretrained"))
    random_config = load_run_config(
        args.config, [*args.overrides, "finetune.init=random"], output_dir=str(out / "random")
    )

    with _Timer() as corpus:
        ensure_corpus(pre_config.data)

    pre_reports: list = []
    with _Timer() as pre_time:
        pre = pretrain(pre_config, report=_collect(pre_reports, args.verbose))

    ft_reports: list = []
    with _Timer() as ft_time:
        ft = finetune(pre_config, report=_collect(ft_reports, args.verbose))

    first, last = pre_reports[0], pre_reports[-1]
    result = {
        "benchmark": "learning",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "config": args.config,
        "overrides": args.overrides,
        "plan": list(pre_config.model.encoder.mixer_names),
        "model_dim": pre_config.model.encoder.model_dim,
        "parameters": None,
        "threads": args.threads,
        "precision": precision,
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "corpus_seconds": round(corpus.wall, 1),
        "pretrain_steps": pre["step"],
        "finetune_steps": ft["step"],
        "pretrain_seconds": round(pre_time.wall, 1),
        "finetune_seconds": round(ft_time.wall, 1),
        "wall_seconds": round(pre_time.wall + ft_time.wall, 1),
        # CPU time of this process: with other jobs on the machine, wall time overstates what
        # 2 dedicated cores need; cpu_seconds / threads is what they would need at full use.
        "cpu_seconds": round(pre_time.cpu + ft_time.cpu, 1),
        "load_average": round((pre_time.load + ft_time.load) / 2, 2),
        "dev_wer": ft["metrics"]["dev/wer"],
        "dev_cer": ft["metrics"]["dev/cer"],
        "dev_wer_lexicon": None,
        "pretrain_loss_first": first["pretrain/loss"],
        "pretrain_loss_last": last["pretrain/loss"],
        "pretrain_accuracy_first": first["pretrain/accuracy"],
        "pretrain_accuracy_last": last["pretrain/accuracy"],
        "pretrain_code_perplexity_last": last["pretrain/code_perplexity"],
        "dev_wer_curve_pretrained": [(m["step"], round(m["dev/wer"], 4)) for m in ft_reports if "dev/wer" in m],
        "init": ft["init"],
    }
    # Not part of wall_seconds: decoding with a lexicon of the training words (seconds).
    result["dev_wer_lexicon"] = _lexicon_wer(pre_config)["wer"]
    if not args.skip_random:
        rnd_reports: list = []
        with _Timer() as rnd_time:
            rnd = finetune(random_config, report=_collect(rnd_reports, args.verbose))
        result["random_init_finetune_seconds"] = round(rnd_time.wall, 1)
        result["random_init_dev_wer"] = rnd["metrics"]["dev/wer"]
        result["random_init_dev_cer"] = rnd["metrics"]["dev/cer"]
        result["random_init_dev_wer_lexicon"] = _lexicon_wer(random_config)["wer"]
        result["dev_wer_curve_random"] = [(m["step"], round(m["dev/wer"], 4)) for m in rnd_reports if "dev/wer" in m]
    from models.best_rq import BestRQModel

    result["parameters"] = sum(p.numel() for p in BestRQModel(pre_config.model).parameters())
    result["target_met"] = result["dev_wer"] < 0.35 and result["wall_seconds"] < 600
    result["target_met_cpu"] = result["dev_wer"] < 0.35 and result["cpu_seconds"] / args.threads < 600
    result["target_met_lexicon"] = result["dev_wer_lexicon"] < 0.35 and result["wall_seconds"] < 600
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

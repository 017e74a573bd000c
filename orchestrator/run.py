"""Run one trial's stages without Ray: BEST-RQ pre-training, CTC fine-tuning, test evaluation.

Usage:
    # the tiny CPU setting, stage by stage (the corpus is generated under data/synth on first use)
    python -m orchestrator.run pretrain --config orchestrator/configs/tiny.yaml
    python -m orchestrator.run finetune --config orchestrator/configs/tiny.yaml
    python -m orchestrator.run evaluate --config orchestrator/configs/tiny.yaml
    # all three in a row
    python -m orchestrator.run all --config orchestrator/configs/tiny.yaml --out runs/tiny-pom
    # change any key, e.g. a PoM encoder with 2 attention layers below, fewer steps
    python -m orchestrator.run pretrain --config orchestrator/configs/tiny.yaml \\
        --set model.plan=pom --set model.attention_layers=2 --set pretrain.steps=100 --out runs/debug
    # fine-tuning from random init (the pre-training baseline)
    python -m orchestrator.run finetune --config orchestrator/configs/tiny.yaml --set finetune.init=random
    # DDP on 2 processes (gloo on CPU, NCCL on GPUs)
    torchrun --nproc-per-node 2 -m orchestrator.run pretrain --config orchestrator/configs/tiny.yaml

A run folder (``--out``, else ``output_dir`` of the config) holds ``pretrain/``, ``finetune/``
and ``eval/``; running a stage again into the same folder resumes it from its newest checkpoint
(a complete stage returns at once). Progress lines go to stdout, log messages to stderr, and the
last line is the stage's result as JSON. Bad input gives one ``error: ...`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from orchestrator.errors import cli_main, configure_logging
from orchestrator.train import STAGES, load_run_config
from orchestrator.train.loop import ProgressPrinter
from orchestrator.train.runtime import init_distributed_from_env, rank_and_world


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, as every other error here
        print(f"error: {message} (see python -m orchestrator.run --help)", file=sys.stderr)
        sys.exit(2)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m orchestrator.run",
        description="Run one trial's stages without Ray (see the module docstring for examples).",
    )
    parser.add_argument("stage", choices=sorted(STAGES), help="what to run")
    parser.add_argument("--config", help="run YAML file (default: built-in defaults)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
        help="override one config key (YAML value), e.g. pretrain.steps=100; repeatable",
    )
    parser.add_argument("--out", help="run folder (overrides output_dir)")
    parser.add_argument("--quiet", action="store_true", help="log warnings only")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging(quiet=args.quiet)
    rank = 0

    def body() -> int:
        nonlocal rank
        config = load_run_config(args.config, args.overrides, output_dir=args.out)
        init_distributed_from_env()
        rank, _ = rank_and_world()
        result = STAGES[args.stage](config, report=ProgressPrinter(rank=rank))
        if rank == 0:
            print(json.dumps(result, default=str, sort_keys=True))
        return 0

    try:
        return cli_main(body)  # the stages' own input checks raise StageError, a UserError
    except KeyboardInterrupt:
        print("error: interrupted; run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

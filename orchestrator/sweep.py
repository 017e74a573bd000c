"""Run an ablation sweep: Ray Tune + Optuna over Ray Train trials, tracked in MLflow.

Usage:
    python -m orchestrator.sweep search_spaces/hybrid.yaml
    python -m orchestrator.sweep search_spaces/hybrid.yaml --dry-run
    python -m orchestrator.sweep search_spaces/hybrid.yaml --set sweep.num_trials=2 --set pretrain.steps=50
    python -m orchestrator.sweep search_spaces/hybrid.yaml --resume          # finish the last interrupted sweep
    python -m orchestrator.sweep search_spaces/hybrid.yaml --address auto    # an existing Ray cluster
    python -m orchestrator.sweep search_spaces/paper_base.yaml --set preset=... (see README)

Exit codes: 0 done, 1 the sweep ran but no trial finished, 2 a bad spec, flag, service or
resource request (one ``error:`` line; nothing is generated or started).
"""

from __future__ import annotations

import argparse
import sys

from orchestrator.errors import UserError, cli_main, configure_logging
from orchestrator.yamlio import blame_set


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator.sweep", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("spec", help="the sweep spec (YAML), e.g. search_spaces/hybrid.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override a spec value (YAML value), repeatable")
    parser.add_argument("--dry-run", action="store_true", help="print the trials and a cost estimate; start nothing")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="SWEEP_ID",
                        help="finish an interrupted sweep (the latest of this name, or SWEEP_ID)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")
    parser.add_argument("--num-trials", type=int, default=None, help="override sweep.num_trials")
    parser.add_argument("--storage", default=None, help="override storage.path")
    parser.add_argument("--tracking-uri", default=None, help="override tracking.uri")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    overrides = list(args.overrides)
    if args.num_trials is not None:
        overrides.append(f"sweep.num_trials={args.num_trials}")
    if args.storage is not None:
        overrides.append(f"storage.path={args.storage}")
    if args.tracking_uri is not None:
        overrides.append(f"tracking.uri={args.tracking_uri}")

    def body() -> int:
        from orchestrator.spec import load_spec
        from orchestrator.tuner import dry_run, run_sweep

        spec = load_spec(args.spec, overrides)
        if args.dry_run:
            dry_run(spec)
            return 0
        try:
            return run_sweep(spec, address=args.address, resume=args.resume, argv=sys.argv)
        except UserError as err:  # a service or resource a --set named: name the --set
            raise blame_set(err, spec.source, overrides) from None

    return cli_main(body)


if __name__ == "__main__":
    sys.exit(main())

"""The main job as a new user runs it, measured: ``python -m orchestrator.sweep SPEC`` in a fresh
copy of the checkout (corpus generation included), then what it answered, read back from MLflow.

Usage:
    python benchmarks/sweep_demo.py                                   # hybrid.yaml, prints JSON
    python benchmarks/sweep_demo.py --spec search_spaces/mixers.yaml --set sweep.num_trials=2
    python benchmarks/sweep_demo.py --keep /tmp/demo-copy             # keep the copy for a look
    python benchmarks/sweep_demo.py --quick                           # 2 trials of a micro budget

The copy holds the files git tracks plus the untracked ones it does not ignore (so an
uncommitted change is measured too) and nothing else: no ``data/``, ``runs/`` or ``mlflow.db``,
so the corpus is generated inside the measured wall time, as on a fresh clone. Only the virtual
environment is shared (linked), so package installation is not part of the time.

CPU utilisation is read from ``/proc/stat`` once a second while the sweep runs: the busy share of
all the machine's cores (1.0 = every core busy all the time). It counts whatever else runs on the
machine too, so measure on a quiet one; ``sweep_cpu_seconds`` is the CPU time of the sweep's own
process tree (the driver and the Ray processes it started), read from ``/proc`` before they exit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator.errors import cli_main, configure_logging  # noqa: E402

QUICK_SETS = ("sweep.num_trials=2", "pretrain.steps=4", "finetune.steps=6", "finetune.eval_every=3",
              "finetune.checkpoint_every=3", "pretrain.checkpoint_every=2")
TIME_KEYS = ("startup", "pretrain", "handoff", "finetune", "eval", "profile", "total")


def copy_checkout(dest: Path) -> None:
    """Copy the tracked and the untracked-but-not-ignored files of the checkout into ``dest``."""
    listing = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             check=True, capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listing):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    (dest / ".venv").symlink_to(ROOT / ".venv")


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all cores from the first line of /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


def _tree_cpu_seconds(root_pid: int, seen: dict[int, float]) -> None:
    """Record the CPU seconds of every live process below ``root_pid`` (the newest reading wins)."""
    tick = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    stats: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        parts = text[text.rindex(")") + 2:].split()
        children.setdefault(int(parts[1]), []).append(int(entry.name))
        stats[int(entry.name)] = (int(parts[11]) + int(parts[12])) / tick
    stack = [root_pid]
    while stack:
        pid = stack.pop()
        if pid in stats:
            seen[pid] = stats[pid]
        stack.extend(children.get(pid, []))


class CpuSampler(threading.Thread):
    """Samples machine-wide CPU busy share and the sweep's process-tree CPU time once a second."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid = pid
        self.samples: list[float] = []
        self.tree: dict[int, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        busy0, total0 = _cpu_times()
        while not self.stop.wait(1.0):
            busy, total = _cpu_times()
            if total > total0:
                self.samples.append((busy - busy0) / (total - total0))
            busy0, total0 = busy, total
            _tree_cpu_seconds(self.pid, self.tree)


def _rows(copy: Path, experiment: str) -> tuple[str | None, list[dict[str, Any]]]:
    from orchestrator.report import collect_rows
    from orchestrator.tracking import Tracker

    tracker = Tracker.open(f"sqlite:///{copy / 'mlflow.db'}", experiment)
    parents = tracker.client.search_runs([tracker.experiment_id], filter_string="tags.run_kind = 'sweep'",
                                         order_by=["attributes.start_time DESC"], max_results=1)
    if not parents:
        return None, []
    return parents[0].data.tags.get("sweep_id"), collect_rows(tracker, parents[0].info.run_id)


def _trial_summary(row: dict[str, Any]) -> dict[str, Any]:
    m = row["metrics"]
    tests = sorted({k.split("/")[1] for k in m if k.startswith("test/") and k.endswith("/wer")})
    return {
        "plan": row["plan"], "status": row["status"], "sampled": row["sampled"],
        "dev_cer": m.get("dev_cer"), "dev_wer": m.get("dev_wer"),
        "test": {s: {k: m.get(f"test/{s}/{k}") for k in ("wer", "wer_ci_low", "wer_ci_high", "cer")} for s in tests},
        "time_s": {k: m.get(f"time/{k}_s") for k in TIME_KEYS if f"time/{k}_s" in m},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", default="search_spaces/hybrid.yaml")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--quick", action="store_true", help="2 trials of a micro budget (checks the benchmark itself)")
    parser.add_argument("--keep", type=Path, help="copy the checkout here and keep it (default: a temp folder, removed)")
    parser.add_argument("--experiment", default="pom-ablations")
    args = parser.parse_args(argv)
    configure_logging()
    return cli_main(lambda: _demo(args, parser))


def _demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    copy = args.keep or Path(tempfile.mkdtemp(prefix="sweep-demo-"))
    copy.mkdir(parents=True, exist_ok=True)
    if any(copy.iterdir()):
        parser.error(f"--keep {copy}: the folder is not empty; give a new one")
    copy_checkout(copy)
    sets = [*(QUICK_SETS if args.quick else ()), *args.sets]
    command = [str(copy / ".venv/bin/python"), "-m", "orchestrator.sweep", args.spec, *(f"--set={s}" for s in sets)]
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env["POM_WORK_DIR"] = str(copy / "work")
    log_path = copy / "sweep.log"
    start = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, cwd=copy, env=env, stdout=log, stderr=subprocess.STDOUT)
        sampler = CpuSampler(proc.pid)
        sampler.start()
        returncode = proc.wait()
        sampler.stop.set()
        sampler.join()
    wall = time.monotonic() - start
    sweep_id, rows = _rows(copy, args.experiment) if (copy / "mlflow.db").exists() else (None, [])
    trials = [_trial_summary(r) for r in rows]
    times = {k: sum(t["time_s"].get(k) or 0.0 for t in trials) for k in TIME_KEYS}
    useful = times["pretrain"] + times["finetune"] + times["eval"]
    log_text = log_path.read_text(errors="replace")
    result = {
        "command": " ".join(["python", "-m", "orchestrator.sweep", args.spec, *(f"--set={s}" for s in sets)]),
        "returncode": returncode,
        "wall_s": round(wall, 1),
        "sweep_id": sweep_id,
        "trials": len(trials),
        "finished": sum(t["status"] == "FINISHED" for t in trials),
        "per_trial": trials,
        "time_breakdown_s": {k: round(v, 1) for k, v in times.items()},
        "train_eval_share_of_trial_wall": round(useful / times["total"], 3) if times["total"] else None,
        "cpu_busy_share_machine": round(sum(sampler.samples) / len(sampler.samples), 3) if sampler.samples else None,
        "cores": os.cpu_count(),
        "sweep_cpu_seconds": round(sum(sampler.tree.values()), 1),
        "warnings_in_output": [line for line in log_text.splitlines() if "Warning" in line or "WARNING" in line][:20],
        "copy": str(copy) if args.keep else None,
    }
    print(json.dumps(result, indent=2))
    if not args.keep:
        shutil.rmtree(copy, ignore_errors=True)
    return 0 if returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

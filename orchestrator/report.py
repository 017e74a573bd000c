"""Sweep results from MLflow alone: a terminal table, ``report.md`` and Pareto plots.

Usage:
    python -m orchestrator.report SWEEP_ID                      # MLflow at MLFLOW_TRACKING_URI or ./mlflow.db
    python -m orchestrator.report SWEEP_ID --tracking-uri sqlite:///mlflow.db --experiment pom-ablations --out DIR

The sweep writes the same report when it ends (and logs it as artifacts of its parent run); this
command regenerates it from the tracking store only, so it works for any sweep MLflow holds.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Sequence

from orchestrator.train.checkpoint import atomic_write_bytes

PLOT_AXES = (("params", "parameters"), ("encoder_peak_mem_mb", "encoder peak memory (MB)"), ("encoder_time_s", "encoder forward time (s)"))


def collect_rows(tracker, parent_run_id: str) -> list[dict[str, Any]]:
    """One row per trial run under the sweep's parent run."""
    rows = []
    for run in tracker.children(parent_run_id):
        data = run.data
        sampled = {k[len("sampled."):]: v for k, v in data.params.items() if k.startswith("sampled.")}
        rows.append({
            "run_id": run.info.run_id,
            "trial": data.tags.get("trial_key", run.info.run_name),
            "status": "STOPPED" if run.info.status == "KILLED" and STOPPED_TAG in data.tags else run.info.status,
            "plan": data.tags.get("layer_plan", "?"),
            "reason": data.tags.get("failure_reason", "") or data.tags.get(STOPPED_TAG, ""),
            "sampled": sampled,
            "metrics": dict(data.metrics),
            "pretrain_reused": data.tags.get("pretrain_reused", ""),
        })
    return rows


STOPPED_TAG = "stopped_early"


def mark_stopped_trials(tracker, parent_run_id: str, results, objectives: Sequence[str], scheduler: str) -> list[str]:
    """Close the MLflow runs of trials the scheduler stopped early (call after ``Tuner.fit`` returns).

    A trial stopped by ASHA never reaches its own end: its run would stay ``RUNNING`` forever.
    Every child run still ``RUNNING`` once Tune is done gets the last objective values Tune saw
    (``results``: the ``ResultGrid``), a ``stopped_early`` tag naming the scheduler and the
    iteration, and the status ``KILLED``; the report lists it as ``STOPPED``.

    Returns:
        The trial keys marked.
    """
    from orchestrator.tracking import TRIAL_KEY_TAG

    last: dict[str, dict[str, Any]] = {}
    for result in results or []:
        metrics = getattr(result, "metrics", None) or {}
        if metrics.get("trial_id"):
            last[str(metrics["trial_id"])] = metrics
    marked = []
    for run in tracker.children(parent_run_id):
        if run.info.status != "RUNNING":
            continue
        key = run.data.tags.get(TRIAL_KEY_TAG, "")
        metrics = last.get(key.rsplit("/", 1)[-1], {})
        values = {m: float(metrics[m]) for m in objectives if isinstance(metrics.get(m), (int, float)) and math.isfinite(metrics[m])}
        if values:
            tracker.log_metrics(run.info.run_id, values, step=int(metrics.get("finetune_step", 0) or 0))
        iteration = metrics.get("training_iteration")
        tracker.set_tags(run.info.run_id, {STOPPED_TAG: f"{scheduler} at iteration {iteration}" if iteration else scheduler})
        tracker.finish(run.info.run_id, "KILLED")
        marked.append(key)
    return marked


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else math.nan


def sort_rows(rows: list[dict[str, Any]], metric: str, mode: str) -> list[dict[str, Any]]:
    sign = 1.0 if mode == "min" else -1.0

    def key(row: dict[str, Any]):
        value = _num(row["metrics"].get(metric))
        return (math.isnan(value), sign * value if not math.isnan(value) else 0.0)

    return sorted(rows, key=key)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both (lower is better on both axes)."""
    front = []
    for i, (x, y) in enumerate(points):
        if math.isnan(x) or math.isnan(y):
            continue
        dominated = any(
            (x2 <= x and y2 <= y and (x2 < x or y2 < y))
            for j, (x2, y2) in enumerate(points) if j != i and not (math.isnan(x2) or math.isnan(y2))
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def _test_subsets(rows: list[dict[str, Any]]) -> list[str]:
    subsets = set()
    for row in rows:
        for key in row["metrics"]:
            if key.startswith("test/") and key.endswith("/wer"):
                subsets.add(key.split("/")[1])
    return sorted(subsets)


def _fmt(value: float, spec: str) -> str:
    return "-" if math.isnan(value) else format(value, spec)


def markdown_table(rows: list[dict[str, Any]], objective: str) -> str:
    subsets = _test_subsets(rows)
    head = ["#", "mixer plan", "params (M)", "dev WER"]
    head += [f"{s} WER [95% CI]" for s in subsets]
    head += ["peak mem (MB)", "time (s)", "status", "sampled"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, row in enumerate(rows, 1):
        m = row["metrics"]
        cells = [str(i), row["plan"], _fmt(_num(m.get("params")) / 1e6, ".2f"), _fmt(_num(m.get("dev_wer")), ".4f")]
        for s in subsets:
            wer, low, high = (_num(m.get(f"test/{s}/{k}")) for k in ("wer", "wer_ci_low", "wer_ci_high"))
            cells.append(f"{_fmt(wer, '.4f')} [{_fmt(low, '.3f')}, {_fmt(high, '.3f')}]")
        cells += [_fmt(_num(m.get("encoder_peak_mem_mb")), ".1f"), _fmt(_num(m.get("encoder_time_s")), ".4f")]
        status = row["status"]
        if row["reason"]:
            status += f": {row['reason'][:120]}"
        cells.append(status.replace("|", "/"))
        cells.append(", ".join(f"{k}={v}" for k, v in row["sampled"].items()).replace("|", "/"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def terminal_table(rows: list[dict[str, Any]], objective: str) -> str:
    header = f"{'#':>2}  {'status':<9} {objective:>10} {'params(M)':>9} {'mem(MB)':>9} {'time(s)':>8}  plan / sampled"
    out = [header, "-" * len(header)]
    for i, row in enumerate(rows, 1):
        m = row["metrics"]
        out.append(
            f"{i:>2}  {row['status'][:9]:<9} {_fmt(_num(m.get(objective)), '.4f'):>10} "
            f"{_fmt(_num(m.get('params')) / 1e6, '.2f'):>9} {_fmt(_num(m.get('encoder_peak_mem_mb')), '.1f'):>9} "
            f"{_fmt(_num(m.get('encoder_time_s')), '.4f'):>8}  {row['plan']}  "
            + ", ".join(f"{k}={v}" for k, v in row["sampled"].items())
        )
    return "\n".join(out)


def plot(rows: list[dict[str, Any]], metric: str, out_dir: Path) -> list[Path]:
    """WER against parameters, peak memory and time, with the Pareto front; PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for key, label in PLOT_AXES:
        points = [(_num(r["metrics"].get(key)), _num(r["metrics"].get(metric))) for r in rows]
        if all(math.isnan(x) or math.isnan(y) for x, y in points):
            continue
        fig, ax = plt.subplots(figsize=(6, 4.2))
        for (x, y), row in zip(points, rows):
            if not (math.isnan(x) or math.isnan(y)):
                ax.scatter([x], [y], s=28)
                ax.annotate(row["plan"], (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        front = pareto_front(points)
        if front:
            ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "k--", lw=1, label="Pareto front")
            ax.legend(fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"{metric}_vs_{key}.png"
        tmp = path.with_suffix(".tmp.png")
        fig.savefig(tmp, dpi=120)
        plt.close(fig)
        tmp.replace(path)
        paths.append(path)
    return paths


def write_report(tracker, parent_run_id: str, out_dir: Path, *, objectives: list[tuple[str, str]], quiet: bool = False) -> list[dict[str, Any]]:
    """Collect the trials from MLflow, print the table, write report.md + plots, log them."""
    metric, mode = objectives[0]
    rows = sort_rows(collect_rows(tracker, parent_run_id), metric, mode)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows, metric)
    finished = sum(r["status"] == "FINISHED" for r in rows)
    stopped = sum(r["status"] == "STOPPED" for r in rows)
    failed = [r for r in rows if r["status"] == "FAILED"]
    text = [
        f"# Sweep report ({parent_run_id})",
        "",
        f"Objective: {metric} ({mode}). Trials: {len(rows)} ({finished} finished, {stopped} stopped early, "
        f"{len(failed)} failed).",
        "",
        table,
        "",
    ]
    if failed:
        text += ["## Failed trials", ""] + [f"- {r['trial']}: {r['reason'] or 'no reason recorded'}" for r in failed] + [""]
    plots = plot(rows, metric, out_dir)
    text += [f"![{p.stem}]({p.name})" for p in plots]
    report = out_dir / "report.md"
    atomic_write_bytes(report, ("\n".join(text) + "\n").encode())
    try:
        tracker.log_artifact(parent_run_id, str(report), "report")
        for p in plots:
            tracker.log_artifact(parent_run_id, str(p), "report")
    except Exception as err:  # noqa: BLE001 - the report on disk is what matters
        print(f"warning: could not log the report to MLflow ({err})", file=sys.stderr)
    if not quiet:
        print(terminal_table(rows, metric), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    from orchestrator.tracking import SWEEP_ID_TAG, Tracker, TrackingError, default_tracking_uri

    parser = argparse.ArgumentParser(prog="python -m orchestrator.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_id", help="the sweep id (printed by the sweep; the sweep_id tag of its MLflow run)")
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--experiment", default="pom-ablations")
    parser.add_argument("--metric", default="dev_wer")
    parser.add_argument("--mode", default="min", choices=("min", "max"))
    parser.add_argument("--out", default=None, help="output folder (default ./reports/<sweep_id>)")
    args = parser.parse_args(argv)
    try:
        tracker = Tracker.open(args.tracking_uri or default_tracking_uri(), args.experiment)
    except TrackingError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    runs = tracker.client.search_runs([tracker.experiment_id], filter_string=f"tags.{SWEEP_ID_TAG} = '{args.sweep_id}'")
    if not runs:
        print(f"error: no sweep {args.sweep_id!r} in experiment {args.experiment!r}; list sweeps in the MLflow UI", file=sys.stderr)
        return 2
    out = Path(args.out or Path("reports") / args.sweep_id)
    write_report(tracker, runs[0].info.run_id, out, objectives=[(args.metric, args.mode)])
    print(f"report: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

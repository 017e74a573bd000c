"""Sweep results from MLflow alone: a headline, a terminal table, ``report.md`` and Pareto plots.

Usage:
    python -m orchestrator.report SWEEP_ID                      # MLflow at MLFLOW_TRACKING_URI or ./mlflow.db
    python -m orchestrator.report SWEEP_ID --tracking-uri sqlite:///mlflow.db --experiment pom-ablations --out DIR

The sweep writes the same report when it ends (and logs it as artifacts of its parent run, whose
MLflow description then holds the headline and the table); this command regenerates it from the
tracking store only, so it works for any sweep MLflow holds. Significance comes from each trial
run's per-utterance records (``eval/<subset>.tsv`` artifacts): every trial is compared with the
best one by a paired bootstrap over the same dev and test utterances (:mod:`orchestrator.stats`).
With replicate seeds (``sweep.seeds``) the headline and the terminal table rank configurations
by their seeds' means (:mod:`orchestrator.replicates`); the markdown table keeps every trial.
"""

from __future__ import annotations

import argparse
import ast
import math
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

from orchestrator import replicates
from orchestrator.fileio import atomic_output, atomic_write_bytes
from orchestrator.stats import compare, read_records

PLOT_AXES = (("params", "parameters"), ("encoder_peak_mem_mb", "encoder peak memory (MB)"), ("encoder_time_s", "encoder forward time (s)"))
STOPPED_TAG = "stopped_early"
SPLITS = ("dev", "test")
TIME_PHASES = ("startup", "pretrain", "handoff", "finetune", "eval", "profile")
WORK_PHASES = ("pretrain", "finetune", "eval")  # training + evaluation; the rest is overhead


def _dev_subsets(params: dict[str, str]) -> tuple[str, ...]:
    try:
        return tuple(ast.literal_eval(params.get("config.data.dev_subsets", "()")))
    except (ValueError, SyntaxError):
        return ()


def collect_rows(tracker, parent_run_id: str) -> list[dict[str, Any]]:
    """One row per trial run under the sweep's parent run."""
    rows = []
    for run in tracker.children(parent_run_id):
        data = run.data
        sampled = {k[len("sampled."):]: v for k, v in data.params.items() if k.startswith("sampled.")}
        seed = replicates.row_seed(data.params, sampled)
        rows.append({
            "run_id": run.info.run_id,
            "name": run.info.run_name or data.tags.get("trial_key", ""),
            "trial": data.tags.get("trial_key", run.info.run_name),
            "status": "STOPPED" if run.info.status == "KILLED" and STOPPED_TAG in data.tags else run.info.status,
            "plan": data.tags.get("layer_plan", "?"),
            "reason": data.tags.get("failure_reason", "") or data.tags.get(STOPPED_TAG, ""),
            "sampled": sampled,
            "seed": seed,
            "dev_subsets": _dev_subsets(data.params),
            "metrics": dict(data.metrics),
            "pretrain_reused": data.tags.get("pretrain_reused", ""),
        })
    return rows


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


# --------------------------------------------------------------------------------------------
# significance against the best trial (paired bootstrap on the per-utterance records)
# --------------------------------------------------------------------------------------------


def load_records(tracker, rows: list[dict[str, Any]], work_dir: Path) -> None:
    """Download each finished trial's ``eval/<subset>.tsv`` and pool them per split (dev, test).

    Sets ``row["records"] = {"dev": {...}, "test": {...}}`` (utterance keys ``<subset>/<id>``);
    a file that cannot be read sets ``row["records_error"]`` instead of stopping the report.
    Records of a decoding with a language model (``<subset>.lm.tsv``) are not paired.
    """
    for row in rows:
        row["records"] = {}
        if row["status"] != "FINISHED":
            continue
        try:
            files = tracker.download_eval_records(row["run_id"], work_dir / row["run_id"])
            pooled: dict[str, dict] = {split: {} for split in SPLITS}
            for subset, path in sorted(files.items()):
                if "." in subset:
                    continue
                split = "dev" if subset in row["dev_subsets"] or subset.startswith("dev") else "test"
                pooled[split].update(read_records(path, key_prefix=f"{subset}/"))
            row["records"] = {split: recs for split, recs in pooled.items() if recs}
        except (OSError, ValueError) as err:
            row["records_error"] = " ".join(str(err).split())[:300]


def add_comparisons(rows: list[dict[str, Any]], *, samples: int = 1000, seed: int = 0) -> dict[str, Any] | None:
    """Compare every trial with the best one that has records (``rows`` sorted best first).

    Sets ``row["vs_best"] = {split: {"wer": PairedDifference, "cer": ...}}`` (this trial minus the
    best: positive means more errors) or ``row["vs_best_error"]`` when the utterances differ.

    Returns:
        The best row, or ``None`` when no trial has records.
    """
    best = next((r for r in rows if r.get("records")), None)
    if best is None:
        return None
    for row in rows:
        row["vs_best"] = {}
        if row is best or not row.get("records"):
            continue
        for split in SPLITS:
            if split in row["records"] and split in best["records"]:
                try:
                    row["vs_best"][split] = compare(row["records"][split], best["records"][split], samples=samples,
                                                    seed=seed, names=(row["name"], best["name"]))
                except ValueError as err:
                    row["vs_best_error"] = str(err)
    return best


def _points(value: float) -> str:
    return f"{100 * value:+.1f}"


def fmt_diff(diff, *, ci: bool = True) -> str:
    """``+6.1 [+3.9, +8.2] *`` in error-rate points; ``*`` when the 95% interval excludes 0."""
    if diff is None:
        return "-"
    text = _points(diff.difference) + (f" [{_points(diff.low)}, {_points(diff.high)}]" if ci else "")
    return text + (" *" if diff.significant else "")


def _label(row: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    unique = sum(r["plan"] == row["plan"] for r in rows) == 1
    return row["plan"] if unique else row["name"]


def _magnitude(diff, rate: str) -> str:
    """``6.1 CER points [3.9, 8.2]``: the size of a significant difference, whichever its sign."""
    low, high = sorted((abs(100 * diff.low), abs(100 * diff.high)))
    return f"{abs(100 * diff.difference):.1f} {rate.upper()} points [{low:.1f}, {high:.1f}]"


def headline(rows: list[dict[str, Any]], best: dict[str, Any] | None, metric: str) -> str:
    """One paragraph in words: the best trial, which differences are significant, the rest within noise."""
    finished = [r for r in rows if r["status"] == "FINISHED"]
    if not finished:
        return f"No trial finished, so there is no answer yet ({len(rows)} trials; see the failures below)."
    top = rows[0]
    m = top["metrics"]
    text = (f"Best by {metric}: {_label(top, rows)} ({metric} {_num(m.get(metric)):.3f}{replicates.spread_text(top, metric)}"
            + (f", test WER {_num(m.get('test_wer')):.3f}" if "test_wer" in m else "") + ").")
    if best is None:
        return text + " The trials logged no per-utterance records, so no difference was tested for significance."
    if best is not top:
        text += f" Differences are measured against {_label(best, rows)}, the best trial with per-utterance records."
    split = "test" if "test" in best["records"] else "dev"
    n = len(best["records"][split])
    beats, loses, noise = [], [], []
    for row in rows:
        diffs = row.get("vs_best", {}).get(split)
        if diffs is None:
            continue
        significant = [k for k in ("wer", "cer") if diffs[k].significant]
        if not significant:
            noise.append(_label(row, rows))
            continue
        phrase = f"{_label(row, rows)} by " + " and ".join(_magnitude(diffs[k], k) for k in significant)
        (beats if diffs[significant[0]].difference > 0 else loses).append(phrase)
    if not (beats or loses or noise):
        return text + " No other trial has comparable records."
    clauses = []
    if beats:
        clauses.append(f"on the {n} {split} utterances it beats " + "; ".join(beats))
    if loses:
        clauses.append("it is worse on " + split + " than " + "; ".join(loses))
    if noise:
        others = "the other differences" if beats or loses else "all differences"
        clauses.append(f"{others} ({', '.join(noise)}) are within noise")
    sentence = "; ".join(clauses)
    return f"{text} {sentence[0].upper()}{sentence[1:]} (95% paired bootstrap over the same utterances)."


# --------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------


def _test_subsets(rows: list[dict[str, Any]]) -> list[str]:
    subsets = set()
    for row in rows:
        for key in row["metrics"]:
            if key.startswith("test/") and key.endswith("/wer"):
                subsets.add(key.split("/")[1])
    return sorted(subsets)


def _fmt(value: float, spec: str) -> str:
    return "-" if math.isnan(value) else format(value, spec)


def _vs(row: dict[str, Any], split: str, rate: str, *, ci: bool = True) -> str:
    if row.get("vs_best_error"):
        return "unpaired"
    diffs = row.get("vs_best", {}).get(split)
    if diffs is None:
        return "best" if row.get("is_best") and split in row.get("records", {}) else "-"
    return fmt_diff(diffs[rate], ci=ci)


def markdown_table(rows: list[dict[str, Any]], objective: str) -> str:
    subsets = _test_subsets(rows)
    head = ["#", "run", "mixer plan", "params (M)", "dev WER", "dev CER", "Δ dev WER vs best", "Δ dev CER vs best",
            "Δ test WER vs best", "Δ test CER vs best"]
    head += [f"{s} WER [95% CI]" for s in subsets]
    head += ["peak mem (MB)", "time (s)", "status", "sampled"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, row in enumerate(rows, 1):
        m = row["metrics"]
        cells = [str(i), row["name"], row["plan"], _fmt(_num(m.get("params")) / 1e6, ".2f"),
                 _fmt(_num(m.get("dev_wer")), ".4f"), _fmt(_num(m.get("dev_cer")), ".4f")]
        cells += [_vs(row, split, rate) for split in SPLITS for rate in ("wer", "cer")]
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


def _sd(row: dict[str, Any], metric: str) -> str:
    std, n = row.get("spread", {}).get(metric, (math.nan, 0))
    return f"{_fmt(std, '.4f')} ({n})" if n > 1 else ""


def terminal_table(rows: list[dict[str, Any]], objective: str) -> str:
    """One line per row; rows merged from replicates (:mod:`orchestrator.replicates`) add a ``±sd (n)`` column."""
    spread = any(r.get("spread") for r in rows)
    header = (f"{'#':>2}  {'status':<9} {objective:>10}" + (f" {'±sd (n)':>10}" if spread else "")
              + f" {'test WER':>8} {'Δdev WER':>9} {'Δtest WER':>9} {'Δtest CER':>9} {'params(M)':>9} "
              f"{'mem(MB)':>8}  run / sampled")
    out = [header, "-" * len(header)]
    for i, row in enumerate(rows, 1):
        m = row["metrics"]
        out.append(
            f"{i:>2}  {row['status'][:9]:<9} {_fmt(_num(m.get(objective)), '.4f'):>10}"
            + (f" {_sd(row, objective):>10}" if spread else "") + " "
            f"{_fmt(_num(m.get('test_wer')), '.4f'):>8} {_vs(row, 'dev', 'wer', ci=False):>9} "
            f"{_vs(row, 'test', 'wer', ci=False):>9} {_vs(row, 'test', 'cer', ci=False):>9} "
            f"{_fmt(_num(m.get('params')) / 1e6, '.2f'):>9} {_fmt(_num(m.get('encoder_peak_mem_mb')), '.1f'):>8}  "
            f"{row['name']}  " + ", ".join(f"{k}={v}" for k, v in row["sampled"].items())
        )
    out.append("Δ: this trial minus the best, in error-rate points; * = the 95% paired-bootstrap CI excludes 0")
    return "\n".join(out)


def time_breakdown(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown lines: the trials' ``time/<phase>_s`` summed, and the share of training + evaluation."""
    timed = [r for r in rows if _num(r["metrics"].get("time/total_s")) > 0]
    if not timed:
        return []
    total = sum(_num(r["metrics"]["time/total_s"]) for r in timed)
    sums = {p: sum(_num(r["metrics"].get(f"time/{p}_s")) for r in timed if not math.isnan(_num(r["metrics"].get(f"time/{p}_s"))))
            for p in TIME_PHASES}
    other = max(0.0, total - sum(sums.values()))
    work = sum(sums[p] for p in WORK_PHASES)
    lines = ["## Where the time went", "",
             f"Summed over {len(timed)} trials: {total:.1f} s of trial wall time; training + evaluation "
             f"(pre-train, fine-tune, eval) is {100 * work / total:.1f}% of it.", "",
             "| phase | seconds | share |", "|---|---|---|"]
    for phase, seconds in [*sums.items(), ("other", other)]:
        lines.append(f"| {phase} | {seconds:.1f} | {100 * seconds / total:.1f}% |")
    return lines + [""]


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
        with atomic_output(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
        plt.close(fig)
        paths.append(path)
    return paths


def mlflow_link(tracker, metric: str, mode: str) -> str:
    """Where to see the trials in the MLflow UI (model-training view, sorted by the objective)."""
    from orchestrator.tracking import experiment_page_url, redact_uri

    remote = tracker.uri.startswith(("http://", "https://"))
    url = experiment_page_url(tracker.uri if remote else "http://127.0.0.1:5000", tracker.experiment_id,
                              order_by_metric=metric, ascending=mode == "min")
    if remote:
        return f"MLflow: {redact_uri(url)}"
    return f"MLflow: `mlflow ui --backend-store-uri {redact_uri(tracker.uri)}`, then {url}"


def write_report(tracker, parent_run_id: str, out_dir: Path, *, objectives: list[tuple[str, str]], quiet: bool = False,
                 bootstrap_samples: int = 1000, seed: int = 0) -> list[dict[str, Any]]:
    """Collect the trials from MLflow, test differences, print the table, write report.md + plots, log them."""
    metric, mode = objectives[0]
    rows = sort_rows(collect_rows(tracker, parent_run_id), metric, mode)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="report-records-") as work:
        load_records(tracker, rows, Path(work))
    best = add_comparisons(rows, samples=bootstrap_samples, seed=seed)
    if best is not None:
        best["is_best"] = True
    # With replicate seeds, the headline and the terminal table speak of configurations (the seeds' means).
    configs = replicates.by_configuration(rows)
    if configs is not None:
        configs = sort_rows(configs, metric, mode)
        best_config = add_comparisons(configs, samples=bootstrap_samples, seed=seed)
        if best_config is not None:
            best_config["is_best"] = True
        summary = headline(configs, best_config, metric)
    else:
        summary = headline(rows, best, metric)
    table = markdown_table(rows, metric)
    finished = sum(r["status"] == "FINISHED" for r in rows)
    stopped = sum(r["status"] == "STOPPED" for r in rows)
    failed = [r for r in rows if r["status"] == "FAILED"]
    legend = (f"Δ: the trial's error rate minus the best trial's, in points (x100), with the 95% CI of a paired bootstrap "
              f"({bootstrap_samples} draws of the same dev/test utterances, seed {seed}); * = the CI excludes 0.")
    text = [
        f"# Sweep report ({parent_run_id})",
        "",
        summary,
        "",
        f"Objective: {metric} ({mode}). Trials: {len(rows)} ({finished} finished, {stopped} stopped early, "
        f"{len(failed)} failed). {mlflow_link(tracker, metric, mode)}",
        "",
        table,
        "",
        legend,
        "",
    ]
    unpaired = [r for r in [*rows, *(r for r in configs or () if r.get("members"))]
                if r.get("vs_best_error") or r.get("records_error")]
    if unpaired:
        text += ["## Not compared", ""] + [f"- {r['name']}: {r.get('vs_best_error') or r['records_error']}" for r in unpaired] + [""]
    text += replicates.section(configs, metric) + time_breakdown(rows)
    if failed:
        text += ["## Failed trials", ""] + [f"- {r['name']}: {r['reason'] or 'no reason recorded'}" for r in failed] + [""]
    plots = plot(rows, metric, out_dir)
    text += [f"![{p.stem}]({p.name})" for p in plots]
    report = out_dir / "report.md"
    atomic_write_bytes(report, ("\n".join(text) + "\n").encode())
    try:
        tracker.set_description(parent_run_id, "\n".join([summary, "", table, "", legend]))
        tracker.log_artifact(parent_run_id, str(report), "report")
        for p in plots:
            tracker.log_artifact(parent_run_id, str(p), "report")
    except Exception as err:  # noqa: BLE001 - the report on disk is what matters
        print(f"warning: could not log the report to MLflow ({err})", file=sys.stderr)
    if not quiet:
        print(summary + "\n\n" + terminal_table(configs or rows, metric), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    from orchestrator.errors import UserError, cli_main, configure_logging
    from orchestrator.tracking import SWEEP_ID_TAG, Tracker, default_tracking_uri

    parser = argparse.ArgumentParser(prog="python -m orchestrator.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_id", help="the sweep id (printed by the sweep; the sweep_id tag of its MLflow run)")
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--experiment", default="pom-ablations")
    parser.add_argument("--metric", default="dev_wer")
    parser.add_argument("--mode", default="min", choices=("min", "max"))
    parser.add_argument("--out", default=None, help="output folder (default ./reports/<sweep_id>)")
    parser.add_argument("--bootstrap-samples", type=int, default=1000, help="paired bootstrap draws (default 1000)")
    args = parser.parse_args(argv)
    configure_logging()

    def body() -> int:
        tracker = Tracker.open(args.tracking_uri or default_tracking_uri(), args.experiment)
        runs = tracker.client.search_runs([tracker.experiment_id], filter_string=f"tags.{SWEEP_ID_TAG} = '{args.sweep_id}'")
        if not runs:
            raise UserError(f"no sweep {args.sweep_id!r} in experiment {args.experiment!r}; list sweeps in the MLflow UI")
        out = Path(args.out or Path("reports") / args.sweep_id)
        write_report(tracker, runs[0].info.run_id, out, objectives=[(args.metric, args.mode)],
                     bootstrap_samples=args.bootstrap_samples)
        print(f"report: {out / 'report.md'}")
        return 0

    return cli_main(body)  # a UserError (tracking store, no such sweep): one line, exit 2


if __name__ == "__main__":
    sys.exit(main())

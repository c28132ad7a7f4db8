"""`collect`: every run of an experiment into one table (markdown and CSV, mean ± std over seeds) and
plots (PNG). Runs that failed, are still running or were never launched are listed, never dropped."""
import csv
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from src.algo.base import RESULTS_FILE
from src.sweep.backends import EXIT_FILE, LOG_FILE, active_jobs, read_job
from src.sweep.experiment import DECLARATION_FILE, DEFAULT_ROOT, Experiment, Run, SweepError, load_experiment
from src.utils.io import save_text

LOG_TAIL_LINES = 15


@dataclass
class RunRecord:
    run: Run
    # done | failed (exit N) | stopped by signal N | queued or running | incomplete | missing | unreadable
    status: str
    curve: list[tuple[int, float]] = field(default_factory=list)   # (round, test accuracy)
    final_accuracy: Optional[float] = None
    best_accuracy: Optional[float] = None
    final_loss: Optional[float] = None    # hard-label test loss
    rounds_to_target: Optional[int] = None
    train_time_s: Optional[float] = None
    job_id: Optional[str] = None
    log_tail: str = ""


def read_run(run: Run, target: Optional[float]) -> RunRecord:
    try:
        return _read_run(run, target)
    except (OSError, ValueError, KeyError, TypeError) as e:   # a damaged file spoils this run only
        return RunRecord(run, "unreadable", log_tail=f"{type(e).__name__}: {e}")


def _read_run(run: Run, target: Optional[float]) -> RunRecord:
    d = run.run_dir
    if not d.is_dir():
        return RunRecord(run, "missing")
    metrics = []
    for line in _lines(d / "metrics.jsonl"):
        try:
            metrics.append(json.loads(line))
        except ValueError:
            pass   # a line being written while we read
    curve = [(m["round"], m["test_accuracy"]) for m in metrics if "test_accuracy" in m and "round" in m]
    record = RunRecord(run, "incomplete", curve, job_id=read_job(run).get("job_id"),
                       rounds_to_target=next((r for r, acc in curve if acc >= target), None) if target else None)
    if (d / RESULTS_FILE).is_file():
        results = json.loads((d / RESULTS_FILE).read_text())
        record.status = "done"
        record.final_accuracy = results["final_test_accuracy"]
        record.best_accuracy = results["best_test_accuracy"]
        record.final_loss = results["final_test_loss"]
        record.train_time_s = results["train_time_s"]
        return record
    exit_code = (d / EXIT_FILE).read_text().strip() if (d / EXIT_FILE).is_file() else None
    if exit_code not in (None, "0"):
        # 128+N: stopped by signal N (SIGTERM: cancelled, preempted or requeued), not an error of its own
        record.status = f"stopped by signal {int(exit_code) - 128}" if int(exit_code) > 128 else f"failed (exit {exit_code})"
    record.log_tail = "\n".join(_lines(d / LOG_FILE)[-LOG_TAIL_LINES:])
    return record


def _lines(path: Path) -> list[str]:
    return path.read_text(errors="replace").splitlines() if path.is_file() else []


def mean_std(values: list[float]) -> tuple[Optional[float], Optional[float]]:
    """Mean and sample standard deviation (n - 1); the std is None for a single value."""
    if not values:
        return None, None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


@dataclass
class Summary:
    name: str
    records: list[RunRecord]
    stats: dict = field(default_factory=dict)    # column -> (mean, std) over finished seeds
    reached: int = 0                             # seeds that reached the target accuracy
    gap_closed: Optional[float] = None           # share of the baseline-to-reference gap closed
    step_closed: Optional[float] = None          # ... by this run's change over its parent

    @property
    def done(self) -> int:
        return sum(r.status == "done" for r in self.records)


METRICS = ("final_accuracy", "best_accuracy", "final_loss", "rounds_to_target", "train_time_s")


def summarize(experiment: Experiment, records: list[RunRecord]) -> list[Summary]:
    by_name: dict[str, Summary] = {}
    for record in records:
        by_name.setdefault(record.run.name, Summary(record.run.name, [])).records.append(record)
    for summary in by_name.values():
        done = [r for r in summary.records if r.status == "done"]
        for metric in METRICS:
            summary.stats[metric] = mean_std([getattr(r, metric) for r in done if getattr(r, metric) is not None])
        summary.reached = sum(r.rounds_to_target is not None for r in done)

    def final(name):
        return by_name[name].stats["final_accuracy"][0] if name in by_name else None
    base, ref = final(experiment.baseline), final(experiment.reference)
    if base is not None and ref is not None and ref != base:
        for summary in by_name.values():
            acc, parent = final(summary.name), final(experiment.parents.get(summary.name))
            if acc is not None:
                summary.gap_closed = (acc - base) / (ref - base)
                if parent is not None:
                    summary.step_closed = (acc - parent) / (ref - base)
    return list(by_name.values())


def fmt(stat: tuple, scale: float = 1.0, digits: int = 2) -> str:
    mean, std = stat
    if mean is None:
        return "—"
    text = f"{scale * mean:.{digits}f}"
    return text if std is None else f"{text} ± {scale * std:.{digits}f}"


def percent(value: Optional[float]) -> str:
    return "—" if value is None else f"{100 * value:+.0f}%"


def markdown_table(experiment: Experiment, summaries: list[Summary], target: Optional[float]) -> str:
    header = ["run", "seeds done", "final acc (%)", "best acc (%)", "test loss"]
    if target:
        header.append(f"rounds to {100 * target:g}%")
    header.append("train time (s)")
    gap = experiment.baseline is not None and experiment.reference is not None
    if gap:
        header += [f"gap closed ({experiment.baseline} → {experiment.reference})"]
        if experiment.parents:
            header.append("closed by its change")
    rows = []
    for s in summaries:
        row = [s.name, f"{s.done}/{len(s.records)}", fmt(s.stats["final_accuracy"], 100),
               fmt(s.stats["best_accuracy"], 100), fmt(s.stats["final_loss"], digits=3)]
        if target:
            reached = fmt(s.stats["rounds_to_target"], digits=1)
            row.append(reached if s.reached == s.done else f"{reached} ({s.reached}/{s.done} reached)")
        row.append(fmt(s.stats["train_time_s"], digits=1))
        if gap:
            row.append(percent(s.gap_closed))
            if experiment.parents:
                parent = experiment.parents.get(s.name)
                row.append(f"{percent(s.step_closed)} (vs {parent})" if parent else "—")
        rows.append(row)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def problems_section(records: list[RunRecord]) -> str:
    bad = [r for r in records if r.status != "done"]
    if not bad:
        return ""
    out = [f"## Runs not finished ({len(bad)} of {len(records)})", ""]
    for r in bad:
        job = f", job {r.job_id}" if r.job_id else ""
        where = f" after round {r.curve[-1][0]}" if r.curve else ""
        out.append(f"- **{r.run.key}**: {r.status}{where}{job} ({r.run.run_dir})")
        if r.log_tail:
            out += ["", "  ```", *(f"  {line}" for line in r.log_tail.splitlines()), "  ```", ""]
    return "\n".join(out) + "\n"


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def plot(experiment: Experiment, summaries: list[Summary], out_dir: Path) -> list[Path]:
    """accuracy.png: test accuracy against round (mean over seeds, band ± std); final_accuracy.png: the
    final accuracy of every run as a bar with its std."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(8, 5))
    ax.set_prop_cycle(color=plt.get_cmap("tab10" if len(summaries) <= 10 else "tab20").colors)   # one per run
    for s in summaries:
        rounds = sorted({r for rec in s.records for r, _ in rec.curve})
        points = [(r, mean_std([acc for rec in s.records for rr, acc in rec.curve if rr == r])) for r in rounds]
        if not points:
            continue
        xs = [r for r, _ in points]
        means = [100 * m for _, (m, _) in points]
        stds = [100 * (sd or 0.0) for _, (_, sd) in points]
        line, = ax.plot(xs, means, marker="o", markersize=3, label=s.name)
        ax.fill_between(xs, [m - d for m, d in zip(means, stds)], [m + d for m, d in zip(means, stds)],
                        color=line.get_color(), alpha=0.15)
    ax.set(xlabel="round", ylabel="test accuracy (%)", title=f"{experiment.name}: test accuracy per round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    curves = out_dir / "accuracy.png"
    fig.savefig(curves, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(summaries) + 2), 5))
    names = [s.name for s in summaries]
    means = [float("nan") if s.stats["final_accuracy"][0] is None else 100 * s.stats["final_accuracy"][0]
             for s in summaries]
    stds = [100 * (s.stats["final_accuracy"][1] or 0.0) for s in summaries]
    ax.bar(names, means, yerr=stds, capsize=4, color="tab:blue", alpha=0.8)
    for role, style in ((experiment.baseline, ":"), (experiment.reference, "--")):
        acc = next((s.stats["final_accuracy"][0] for s in summaries if s.name == role), None)
        if acc is not None:
            ax.axhline(100 * acc, color="k", linestyle=style, linewidth=1, label=f"{role} {100 * acc:.1f}%")
    ax.set(ylabel="final test accuracy (%)", title=f"{experiment.name}: final test accuracy (mean ± std over seeds)")
    ax.tick_params(axis="x", labelrotation=45)
    plt.setp(ax.get_xticklabels(), ha="right")
    if experiment.baseline or experiment.reference:
        ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    bars = out_dir / "final_accuracy.png"
    fig.savefig(bars, dpi=120)
    plt.close(fig)
    return [curves, bars]


def collect(spec: str, root: Optional[Path] = None, target: Optional[float] = None,
            plots: bool = True) -> tuple[Path, list[RunRecord]]:
    """Write <results folder>/{report.md, summary.csv, runs.csv, accuracy.png, final_accuracy.png};
    return the report's path and every run's record. `spec` is an experiment name, yaml file or
    results folder; the declaration saved at launch (with every seed launched) wins over the one in
    experiments/."""
    experiment = load_experiment(spec)
    if (Path(spec) / DECLARATION_FILE).is_file():
        out_dir = Path(spec).resolve()
    else:
        out_dir = Path(root or DEFAULT_ROOT).resolve() / experiment.name
        if not (out_dir / DECLARATION_FILE).is_file():
            raise SweepError([f"experiment {experiment.name} has not been launched into {out_dir.parent} "
                              "(is --root right?)"], "nothing collected")
        experiment = load_experiment(str(out_dir))
    target = target if target is not None else experiment.target_accuracy
    if target is not None and not 0 < target <= 1:
        raise SweepError([f"target accuracy {target}: give a fraction in (0, 1], e.g. 0.7"], "nothing collected")
    records = [read_run(run, target) for run in experiment.runs_in(out_dir)]
    active = active_jobs([r.job_id for r in records if r.status != "done" and r.job_id])
    for r in records:
        if r.status != "done" and r.job_id and r.job_id.split("_")[0] in active:
            r.status = "queued or running"   # e.g. requeued after a SIGTERM: not a failure
    summaries = summarize(experiment, records)

    write_csv(out_dir / "runs.csv",
              ["run", "seed", "status", "final_accuracy", "best_accuracy", "final_test_loss", "rounds_to_target",
               "train_time_s", "job_id", "run_dir"],
              [[r.run.name, r.run.seed, r.status, r.final_accuracy, r.best_accuracy, r.final_loss,
                r.rounds_to_target, r.train_time_s, r.job_id, r.run.run_dir] for r in records])
    write_csv(out_dir / "summary.csv",
              ["run", "seeds_done", "seeds_total"] + [f"{m}_{x}" for m in METRICS for x in ("mean", "std")]
              + ["target_reached", "gap_closed", "step_gap_closed"],
              [[s.name, s.done, len(s.records)] + [v for m in METRICS for v in s.stats[m]]
               + [s.reached, s.gap_closed, s.step_closed] for s in summaries])
    images = plot(experiment, summaries, out_dir) if plots else []
    done = sum(r.status == "done" for r in records)
    report = [f"# {experiment.name}", ""]
    if experiment.description:
        report += [experiment.description.strip(), ""]
    report += [f"{done} of {len(records)} runs finished (seeds {experiment.seeds}); mean ± sample std over "
               "the finished seeds. Test loss is the hard-label cross-entropy.", "",
               markdown_table(experiment, summaries, target), ""]
    report += [f"![{p.stem}]({p.name})" for p in images] + [""]
    report.append(problems_section(records))
    path = out_dir / "report.md"
    save_text("\n".join(report).rstrip() + "\n", path)
    return path, records

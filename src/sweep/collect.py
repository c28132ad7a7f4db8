"""`collect`: every run of an experiment into one table (markdown and CSV, mean ± std over seeds) and
plots (PNG). Runs that failed, diverged, are still running or were never launched are listed, never dropped.
A folder of ad-hoc runs (outputs/..., multirun/...) is compared too: its runs are grouped by config."""
import csv
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from src.sweep.experiment import (DECLARATION_FILE, DEFAULT_ROOT, Experiment, Run, SweepError, hydra_value,
                                  load_experiment)
from src.sweep.protocol import CONFIG_FILE, EXIT_FILE, LOG_FILE, METRICS_FILE, RESULTS_FILE, read_job
from src.sweep.slurm import active_jobs
from src.utils.io import save_text

LOG_TAIL_LINES = 15


@dataclass
class RunRecord:
    run: Run
    # done | diverged in round N | failed (exit N) | stopped by signal N | queued or running | incomplete
    # | missing | unreadable
    status: str
    curve: list[tuple[int, float]] = field(default_factory=list)   # (round, test accuracy)
    final_accuracy: Optional[float] = None
    best_accuracy: Optional[float] = None
    final_loss: Optional[float] = None    # hard-label test loss
    val_selected_accuracy: Optional[float] = None  # test accuracy of the best-validation round (dataset.val_fraction)
    client_accuracy: Optional[float] = None   # final mean per-client accuracy (clients.test_fraction)
    worst10_accuracy: Optional[float] = None  # ... of the worst 10 % of clients
    jain_index: Optional[float] = None        # Jain's fairness index of the per-client accuracies
    bytes_up: Optional[float] = None          # bytes the clients' updates took over the run (compression=...)
    upload_ratio: Optional[float] = None      # ... against the same updates uncompressed (x times fewer)
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
    for line in _lines(d / METRICS_FILE):
        try:
            metrics.append(json.loads(line))
        except ValueError:
            pass   # a line being written while we read
    curve = [(m["round"], m["test_accuracy"]) for m in metrics if "round" in m and finite(m.get("test_accuracy"))]
    record = RunRecord(run, "incomplete", curve, job_id=read_job(d).get("job_id"),
                       rounds_to_target=next((r for r, acc in curve if acc >= target), None) if target else None)
    exit_code = (d / EXIT_FILE).read_text().strip() if (d / EXIT_FILE).is_file() else None
    if (d / RESULTS_FILE).is_file():
        results = json.loads((d / RESULTS_FILE).read_text())
        numbers = [results.get(k) for k in ("final_test_accuracy", "best_test_accuracy", "final_test_loss",
                                             "train_time_s")]
        # older runs wrote a bare NaN instead of marking the divergence
        if results.get("diverged") or any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
            round_ = results.get("diverged_round")
            record.status = f"diverged in round {round_}" if round_ is not None else "diverged"
        else:
            record.status = "done"
            record.final_accuracy, record.best_accuracy, record.final_loss, record.train_time_s = numbers
            record.val_selected_accuracy = results.get("best_val_test_accuracy")
            record.client_accuracy = results.get("final_client_acc_mean")
            record.worst10_accuracy = results.get("final_client_acc_worst10")
            record.jain_index = results.get("final_client_acc_jain")
            record.bytes_up, raw = results.get("bytes_up"), results.get("bytes_up_uncompressed")
            record.upload_ratio = raw / record.bytes_up if record.bytes_up and raw else None
            return record
    elif exit_code not in (None, "0"):
        # 128+N: stopped by signal N (SIGTERM: cancelled, preempted or requeued), not an error of its own
        record.status = f"stopped by signal {int(exit_code) - 128}" if int(exit_code) > 128 else f"failed (exit {exit_code})"
    record.log_tail = "\n".join(_lines(d / LOG_FILE)[-LOG_TAIL_LINES:])
    return record


def _lines(path: Path) -> list[str]:
    return path.read_text(errors="replace").splitlines() if path.is_file() else []


def finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


# ---------------------------------------------------------------- ad-hoc runs (outputs/..., multirun/...)

# top-level settings that do not make another variant: a run with another seed, name or device is one
# more sample of the same variant
NOT_A_VARIANT = ("seed", "name", "resume", "logger", "checkpoint", "device", "eval_batch_size")


@dataclass
class Folder:
    """A folder of run directories, reported as if it were an experiment (no baseline, no parents)."""
    name: str
    seeds: list[int]
    description: str = ""
    target_accuracy: Optional[float] = None
    baseline: Optional[str] = None
    reference: Optional[str] = None
    parents: dict = field(default_factory=dict)


def run_dirs(folder: Path) -> list[Path]:
    """The run directories (holding config.yaml) in and under `folder`; a run's own folders and hidden
    ones (.hydra) are not searched."""
    if (folder / CONFIG_FILE).is_file():
        return [folder]
    return [d for sub in sorted(folder.iterdir()) if sub.is_dir() and not sub.name.startswith(".")
            for d in run_dirs(sub)]


def folder_runs(folder: Path) -> tuple[Folder, list[Run], list[RunRecord]]:
    """Group the run directories under `folder` into variants (configs equal but for NOT_A_VARIANT) named
    by the settings in which they differ. Returns the folder, its runs, and a record for every run
    directory whose config.yaml cannot be read."""
    broken, shapes, seeds = [], {}, {}
    for d in run_dirs(folder):
        try:
            cfg = yaml.safe_load((d / CONFIG_FILE).read_text())
            if not isinstance(cfg, dict) or not isinstance(cfg.get("seed"), int):
                raise ValueError(f"{CONFIG_FILE} is not a run's config (no integer seed)")
        except (OSError, ValueError, yaml.YAMLError) as e:
            run = Run(folder.name, str(d.relative_to(folder)), None, (), d)
            broken.append(RunRecord(run, "unreadable", log_tail=f"{type(e).__name__}: {e}"))
            continue
        shapes[d] = flatten({k: v for k, v in cfg.items() if k not in NOT_A_VARIANT})
        seeds[d] = cfg["seed"]
    if not shapes and not broken:
        raise SweepError([f"{folder} holds no run directory (a folder with {CONFIG_FILE}) and no {DECLARATION_FILE}: "
                          "give a results folder, an outputs/ or multirun/ folder of runs, or an experiment name"],
                         "nothing collected")
    variants = list({json.dumps(shape, sort_keys=True, default=str): shape for shape in shapes.values()}.values())
    labels = variant_labels(variants) if len(variants) > 1 else [folder.name]
    runs = sorted((Run(folder.name, labels[variants.index(shape)], seeds[d], (), d) for d, shape in shapes.items()),
                  key=lambda r: (labels.index(r.name), r.seed, str(r.run_dir)))
    described = Folder(folder.name, sorted(set(seeds.values())),
                       f"Runs under {folder}, named by the settings in which they differ.")
    return described, runs, broken


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


UNSET = object()


def variant_labels(shapes: list[dict]) -> list[str]:
    """`key=value` for every setting that differs between the variants. A setting that follows from a
    differing class (`algo.server._target_`: its lr, its weighting) is named by the class alone:
    `algo.server=ScaffoldServer`."""
    keys = list(dict.fromkeys(k for shape in shapes for k in shape))
    groups = list(dict.fromkeys(k.split(".")[0] for k in keys))
    keys.sort(key=lambda k: groups.index(k.split(".")[0]))   # a group's keys together, as in config.yaml
    differ = {k for k in keys if len({repr(shape.get(k, UNSET)) for shape in shapes}) > 1}

    def follows_a_class(key: str) -> bool:
        parts = key.split(".")
        for i in range(1, len(parts)):
            target = ".".join(parts[:i]) + "._target_"
            if target != key and target in differ:
                value_of = {}
                if all(value_of.setdefault(repr(s.get(target)), repr(s.get(key, UNSET))) == repr(s.get(key, UNSET))
                       for s in shapes):
                    return True
        return False

    shown = [k for k in keys if k in differ and not follows_a_class(k)]

    def part(shape: dict, key: str) -> str:
        value = shape.get(key, UNSET)
        if key.endswith("._target_"):
            key, value = key[:-len("._target_")], value if value is UNSET else str(value).rsplit(".", 1)[-1]
        return f"{key}=unset" if value is UNSET else f"{key}={hydra_value(value)}"
    return [" ".join(part(shape, k) for k in shown) for shape in shapes]


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


METRICS = ("final_accuracy", "best_accuracy", "final_loss", "rounds_to_target", "train_time_s",
           "val_selected_accuracy", "client_accuracy", "worst10_accuracy", "jain_index", "bytes_up", "upload_ratio")
# columns of report.md shown only when a run reports them (validation split, per-client evaluation, compression)
OPTIONAL_COLUMNS = {"val_selected_accuracy": ("val-selected acc (%)", 100, 2), "client_accuracy": ("client acc (%)", 100, 2),
                    "worst10_accuracy": ("worst-10% acc (%)", 100, 2), "jain_index": ("Jain index", 1, 3),
                    "bytes_up": ("uploaded (MB)", 1e-6, 2), "upload_ratio": ("upload compression (x)", 1, 1)}


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
    optional = [m for m in OPTIONAL_COLUMNS if any(s.stats[m][0] is not None for s in summaries)]
    header += [OPTIONAL_COLUMNS[m][0] for m in optional]
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
        row += [fmt(s.stats[m], OPTIONAL_COLUMNS[m][1], OPTIONAL_COLUMNS[m][2]) for m in optional]
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
    out = [f"## Runs without a result ({len(bad)} of {len(records)})", ""]
    for r in bad:
        job = f", job {r.job_id}" if r.job_id else ""
        where = f" after round {r.curve[-1][0]}" if r.curve and not r.status.startswith("diverged") else ""
        out.append(f"- **{r.run.key}**: {r.status}{where}{job} ({r.run.run_dir})")
        if r.log_tail:
            out += ["", "  ```", *(f"  {line}" for line in r.log_tail.splitlines()), "  ```", ""]
    return "\n".join(out) + "\n"


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


LINE_STYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "x", "P")


def curve_style(i: int, colors: tuple) -> dict:
    """Run i's colour, line style and marker: style and marker change from each run to the next, so
    curves that overlap (or share a colour) stay apart; the combinations repeat after 140 runs at the
    earliest."""
    return {"color": colors[i % len(colors)], "linestyle": LINE_STYLES[i % len(LINE_STYLES)],
            "marker": MARKERS[i % len(MARKERS)]}


def accuracy_figure(experiment: Experiment, summaries: list[Summary]):
    """Test accuracy against round: mean over seeds, band ± std, one line per run; the legend is
    outside the axes, on the right, never over the curves."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.get_cmap("tab10" if len(summaries) <= 10 else "tab20").colors
    for s in summaries:
        rounds = sorted({r for rec in s.records for r, _ in rec.curve})
        points = [(r, mean_std([acc for rec in s.records for rr, acc in rec.curve if rr == r])) for r in rounds]
        if not points:
            continue
        xs = [r for r, _ in points]
        means = [100 * m for _, (m, _) in points]
        stds = [100 * (sd or 0.0) for _, (_, sd) in points]
        line, = ax.plot(xs, means, markersize=4, markevery=max(1, len(xs) // 12), label=s.name,
                        **curve_style(len(ax.lines), colors))
        ax.fill_between(xs, [m - d for m, d in zip(means, stds)], [m + d for m, d in zip(means, stds)],
                        color=line.get_color(), alpha=0.15)
    ax.set(xlabel="round", ylabel="test accuracy (%)", title=f"{experiment.name}: test accuracy per round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0,
                  ncol=1 + len(ax.lines) // 25)
    fig.tight_layout()
    return fig


def plot(experiment: Experiment, summaries: list[Summary], out_dir: Path) -> list[Path]:
    """accuracy.png: test accuracy against round (mean over seeds, band ± std); final_accuracy.png: the
    final accuracy of every run as a bar with its std."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = accuracy_figure(experiment, summaries)
    curves = out_dir / "accuracy.png"
    fig.savefig(curves, dpi=120, bbox_inches="tight")   # "tight" takes the legend beside the axes in
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
    experiments/. A folder without a declaration is a folder of ad-hoc runs (see folder_runs)."""
    broken = []
    if Path(spec).is_dir() and not (Path(spec) / DECLARATION_FILE).is_file():
        out_dir = Path(spec).resolve()
        experiment, runs, broken = folder_runs(out_dir)
    else:
        out_dir = Path(spec).resolve()
        if not (out_dir / DECLARATION_FILE).is_file():
            name = load_experiment(spec).name
            out_dir = Path(root or DEFAULT_ROOT).resolve() / name
            if not (out_dir / DECLARATION_FILE).is_file():
                raise SweepError([f"experiment {name} has not been launched into {out_dir.parent} "
                                  "(is --root right?)"], "nothing collected")
        experiment = load_experiment(str(out_dir))
        runs = experiment.runs_in(out_dir)
    target = target if target is not None else experiment.target_accuracy
    if target is not None and not 0 < target <= 1:
        raise SweepError([f"target accuracy {target}: give a fraction in (0, 1], e.g. 0.7"], "nothing collected")
    records = [read_run(run, target) for run in runs] + broken
    active = active_jobs([r.job_id for r in records if r.status != "done" and r.job_id])
    for r in records:
        if r.status != "done" and r.job_id and r.job_id.split("_")[0] in active:
            r.status = "queued or running"   # e.g. requeued after a SIGTERM: not a failure
    summaries = summarize(experiment, records)

    write_csv(out_dir / "runs.csv",
              ["run", "seed", "status", "final_accuracy", "best_accuracy", "final_test_loss", "rounds_to_target",
               "train_time_s", *OPTIONAL_COLUMNS, "job_id", "run_dir"],
              [[r.run.name, r.run.seed, r.status, r.final_accuracy, r.best_accuracy, r.final_loss,
                r.rounds_to_target, r.train_time_s, *(getattr(r, m) for m in OPTIONAL_COLUMNS), r.job_id,
                r.run.run_dir] for r in records])
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

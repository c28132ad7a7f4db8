"""Sweeps: an experiment's grid x seeds -> runs of train.py on this machine or on SLURM, then one table.

    python experiment_runner.py list
    python experiment_runner.py run playbook                                 # here, one run at a time
    python experiment_runner.py run playbook --backend slurm --cluster experiments/slurm/example.yaml
    python experiment_runner.py run playbook --backend slurm --cluster FILE --dry-run   # only write scripts
    python experiment_runner.py run playbook --backend submitit --cluster FILE --set time=04:00:00
    python experiment_runner.py collect playbook                             # report.md, CSVs, PNGs
    python experiment_runner.py collect multirun/fedavg_fashion_mnist        # or outputs/...: ad-hoc runs

An experiment is experiments/NAME.yaml (or any yaml path); see README.md, "Sweeps"."""
import argparse
import dataclasses
import sys
import textwrap
from pathlib import Path

from src.errors import UserError
from src.sweep.runner import BACKENDS, launch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="the experiments in experiments/")

    run = commands.add_parser("run", help="launch an experiment's runs")
    run.add_argument("experiment", help="a name from experiments/, or a yaml file")
    run.add_argument("--backend", choices=BACKENDS, default="local")
    run.add_argument("--parallel", type=int, default=1, help="local: runs at a time (torch threads are split)")
    run.add_argument("--cluster", type=Path, help="slurm/submitit: a yaml of SBATCH options (experiments/slurm/)")
    run.add_argument("--set", dest="slurm_set", action="append", default=[], metavar="KEY=VALUE",
                     help="slurm/submitit: override one SBATCH option, e.g. --set partition=gpu")
    run.add_argument("--seeds", type=int, nargs="+", help="replace the experiment's seeds")
    run.add_argument("--root", type=Path, help="results folder (default: results/)")
    run.add_argument("--dry-run", action="store_true", help="slurm: write the sbatch scripts, submit nothing")
    run.add_argument("--wait", action="store_true", help="slurm/submitit: wait for the jobs, then collect")

    collect = commands.add_parser("collect", help="tables and plots of an experiment's runs")
    collect.add_argument("experiment", help="a name from experiments/, a yaml file, a results folder, or a folder "
                         "of run directories (outputs/..., multirun/...)")
    collect.add_argument("--root", type=Path, help="results folder (default: results/)")
    collect.add_argument("--target", type=float, help="report the rounds to reach this test accuracy (e.g. 0.7)")
    args = parser.parse_args(argv)

    from src.sweep.collect import collect as collect_runs
    from src.sweep.experiment import EXPERIMENTS_DIR, load_experiment

    try:
        if args.command == "list":
            for path in sorted(EXPERIMENTS_DIR.glob("*.yaml")):
                try:
                    exp = load_experiment(str(path))
                except UserError as e:
                    print(f"{path.stem:20s} cannot be read: {e}")
                    continue
                summary = textwrap.shorten(exp.description, 70, placeholder=" ...")
                print(f"{exp.name:20s} {len(exp.variants())} variants x {len(exp.seeds)} seeds  {summary}")
            return 0
        if args.command == "run":
            if args.parallel < 1:
                raise UserError(f"--parallel {args.parallel}: give at least 1")
            if args.backend == "local" and (args.cluster or args.slurm_set or args.wait):
                raise UserError("--cluster, --set and --wait are for --backend slurm or submitit")
            experiment = load_experiment(args.experiment)
            if args.seeds:
                experiment = dataclasses.replace(experiment, seeds=args.seeds)   # checked again
            outcome = launch(experiment, args.backend, args.root, args.parallel, args.cluster,
                             tuple(args.slurm_set), args.dry_run, args.wait)
            if args.dry_run:
                return 0
            if args.backend != "local" and not args.wait and outcome["job_ids"]:
                print(f"when the jobs are done: python experiment_runner.py collect {experiment.name}"
                      + (f" --root {args.root}" if args.root else ""))
                return 0
            report, records = collect_runs(str(outcome["experiment_dir"]))
            print(report.read_text())
            return 0 if all(r.status == "done" for r in records) else 1
        report, _ = collect_runs(args.experiment, args.root, args.target)
        print(report.read_text())
        print(f"written: {report.parent}/{{report.md, summary.csv, runs.csv, accuracy.png, final_accuracy.png}}")
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

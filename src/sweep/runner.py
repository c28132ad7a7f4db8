"""Launch an experiment: expand its runs, compose and validate every one of them, then hand them to a
backend. Also usable from Python: `launch(Experiment(name=..., grid={...}), backend="local")`."""
from pathlib import Path
from typing import Optional

from src.sweep import backends
from src.sweep.experiment import DEFAULT_ROOT, Experiment, Run, SweepError, check_runs, save_declaration
from src.sweep.protocol import RESULTS_FILE, read_job

BACKENDS = ("local", "slurm", "submitit")


def is_done(run: Run) -> bool:
    """Finished, and with the overrides it has now: a run whose declaration changed runs again
    (train.py then continues it, or refuses with the settings that differ)."""
    return (run.run_dir / RESULTS_FILE).exists() and read_job(run.run_dir).get("overrides") == run.train_args()


def launch(experiment: Experiment, backend: str = "local", root: Optional[Path] = None, parallel: int = 1,
           cluster_file: Optional[Path] = None, slurm_set: tuple[str, ...] = (), dry_run: bool = False,
           wait: bool = False, log=print) -> dict:
    """Returns {"experiment_dir", "runs", "skipped", "job_ids", "exit_codes"}. Runs that already finished
    with the same overrides, or whose SLURM job is still queued or running, are skipped; unfinished ones
    continue from their checkpoint."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: choose one of {BACKENDS}")
    if dry_run and backend != "slurm":
        raise SweepError(["a dry run writes sbatch scripts: use it with the slurm backend"])
    root = Path(root or DEFAULT_ROOT).resolve()
    if any(c.isspace() or c == "%" for c in str(root)):   # SBATCH --output would misread them
        raise SweepError([f"results folder {str(root)!r}: choose a path without spaces or '%'"])
    blocking = next(p for p in (root / experiment.name, root, *root.parents) if p.exists())
    if not blocking.is_dir():
        raise SweepError([f"results folder {root / experiment.name}: {blocking} is a file, not a folder; give "
                          "--root a folder (it is created if missing)"])
    runs = experiment.runs(root)
    options = None
    if backend != "local":
        options = backends.load_slurm_options(cluster_file, experiment.slurm, list(slurm_set))
        backends.check_tasks(runs, options)
        if not dry_run:   # scripts can be written anywhere, e.g. to copy to a cluster
            backends.check_slurm(options)
        if backend == "submitit":
            backends.submitit_parameters(options, experiment.name)   # its own checks (time limit)
    check_runs(runs)
    experiment_dir = save_declaration(experiment, root).parent
    done = [r.key for r in runs if is_done(r)]
    queued = backends.queued_runs([r for r in runs if r.key not in done])
    todo = [r for r in runs if r.key not in done and r.key not in queued]
    log(f"{experiment.name}: {len(runs)} runs ({len(runs) // len(experiment.seeds)} variants x "
        f"{len(experiment.seeds)} seeds) in {experiment_dir}"
        + (f"; {len(done)} already finished" if done else "")
        + (f"; {len(queued)} still queued or running as jobs {sorted(queued.values())}" if queued else ""))
    outcome = {"experiment_dir": experiment_dir, "runs": [r.key for r in runs], "skipped": done + list(queued),
               "job_ids": [], "exit_codes": {}}
    if not todo and not dry_run:
        return outcome
    if backend == "local":
        outcome["exit_codes"] = backends.run_local(todo, parallel, log=log)
    elif backend == "slurm":
        outcome["job_ids"] = backends.run_slurm(todo, experiment_dir, options, dry_run, log=log)
    else:
        outcome["job_ids"] = backends.run_submitit(todo, experiment_dir, options, log=log)
    if wait and outcome["job_ids"]:
        log("waiting for the jobs to leave the queue ...")
        backends.wait_for_jobs(outcome["job_ids"])
    return outcome

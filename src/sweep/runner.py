"""Launch an experiment: expand its runs, compose and validate every one of them, then hand them to a
backend. Also usable from Python: `launch(Experiment(name=..., grid={...}), backend="local")`."""
from pathlib import Path
from typing import Optional

from src.sweep import backends
from src.sweep.experiment import DEFAULT_ROOT, Experiment, check_runs, save_declaration

BACKENDS = ("local", "slurm", "submitit")


def launch(experiment: Experiment, backend: str = "local", root: Optional[Path] = None, parallel: int = 1,
           cluster_file: Optional[Path] = None, slurm_set: tuple[str, ...] = (), dry_run: bool = False,
           wait: bool = False, log=print) -> dict:
    """Returns {"experiment_dir", "runs", "skipped", "job_ids", "exit_codes"}. Runs that already
    finished (results.json in their folder) are skipped; unfinished ones continue from their checkpoint."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: choose one of {BACKENDS}")
    root = Path(root or DEFAULT_ROOT).resolve()
    runs = experiment.runs(root)
    options = None
    if backend != "local":
        options = backends.load_slurm_options(cluster_file, experiment.slurm, list(slurm_set))
        if not dry_run:   # scripts can be written anywhere, e.g. to copy to a cluster
            backends.check_slurm(options)
        if backend == "submitit":
            backends.submitit_parameters(options, experiment.name)   # its own checks (time limit)
    check_runs(runs)
    experiment_dir = save_declaration(experiment, root).parent
    todo = [r for r in runs if not backends.is_done(r)]
    skipped = [r.key for r in runs if r not in todo]
    log(f"{experiment.name}: {len(runs)} runs ({len(runs) // len(experiment.seeds)} variants x "
        f"{len(experiment.seeds)} seeds) in {experiment_dir}" + (f"; {len(skipped)} already finished" if skipped else ""))
    outcome = {"experiment_dir": experiment_dir, "runs": [r.key for r in runs], "skipped": skipped, "job_ids": [], "exit_codes": {}}
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

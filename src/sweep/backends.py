"""Where the runs of a sweep execute: `local` (this machine, N at a time, here), `slurm` (sbatch
scripts, src/sweep/slurm.py), `submitit` (a job array through submitit, src/sweep/submitit_backend.py).
Every backend runs train.py as the run-directory protocol says (src/sweep/protocol.py)."""
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from src.sweep.experiment import Run
from src.sweep.protocol import EXIT_FILE, LOG_FILE, execute, python_command, record_job, thread_env  # noqa: F401
# the other backends' entry points, for the runner (tests import some of them from here too)
from src.sweep.slurm import (check_slurm, check_tasks, load_slurm_options, queued_runs, run_slurm,  # noqa: F401
                             slurm_minutes, wait_for_jobs)
from src.sweep.submitit_backend import run_submitit, submitit_parameters  # noqa: F401


def run_local(runs: list[Run], parallel: int = 1, log=print) -> dict[str, int]:
    """Run train.py for every run, `parallel` at a time; a failing run does not stop the others.
    Torch threads are split between the parallel runs unless OMP_NUM_THREADS is set."""
    env = thread_env((os.cpu_count() or 1) // parallel)
    lock, finished, codes = threading.Lock(), [0], {}

    def one(run: Run) -> None:
        record_job(run.run_dir, "local", None, run.train_args())
        start = time.perf_counter()
        code = execute(python_command() + run.train_args(), run.run_dir, env)
        with lock:
            finished[0] += 1
            codes[run.key] = code
            outcome = "done" if code == 0 else f"FAILED (exit {code}; log: {run.run_dir / LOG_FILE})"
            log(f"[{finished[0]}/{len(runs)}] {run.experiment}/{run.key}: {outcome} in {time.perf_counter() - start:.0f} s")

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        list(pool.map(one, runs))
    return codes

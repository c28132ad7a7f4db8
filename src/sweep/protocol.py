"""The run-directory protocol that training and the sweep share: the files a run directory holds and
how a backend runs train.py in it. Every backend runs `python train.py <overrides> seed=S
hydra.run.dir=<run dir>` in the repository, with its output appended to LOG_FILE and its exit code
written to EXIT_FILE; JOB_FILE records who launched it and with which overrides.

It imports no torch and no Hydra, so that `experiment_runner.py list` and `collect` start in a moment
(tests/test_sweep_protocol.py checks it)."""
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

from src.utils.io import save_json

ROOT = Path(__file__).resolve().parents[2]   # where train.py is: every run's working directory

# written by train.py
RESUME_FILE = "resume.pt"        # the checkpoint a stopped run continues from
RESULTS_FILE = "results.json"    # the run completed (or diverged: then marked so)
METRICS_FILE = "metrics.jsonl"   # one line per round
CONFIG_FILE = "config.yaml"      # the run's resolved settings
# written by the backend that launched it
LOG_FILE = "stdout.log"          # train.py's output, appended across attempts
EXIT_FILE = "exit_status"        # train.py's exit code, once it ended
JOB_FILE = "job.json"            # {"backend", "job_id", "overrides"}


def python_command(python: Optional[str] = None) -> list[str]:
    return [python or sys.executable, "train.py"]


def read_job(run_dir: Path) -> dict:
    try:
        return json.loads((Path(run_dir) / JOB_FILE).read_text())
    except (OSError, ValueError):
        return {}


def record_job(run_dir: Path, backend: str, job_id: Optional[str], overrides: list[str]) -> None:
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    save_json({"backend": backend, "job_id": job_id, "overrides": overrides}, Path(run_dir) / JOB_FILE)


def thread_env(default_threads: int) -> dict:
    """The environment of a run: torch threads as OMP_NUM_THREADS says, else `default_threads`."""
    return {**os.environ, "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS") or str(max(1, default_threads))}


def execute(cmd: list[str], run_dir: Path, env: Optional[dict] = None, started=None, preexec_fn=None,
            record_exit: bool = True) -> int:
    """Run `cmd` in the repository with its output appended to the run's log; record its exit code
    (unless `record_exit` is false: a distributed run's process other than rank 0).
    `started(proc)` receives the process, so a caller can forward signals to it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if record_exit:
        (run_dir / EXIT_FILE).unlink(missing_ok=True)
    with open(run_dir / LOG_FILE, "ab") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=preexec_fn)
        if started:
            started(proc)
        code = proc.wait()
    if record_exit:
        (run_dir / EXIT_FILE).write_text(f"{code}\n")
    return code

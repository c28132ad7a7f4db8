"""Where the runs of a sweep execute: `local` (this machine, N at a time), `slurm` (one readable sbatch
script per run, then a seed-aggregation job that waits for them), `submitit` (the same runs as a job
array through submitit, requeued on time-out or preemption).

Every backend runs the same command, `python train.py <overrides> seed=S hydra.run.dir=<run dir>`, with
its output appended to <run dir>/stdout.log and its exit code written to <run dir>/exit_status."""
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from src.algo.base import RESULTS_FILE
from src.sweep.experiment import ROOT, Run, SweepError
from src.utils.io import save_json

LOG_FILE = "stdout.log"
EXIT_FILE = "exit_status"
JOB_FILE = "job.json"


@dataclass
class SlurmOptions:
    """SBATCH options: nothing about a cluster is hard-coded; unset options are left out of the scripts."""
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    time: Optional[str] = None          # time limit, e.g. "04:00:00" or "1-00:00:00"
    cpus_per_task: Optional[int] = None
    mem: Optional[str] = None           # e.g. "8G"
    gres: Optional[str] = None          # e.g. "gpu:1"
    constraint: Optional[str] = None
    extra: list[str] = field(default_factory=list)   # more sbatch options, e.g. "--exclusive"
    setup: list[str] = field(default_factory=list)   # shell lines before train.py, e.g. "module load cuda"
    python: Optional[str] = None        # interpreter on the compute nodes (default: the runner's own)
    array_parallelism: Optional[int] = None   # submitit: at most this many array tasks at once

    def sbatch_options(self) -> list[str]:
        named = {"partition": self.partition, "account": self.account, "qos": self.qos, "time": self.time,
                 "cpus-per-task": self.cpus_per_task, "mem": self.mem, "gres": self.gres,
                 "constraint": self.constraint}
        return [f"--{k}={v}" for k, v in named.items() if v is not None] + list(self.extra)


def load_slurm_options(cluster_file: Optional[Path], experiment_options: dict, dotlist: list[str]) -> SlurmOptions:
    """Defaults <- the cluster file <- the experiment's `slurm:` section <- `--set key=value`."""
    known = ", ".join(f.name for f in fields(SlurmOptions))
    bad = [item for item in dotlist if "=" not in item]
    if bad:
        raise SweepError([f"--set {bad[0]}: write KEY=VALUE (the options are: {known})"])
    layers = []
    try:
        if cluster_file is not None:
            if not Path(cluster_file).is_file():
                raise SweepError([f"cluster file {cluster_file} does not exist (see experiments/slurm/ for examples)"])
            layers.append(OmegaConf.load(cluster_file))
        # --set values are taken as typed; only time is kept as text (yaml reads 1:30:00 as 5400)
        times = [item.split("=", 1)[1] for item in dotlist if item.startswith("time=")]
        layers += [OmegaConf.create(experiment_options or {}),
                   OmegaConf.from_dotlist([item for item in dotlist if not item.startswith("time=")])]
        layers += [OmegaConf.create({"time": t}) for t in times]
        merged = OmegaConf.merge(OmegaConf.structured(SlurmOptions), *layers)
    except (OmegaConfBaseException, yaml.YAMLError) as e:
        key = getattr(e, "full_key", None)
        where = f"SLURM option {key}" if key else "SLURM options"
        hint = "; extra and setup are lists, e.g. extra: [\"--exclusive\"]" if key in ("extra", "setup") else ""
        raise SweepError([f"{where}: {str(e).splitlines()[0]}{hint} (the options are: {known})"]) from None
    for layer in layers:
        if "time" in layer and not isinstance(layer.time, (str, type(None))):
            # yaml reads an unquoted 12:00:00 as 43200 (base 60): refuse rather than guess
            raise SweepError([f"SLURM option time={layer.time!r} is a number: quote it in yaml, "
                              f"e.g. time: \"12:00:00\" or time: \"90\" (minutes)"])
    options = SlurmOptions(**OmegaConf.to_container(merged))
    if options.time is not None and not unlimited(options.time):
        try:
            slurm_minutes(options.time)
        except (ValueError, IndexError):
            raise SweepError([f"SLURM option time={options.time!r}: use SLURM's format, e.g. 90, 04:00:00, "
                              "1-00:00:00 or UNLIMITED"]) from None
    spaced = [flag for flag in options.extra if not flag.startswith("-") or " " in flag]
    if spaced:
        raise SweepError([f"SLURM option extra={spaced}: give each sbatch flag as one --key=value item"])
    return options


def python_command(options: Optional[SlurmOptions] = None) -> list[str]:
    return [(options.python if options and options.python else sys.executable), "train.py"]


def read_job(run: Run) -> dict:
    try:
        return json.loads((run.run_dir / JOB_FILE).read_text())
    except (OSError, ValueError):
        return {}


def is_done(run: Run) -> bool:
    """Finished, and with the overrides it has now: a run whose declaration changed runs again
    (train.py then continues it, or refuses with the settings that differ)."""
    return (run.run_dir / RESULTS_FILE).exists() and read_job(run).get("overrides") == run.train_args()


def record_job(run: Run, backend: str, job_id: Optional[str] = None) -> None:
    run.run_dir.mkdir(parents=True, exist_ok=True)
    job = {"backend": backend, "job_id": job_id, "overrides": run.train_args()}
    save_json(job, run.run_dir / JOB_FILE)


def thread_env(default_threads: int) -> dict:
    """The environment of a run: torch threads as OMP_NUM_THREADS says, else `default_threads`."""
    return {**os.environ, "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS") or str(max(1, default_threads))}


# ---------------------------------------------------------------- local

def run_local(runs: list[Run], parallel: int = 1, log=print) -> dict[str, int]:
    """Run train.py for every run, `parallel` at a time; a failing run does not stop the others.
    Torch threads are split between the parallel runs unless OMP_NUM_THREADS is set."""
    env = thread_env((os.cpu_count() or 1) // parallel)
    lock, finished, codes = threading.Lock(), [0], {}

    def one(run: Run) -> None:
        record_job(run, "local")
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


def execute(cmd: list[str], run_dir: Path, env: Optional[dict] = None, started=None, preexec_fn=None) -> int:
    """Run `cmd` in the repository with its output appended to the run's log; record its exit code.
    `started(proc)` receives the process, so a caller can forward signals to it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / EXIT_FILE).unlink(missing_ok=True)
    with open(run_dir / LOG_FILE, "ab") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=preexec_fn)
        if started:
            started(proc)
        code = proc.wait()
    (run_dir / EXIT_FILE).write_text(f"{code}\n")
    return code


# ---------------------------------------------------------------- slurm: sbatch scripts

def check_slurm(options: SlurmOptions) -> None:
    """sbatch is there and the partition exists, before anything is written or submitted."""
    if shutil.which("sbatch") is None:
        raise SweepError(["sbatch not found: this machine is not a SLURM login node. Run the sweep here with "
                          "--backend local (or start a test cluster with scripts/slurm_cluster.sh)"])
    if options.partition is not None and shutil.which("sinfo") is not None:
        proc = subprocess.run(["sinfo", "-a", "-h", "-o", "%R"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SweepError([f"sinfo failed ({proc.stderr.strip()}): is the SLURM controller up?"])
        partitions = sorted(set(proc.stdout.split()))
        if options.partition not in partitions:
            raise SweepError([f"partition {options.partition!r} does not exist on this cluster; sinfo lists: "
                              f"{', '.join(partitions) or 'none'} (set it in the cluster file or with "
                              "--set partition=NAME)"])


def sbatch_script(run: Run, options: SlurmOptions) -> str:
    command = " ".join(shlex.quote(a) for a in python_command(options) + run.train_args())
    run_dir = shlex.quote(str(run.run_dir))
    lines = [
        "#!/bin/bash",
        f"# fedsim sweep {run.experiment!r}: run {run.name!r}, seed {run.seed}. Written by experiment_runner.py;",
        "# a requeued job continues from the resume.pt in its run directory.",
        f"#SBATCH --job-name={run.experiment}.{run.name}.seed{run.seed}",
        f"#SBATCH --output={run.run_dir / LOG_FILE}",
        "#SBATCH --open-mode=append",
        "#SBATCH --requeue",
        *(f"#SBATCH {o}" for o in options.sbatch_options()),
        "set -e   # a failing setup line stops the job rather than training in the wrong environment",
        f"cd {shlex.quote(str(ROOT))}",
        *options.setup,
        "set +e",
        "export PYTHONUNBUFFERED=1",
        'export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"',
        f"rm -f {run_dir}/{EXIT_FILE}",
        f"{command} &",
        "# on preemption or requeue SLURM sends SIGTERM: pass it on and wait until train.py has saved resume.pt",
        "pid=$!",
        'trap \'kill -TERM "$pid" 2>/dev/null\' TERM',
        'wait "$pid"; status=$?',
        'while kill -0 "$pid" 2>/dev/null; do wait "$pid"; status=$?; done',
        f'echo "$status" > {run_dir}/{EXIT_FILE}',
        'exit "$status"',
    ]
    return "\n".join(lines) + "\n"


def collect_script(experiment_dir: Path, options: SlurmOptions) -> str:
    python = options.python or sys.executable
    lines = [
        "#!/bin/bash",
        f"# fedsim sweep {experiment_dir.name!r}: seed aggregation (mean ± std), after every run succeeded.",
        f"#SBATCH --job-name={experiment_dir.name}.collect",
        f"#SBATCH --output={experiment_dir / 'collect.log'}",
        *(f"#SBATCH {o}" for o in collect_options(options).sbatch_options()),
        "set -e",
        f"cd {shlex.quote(str(ROOT))}",
        *options.setup,
        " ".join(shlex.quote(a) for a in [python, "experiment_runner.py", "collect", str(experiment_dir)]),
    ]
    return "\n".join(lines) + "\n"


COLLECT_TIME = "00:10:00"


def collect_options(options: SlurmOptions) -> SlurmOptions:
    """The aggregation job needs none of the runs' GPUs, memory, hours or extra flags: only where it
    may run, for a few minutes. Both backends submit it so."""
    return SlurmOptions(partition=options.partition, account=options.account, qos=options.qos,
                        time=COLLECT_TIME, setup=options.setup, python=options.python)


def sbatch(script: Path, *args: str) -> str:
    proc = subprocess.run(["sbatch", "--parsable", *args, str(script)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SweepError([f"sbatch {script} failed: {proc.stderr.strip()}"])
    return proc.stdout.strip().split(";")[0]


def run_slurm(runs: list[Run], experiment_dir: Path, options: SlurmOptions, dry_run: bool, log=print) -> list[str]:
    """Write one script per run into <experiment>/slurm/ and submit them (unless dry_run), then the
    seed-aggregation job with afterok on all of them. Job ids go to <experiment>/slurm/jobs.json."""
    script_dir = experiment_dir / "slurm"
    script_dir.mkdir(parents=True, exist_ok=True)
    scripts = []
    for run in runs:
        path = script_dir / f"{run.name}.seed{run.seed}.sbatch"
        path.write_text(sbatch_script(run, options))
        scripts.append(path)
    collect_path = script_dir / "collect.sbatch"
    collect_path.write_text(collect_script(experiment_dir, options))
    if dry_run:
        log(f"wrote {len(scripts)} run scripts and collect.sbatch to {script_dir} (dry run: nothing submitted)")
        return []
    jobs = {}
    try:
        for run, path in zip(runs, scripts):
            run.run_dir.mkdir(parents=True, exist_ok=True)   # sbatch writes its --output there
            jobs[run.key] = sbatch(path)
            record_job(run, "slurm", jobs[run.key])
        ids = list(jobs.values())
        jobs["collect"] = sbatch(collect_path, f"--dependency=afterok:{':'.join(ids)}", "--kill-on-invalid-dep=yes")
    finally:   # what was submitted stays on record, also when a later sbatch failed
        save_json(jobs, script_dir / "jobs.json")
    log(f"submitted {len(ids)} runs and the aggregation job {jobs.get('collect')}; job ids in {script_dir / 'jobs.json'}")
    return list(jobs.values())


# ---------------------------------------------------------------- submitit

def ignore_usr2() -> None:
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


SIGNAL_DELAY_S = 120   # submitit's warning before the time limit: train.py saves and the job requeues


class TrainJob:
    """A submitit job that runs train.py for one run. On submitit's time-out or preemption signal
    (SIGUSR2, which SLURM sends to every process of the job: train.py ignores it) it stops train.py with
    SIGTERM, so that it saves resume.pt, and requeues itself; the next attempt continues from there."""

    def __init__(self, cmd: list[str], run_dir: Path):
        self.cmd, self.run_dir = cmd, Path(run_dir)
        self._proc = None

    def __call__(self) -> int:
        env = thread_env(int(os.environ.get("SLURM_CPUS_PER_TASK", "1")))
        code = execute(self.cmd, self.run_dir, env, started=lambda p: setattr(self, "_proc", p),
                       preexec_fn=ignore_usr2)
        if code != 0:
            raise RuntimeError(f"train.py exited with {code}; log: {self.run_dir / LOG_FILE}")
        return code

    def checkpoint(self, *args, **kwargs):
        """Runs in submitit's signal handler, inside __call__'s wait(): Popen's own wait would deadlock
        here, so wait for the exit with waitid(WNOWAIT), which leaves the reaping to __call__."""
        import submitit
        if self._proc is not None and self._proc.returncode is None:
            try:
                os.kill(self._proc.pid, signal.SIGTERM)
                deadline = time.time() + SIGNAL_DELAY_S - 30   # leave time for the requeue itself
                while os.waitid(os.P_PID, self._proc.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is None:
                    if time.time() > deadline:
                        break
                    time.sleep(0.2)
            except (ProcessLookupError, ChildProcessError):
                pass   # it had already finished
        return submitit.helpers.DelayedSubmission(TrainJob(self.cmd, self.run_dir))

    def __getstate__(self):
        return {"cmd": self.cmd, "run_dir": self.run_dir, "_proc": None}


def collect_job(experiment_dir: str) -> None:
    from src.sweep.collect import collect
    collect(experiment_dir)


def run_submitit(runs: list[Run], experiment_dir: Path, options: SlurmOptions, log=print) -> list[str]:
    """The runs as one submitit job array, then the aggregation job (afterok on the array)."""
    import submitit

    python = {"slurm_python": options.python} if options.python else {}
    executor = submitit.AutoExecutor(folder=experiment_dir / "submitit" / "%j", cluster="slurm", **python)
    params = submitit_parameters(options, experiment_dir.name)
    executor.update_parameters(**params)
    if options.array_parallelism:
        executor.update_parameters(slurm_array_parallelism=options.array_parallelism)
    with executor.batch():
        jobs = [executor.submit(TrainJob(python_command(options) + run.train_args(), run.run_dir)) for run in runs]
    ids = {run.key: job.job_id for run, job in zip(runs, jobs)}
    for run in runs:
        record_job(run, "submitit", ids[run.key])
    if jobs:
        array_id = jobs[0].job_id.split("_")[0]
        executor.update_parameters(
            **submitit_parameters(collect_options(options), f"{experiment_dir.name}.collect"),
            slurm_gres=None, slurm_mem=None, slurm_cpus_per_task=None, slurm_constraint=None,
            slurm_dependency=f"afterok:{array_id}", slurm_additional_parameters={"kill-on-invalid-dep": "yes"})
        ids["collect"] = executor.submit(collect_job, str(experiment_dir)).job_id
    save_json(ids, experiment_dir / "submitit" / "jobs.json")
    log(f"submitted {len(runs)} runs as a submitit job array and the aggregation job {ids.get('collect')}")
    return list(ids.values())


def submitit_parameters(options: SlurmOptions, name: str) -> dict:
    # the pickled TrainJob is imported from the repository in the job
    setup = [f"cd {shlex.quote(str(ROOT))}", f'export PYTHONPATH={shlex.quote(str(ROOT))}"${{PYTHONPATH:+:$PYTHONPATH}}"']
    params = {"name": name, "slurm_setup": setup + list(options.setup), "slurm_signal_delay_s": SIGNAL_DELAY_S}
    if options.time is None or unlimited(options.time):   # submitit would impose its own 5 min
        raise SweepError(["the submitit backend needs a finite time limit (its jobs are requeued when it runs "
                          "out): set `time` in the cluster file or pass --set time=04:00:00"])
    params["timeout_min"] = slurm_minutes(options.time)
    for key in ("partition", "account", "qos", "mem", "gres", "constraint"):
        if getattr(options, key) is not None:
            params[f"slurm_{key}"] = getattr(options, key)
    if options.cpus_per_task is not None:
        params["slurm_cpus_per_task"] = options.cpus_per_task
    extra = dict(o.lstrip("-").split("=", 1) if "=" in o else (o.lstrip("-"), True) for o in options.extra)
    if extra:
        params["slurm_additional_parameters"] = extra
    return params


def unlimited(limit: str) -> bool:
    return limit.upper() in ("UNLIMITED", "INFINITE", "0")   # SLURM reads all three as no limit


def slurm_minutes(limit: str) -> int:
    """SLURM's time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) in whole minutes, rounded up."""
    days, _, clock = limit.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    if any(p < 0 for p in parts) or (days and int(days) < 0):
        raise ValueError(limit)
    if days:
        hours, minutes, seconds = (parts + [0, 0])[:3]
    else:
        hours, minutes, seconds = [(0, parts[0], 0), (0, *parts), tuple(parts)][len(parts) - 1]
    return max(1, int(days or 0) * 1440 + hours * 60 + minutes + (seconds > 0))


ACTIVE_STATES = "PENDING,RUNNING,COMPLETING,CONFIGURING,SUSPENDED,REQUEUED,REQUEUE_HOLD,REQUEUE_FED,RESIZING,SIGNALING,STOPPED"


def active_jobs(job_ids: list[str]) -> set[str]:
    """The base ids of those jobs that SLURM still has queued or running (none without squeue)."""
    base_ids = ",".join(sorted({str(j).split("_")[0] for j in job_ids}))
    if not base_ids or shutil.which("squeue") is None:
        return set()
    proc = subprocess.run(["squeue", "-h", "-j", base_ids, "-t", ACTIVE_STATES, "-o", "%A"],
                          capture_output=True, text=True)
    if proc.returncode != 0 and "Invalid job id" not in proc.stderr:
        raise SweepError([f"squeue failed ({proc.stderr.strip()}): is the SLURM controller up?"])
    return set(proc.stdout.split()) if proc.returncode == 0 else set()


def queued_runs(runs: list[Run]) -> dict[str, str]:
    """run key -> job id, for runs whose SLURM job is still queued or running: not to launch twice."""
    records = {r.key: read_job(r) for r in runs}
    jobs = {k: str(job["job_id"]) for k, job in records.items()
            if job.get("backend") in ("slurm", "submitit") and job.get("job_id")}
    active = active_jobs(list(jobs.values())) if jobs else set()
    return {k: j for k, j in jobs.items() if j.split("_")[0] in active}


def wait_for_jobs(job_ids: list[str], poll_s: float = 2.0, timeout_s: Optional[float] = None) -> None:
    """Block until none of the jobs is queued or running (requeued ones included)."""
    start = time.time()
    while active_jobs(job_ids):
        if timeout_s is not None and time.time() - start > timeout_s:
            raise TimeoutError(f"jobs {sorted(active_jobs(job_ids))} still queued after {timeout_s:.0f} s")
        time.sleep(poll_s)

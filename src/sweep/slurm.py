"""The SLURM backend: one readable sbatch script per run, then a seed-aggregation job that waits for
them; the SBATCH options (defaults <- cluster file <- experiment <- --set); and the queue (squeue),
which collect and the runner ask whether a run's job is still queued or running."""
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from src.sweep.experiment import Run, SweepError
from src.sweep.protocol import EXIT_FILE, LOG_FILE, ROOT, python_command, read_job, record_job
from src.utils.io import save_json


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
    # More than one task (nodes x ntasks_per_node): each run is one engine=distributed run over all of
    # them, its processes started by srun (gres, cpus_per_task and mem are then per node or task, as SLURM reads them)
    nodes: Optional[int] = None
    ntasks_per_node: Optional[int] = None
    extra: list[str] = field(default_factory=list)   # more sbatch options, e.g. "--exclusive"
    setup: list[str] = field(default_factory=list)   # shell lines before train.py, e.g. "module load cuda"
    python: Optional[str] = None        # interpreter on the compute nodes (default: the runner's own)
    array_parallelism: Optional[int] = None   # submitit: at most this many array tasks at once

    def sbatch_options(self) -> list[str]:
        named = {"partition": self.partition, "account": self.account, "qos": self.qos, "time": self.time,
                 "cpus-per-task": self.cpus_per_task, "mem": self.mem, "gres": self.gres,
                 "constraint": self.constraint, "nodes": self.nodes, "ntasks-per-node": self.ntasks_per_node}
        return [f"--{k}={v}" for k, v in named.items() if v is not None] + list(self.extra)

    @property
    def tasks(self) -> int:
        return (self.nodes or 1) * (self.ntasks_per_node or 1)


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
    small = [f"{k}={v}" for k, v in (("nodes", options.nodes), ("ntasks_per_node", options.ntasks_per_node))
             if v is not None and not (isinstance(v, int) and v >= 1)]
    if small:
        raise SweepError([f"SLURM option {small[0]}: a whole number >= 1"])
    spaced = [flag for flag in options.extra if not flag.startswith("-") or " " in flag]
    if spaced:
        raise SweepError([f"SLURM option extra={spaced}: give each sbatch flag as one --key=value item"])
    return options

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


def check_tasks(runs: list[Run], options: SlurmOptions) -> None:
    """Runs over several tasks must be engine=distributed ones: another engine would train the whole
    run in every task."""
    single = [r.key for r in runs if options.tasks > 1 and "engine=distributed" not in r.overrides]
    if single:
        raise SweepError([f"nodes x ntasks_per_node = {options.tasks} tasks per run, but run {single[0]} does not set "
                          "engine=distributed (add it to the experiment's shared settings), which one run over "
                          "several tasks needs"])


def sbatch_script(run: Run, options: SlurmOptions) -> str:
    # several tasks: srun starts one process per task (src/engine/distributed.py reads their ranks), and
    # the step fails as a whole when one of them does
    srun = ["srun", "--kill-on-bad-exit=1"] if options.tasks > 1 else []
    command = " ".join(shlex.quote(a) for a in srun + python_command(options.python) + run.train_args())
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
            record_job(run.run_dir, "slurm", jobs[run.key], run.train_args())
        ids = list(jobs.values())
        jobs["collect"] = sbatch(collect_path, f"--dependency=afterok:{':'.join(ids)}", "--kill-on-invalid-dep=yes")
    finally:   # what was submitted stays on record, also when a later sbatch failed
        save_json(jobs, script_dir / "jobs.json")
    log(f"submitted {len(ids)} runs and the aggregation job {jobs.get('collect')}; job ids in {script_dir / 'jobs.json'}")
    return list(jobs.values())


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
    records = {r.key: read_job(r.run_dir) for r in runs}
    jobs = {k: str(job["job_id"]) for k, job in records.items()
            if job.get("backend") in ("slurm", "submitit") and job.get("job_id")}
    active = active_jobs(list(jobs.values())) if jobs else set()
    return {k: j for k, j in jobs.items() if j.split("_")[0] in active}


def wait_for_jobs(job_ids: list[str], poll_s: float = 2.0, timeout_s: Optional[float] = None) -> None:
    """Block until none of the jobs is queued or running (requeued ones included), seen twice in a
    row: a job that is being requeued can drop out of squeue for a moment."""
    start, absent = time.time(), 0
    while absent < 2:
        absent = 0 if active_jobs(job_ids) else absent + 1
        if timeout_s is not None and time.time() - start > timeout_s:
            raise TimeoutError(f"jobs {sorted(active_jobs(job_ids))} still queued after {timeout_s:.0f} s")
        if absent < 2:
            time.sleep(poll_s)

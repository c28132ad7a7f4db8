"""The submitit backend: the runs of a sweep as one SLURM job array through submitit, requeued on
time-out or preemption, then the seed-aggregation job."""
import os
import shlex
import signal
import time
from pathlib import Path

from src.sweep.collect import collect
from src.sweep.experiment import Run, SweepError
from src.sweep.protocol import LOG_FILE, ROOT, execute, python_command, record_job, thread_env
from src.sweep.slurm import SlurmOptions, collect_options, slurm_minutes, unlimited
from src.utils.io import save_json


def ignore_usr2() -> None:
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


SIGNAL_DELAY_S = 120   # submitit's warning before the time limit: train.py saves and the job requeues
STOPPED_WITH_THE_LEADER = 128 + signal.SIGTERM   # train.py's exit code after a stop (src/run.py)


class TrainJob:
    """A submitit job that runs train.py for one run (in each of its tasks, when it has several). On
    submitit's time-out or preemption signal (SIGUSR2, which SLURM sends to every process of the job:
    train.py ignores it) task 0 stops its train.py with SIGTERM, so that it saves resume.pt (the other
    processes of a distributed run stop at the same round), and requeues the job; the next attempt
    continues from there."""

    def __init__(self, cmd: list[str], run_dir: Path):
        self.cmd, self.run_dir = cmd, Path(run_dir)
        self._proc = None

    def __call__(self) -> int:
        env = thread_env(int(os.environ.get("SLURM_CPUS_PER_TASK", "1")))
        rank = int(os.environ.get("SLURM_PROCID", "0"))  # a task of a several-task (engine=distributed) run
        code = execute(self.cmd, self.run_dir, env, started=lambda p: setattr(self, "_proc", p),
                       preexec_fn=ignore_usr2, record_exit=rank == 0)
        if rank and code == STOPPED_WITH_THE_LEADER:
            # rank 0's train.py got the SIGTERM, every process stopped at the round it chose and rank 0
            # saved: its task requeues the job. Failing here would end the step (--kill-on-bad-exit) first.
            return code
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
        jobs = [executor.submit(TrainJob(python_command(options.python) + run.train_args(), run.run_dir)) for run in runs]
    ids = {run.key: job.job_id for run, job in zip(runs, jobs)}
    for run in runs:
        record_job(run.run_dir, "submitit", ids[run.key], run.train_args())
    if jobs:
        array_id = jobs[0].job_id.split("_")[0]
        executor.update_parameters(
            **submitit_parameters(collect_options(options), f"{experiment_dir.name}.collect"),
            slurm_gres=None, slurm_mem=None, slurm_cpus_per_task=None, slurm_constraint=None, nodes=1,
            tasks_per_node=1, slurm_srun_args=[],
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
    if options.tasks > 1:   # one engine=distributed run over every task; one dead task ends the step
        params.update(nodes=options.nodes or 1, tasks_per_node=options.ntasks_per_node or 1,
                      slurm_srun_args=["--kill-on-bad-exit=1"])
    extra = dict(o.lstrip("-").split("=", 1) if "=" in o else (o.lstrip("-"), True) for o in options.extra)
    if extra:
        params["slurm_additional_parameters"] = extra
    return params

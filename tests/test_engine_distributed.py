"""engine=distributed: chains split across torch.distributed processes (gloo on this CPU), launched
with torchrun as a user launches it. The run is bit for bit engine=sequential's for any number of
processes, rank 0 alone writes the run directory, a SIGTERM'd run resumes bit for bit, and a process
that dies fails the run instead of hanging it. The SLURM script of a two-task run is checked as
text and, on the test cluster of scripts/slurm_cluster.sh, run, requeued and continued."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from src.engine.distributed import DistributedEngine, assign, join
from src.errors import ConfigError, UserError
from src.evaluation import pooled_scores
from src.sweep.backends import load_slurm_options, submitit_parameters, wait_for_jobs
from src.sweep.experiment import Experiment, SweepError
from src.sweep.protocol import LOG_FILE, RESULTS_FILE
from src.sweep.runner import launch
from src.utils.io import load_torch
from tests.inprocess import SMALL, as_shared, build_algo, metrics_without_times
from test_sweep_slurm import release_requeued

# SCAFFOLD with persisted momentum and error-feedback top-k: the client store (controls, optimizer
# state, residuals) is gathered every round; evaluation batches of 7 split the test and validation
# sets into shards; 3 chains a round on 2 processes: one trains two
DIST = [*SMALL, "algo=scaffold", "client.persist_optimizer=true", "optimizer.momentum=0.9", "compression=top_k",
        "compression.error_feedback=true", "dataset.val_fraction=0.2", "eval_batch_size=7"]
# ~0.1 s a round: long enough to be stopped mid-run
LONG = ["dataset=synthetic", "model=mlp", "clients.total=20", "clients.per_round=0.5", "num_rounds=12",
        "eval_every=10", "device=cpu", "client.batch_size=10", "client.local_epochs=2", "optimizer.momentum=0.9",
        "client.persist_optimizer=true"]


def torchrun(nproc: int, run_dir, *overrides: str) -> list[str]:
    # --standalone: a free port of its own, so that tests running side by side do not meet
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py",
            f"hydra.run.dir={run_dir}", "engine=distributed", *overrides]


def env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def sequential(run_dir: Path, *overrides: str) -> None:
    """The same run on engine=sequential, with torchrun's one thread per process (other thread counts round
    differently)."""
    run([sys.executable, "train.py", f"hydra.run.dir={run_dir}", *overrides])


def final_model(run_dir: Path) -> dict:
    return torch.load(run_dir / "FINAL_MODEL.pt", weights_only=True)


def same_model(a: Path, b: Path) -> bool:
    fa, fb = final_model(a), final_model(b)
    return fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)


def history(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "round_time_s"}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def rounds_done(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


# ---- in-process ------------------------------------------------------------------------------
def test_chains_go_to_the_least_loaded_process_longest_first():
    # 5 -> rank 0; 3 -> rank 1; 3 -> rank 1 (load 3 < 5); 2 -> rank 0 (5 < 6); 2 -> rank 1 (6 < 7)
    assert assign([5, 3, 3, 2, 2], 2) == [0, 1, 1, 0, 1]
    assert assign([1, 1, 1, 1], 3) == [0, 1, 2, 0]  # equal work: the earlier chain first, to the lower rank
    assert assign([4, 9], 1) == [0, 0]


class Shard(DistributedEngine):
    """Process `rank` of `size` as pooled_scores sees it; combine() adds the rows the others filled."""

    def __init__(self, rank: int, size: int, others: list):
        super().__init__()
        self._rank, self.size, self.others = rank, size, others

    def batches(self, count: int) -> range:
        return range(self._rank, count, self.size)

    def combine(self, rows: torch.Tensor) -> torch.Tensor:
        self.others.append(rows.clone())
        return sum(self.others[1:], self.others[0]) if len(self.others) == self.size else rows


def test_sharded_evaluation_is_bit_for_bit_the_pooled_one():
    torch.manual_seed(0)
    from src.data.device_data import DeviceDataset
    data = DeviceDataset(torch.randn(103, 5), torch.randint(0, 3, (103,)), 3)
    model = torch.nn.Linear(5, 3)
    whole = pooled_scores(model, data, 10, "none")
    for size in (2, 3, 4):
        rows: list = []
        scores = [pooled_scores(model, data, 10, "none", Shard(r, size, rows)) for r in range(size)]
        assert scores[-1] == whole  # the last shard to combine sees every row: the one-process figures


def test_in_one_process_it_is_the_sequential_engine(compose_cfg, tmp_path):
    runs = {}
    for engine in ("sequential", "distributed"):
        algo = build_algo(compose_cfg, tmp_path / engine, *DIST, f"engine={engine}")
        algo.fit()
        runs[engine] = algo
    a, b = runs["sequential"].server.global_state, runs["distributed"].server.global_state
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert metrics_without_times(runs["sequential"]) == metrics_without_times(runs["distributed"])


def test_settings_the_processes_cannot_share_are_refused(compose_cfg):
    cfg = compose_cfg("engine=distributed", "client.state_store=disk", "device=cpu")
    with pytest.raises(ConfigError, match="client.state_store=disk.*use client.state_store=host"):
        join(cfg)


def test_several_processes_with_another_engine_are_refused(compose_cfg, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets them
    with pytest.raises(UserError, match="rank 1 of 2 .* trains the whole run in every process: add engine=distributed"):
        join(compose_cfg("engine=sequential"))


def test_a_failure_between_aggregation_and_record_keeps_the_last_checkpoint(compose_cfg, tmp_path):
    algo = build_algo(compose_cfg, tmp_path, *SMALL, "eval_every=1")
    evaluate = algo.evaluate

    def peer_dies_in_round_3(state=None):
        if algo.round == 3:  # counted, not yet recorded
            raise RuntimeError("a process of the run died")
        return evaluate(state)
    algo.evaluate = peer_dies_in_round_3
    with pytest.raises(RuntimeError, match="died"):
        algo.fit()
    saved = load_torch(tmp_path / "resume.pt")
    assert saved["round"] == 2 and len(saved["history"]) == 2  # round 2's, which resumes


# ---- torchrun --------------------------------------------------------------------------------
def test_two_processes_train_the_sequential_engines_run_bit_for_bit(tmp_path):
    sequential(tmp_path / "sequential", *DIST)
    # the default run folder names the pid: each process resolves its own, rank 0's is the run's
    run(torchrun(2, str(tmp_path / "two" / "${pid:}"), *DIST))
    (two,) = (tmp_path / "two").iterdir()  # the other process removed the folder it had created
    assert same_model(tmp_path / "sequential", two)
    assert history(two) == history(tmp_path / "sequential")
    results = [{k: v for k, v in json.loads((d / RESULTS_FILE).read_text()).items()
                if k not in ("overrides", "config_sha256", "train_time_s")} for d in (tmp_path / "sequential", two)]
    assert results[0] == results[1]
    # rank 0 wrote what a one-process run writes; the log has one line per round
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in (tmp_path / "sequential").iterdir())
    assert (two / "train.log").read_text().count("round 4/4") == 1


def test_sigterm_stops_every_process_and_the_run_resumes_bit_for_bit(tmp_path):
    cut = tmp_path / "cut"
    proc = subprocess.Popen(torchrun(2, cut, *LONG), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and rounds_done(cut) < 3 and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)  # torchrun passes it to both processes
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, out
    assert "training stopped early; resume checkpoint saved" in out and "stopped by SIGTERM" in out, out
    stopped = rounds_done(cut)
    assert 3 <= stopped < 12
    assert torch.load(cut / "resume.pt", weights_only=True)["round"] == stopped  # both stopped at one round

    resumed = run(torchrun(2, cut, *LONG))
    assert f"continuing from {cut / 'resume.pt'} (round {stopped})" in resumed.stdout + resumed.stderr
    sequential(tmp_path / "straight", *LONG)
    assert same_model(tmp_path / "straight", cut)
    assert history(tmp_path / "straight") == history(cut)


def test_a_process_that_dies_fails_the_run(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(torchrun(2, run_dir, *LONG, "engine.timeout_s=30"), cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and rounds_done(run_dir) < 2 and proc.poll() is None:
        time.sleep(0.02)
    workers = subprocess.run(["ps", "-o", "pid=", "--ppid", str(proc.pid)], capture_output=True, text=True)
    os.kill(int(workers.stdout.split()[-1]), signal.SIGKILL)  # the last one started: rank 1
    out, _ = proc.communicate(timeout=150)  # the gloo timeout, then torchrun's grace period: never a hang
    assert proc.returncode != 0, out
    assert rounds_done(run_dir) < 12 and not (run_dir / RESULTS_FILE).exists()


# ---- SLURM -----------------------------------------------------------------------------------
def two_task_experiment(name: str, **slurm) -> Experiment:
    return Experiment(name=name, grid={"algo": ["fedavg"]}, shared=as_shared([*SMALL, "engine=distributed"]),
                      slurm={"ntasks_per_node": 2, **slurm})


def test_two_task_sbatch_script_starts_the_run_with_srun(tmp_path):
    launch(two_task_experiment("tt", nodes=1), "slurm", tmp_path, dry_run=True, log=lambda *_: None)
    script = (tmp_path / "tt" / "slurm" / "fedavg.seed0.sbatch").read_text()
    assert "#SBATCH --nodes=1" in script and "#SBATCH --ntasks-per-node=2" in script
    train = next(line for line in script.splitlines() if " train.py " in line)
    assert train.startswith(f"srun --kill-on-bad-exit=1 {sys.executable} train.py ") and "engine=distributed" in train
    assert 'trap \'kill -TERM "$pid" 2>/dev/null\' TERM' in script  # SIGTERM reaches srun, which passes it on


def test_two_task_submitit_job_runs_a_task_per_process_and_ends_the_step_on_a_failure():
    options = load_slurm_options(None, {"nodes": 2, "ntasks_per_node": 4, "time": "01:00:00"}, [])
    params = submitit_parameters(options, "tt")
    assert (params["nodes"], params["tasks_per_node"], params["slurm_srun_args"]) == (2, 4, ["--kill-on-bad-exit=1"])
    single = submitit_parameters(load_slurm_options(None, {"time": "01:00:00"}, []), "one")
    assert not {"nodes", "tasks_per_node", "slurm_srun_args"} & single.keys()


def test_several_tasks_without_engine_distributed_are_refused(tmp_path):
    exp = Experiment(name="st", grid={"algo": ["fedavg"]}, shared=as_shared(SMALL), slurm={"ntasks_per_node": 2})
    with pytest.raises(SweepError, match="does not set engine=distributed"):
        launch(exp, "slurm", tmp_path, dry_run=True, log=lambda *_: None)
    with pytest.raises(SweepError, match="does not set engine=distributed"):
        launch(exp, "submitit", tmp_path, log=lambda *_: None)
    assert not list(tmp_path.iterdir())  # refused before the experiment's folder is written
    with pytest.raises(SweepError, match="ntasks_per_node=0: a whole number >= 1"):
        launch(two_task_experiment("zero", ntasks_per_node=0), "slurm", tmp_path, dry_run=True, log=lambda *_: None)


def slurm_up() -> bool:
    return bool(shutil.which("sinfo")) and subprocess.run(["sinfo", "-h", "-p", "debug", "-o", "%a"],
                                                          capture_output=True, text=True).stdout.strip() == "up"


@pytest.mark.parametrize("backend, interrupt", [
    ("slurm", ["scontrol", "requeue"]),          # SIGTERM to both tasks, then back in the queue
    ("submitit", ["scancel", "--signal=USR2"]),  # submitit's time-out notice: task 0 stops train.py and requeues
])
def test_requeued_two_task_job_on_the_test_cluster_ends_with_the_sequential_model(tmp_path, backend, interrupt):
    if not slurm_up():
        message = "no SLURM cluster with partition 'debug': run scripts/slurm_cluster.sh install && start"
        if os.environ.get("FEDSIM_REQUIRE_SLURM") == "1":
            pytest.fail(message)
        pytest.skip(message)
    settings = [o if not o.startswith("num_rounds=") else "num_rounds=30" for o in LONG]  # long enough to requeue
    exp = Experiment(name="ts", grid={"algo": ["fedavg"]}, shared=as_shared([*settings, "engine=distributed"]),
                     slurm={"ntasks_per_node": 2, "partition": "debug", "cpus_per_task": 1, "time": "00:10:00"})
    job = launch(exp, backend, tmp_path, log=lambda *_: None)["job_ids"][0]
    run_dir = tmp_path / "ts" / "fedavg" / "seed0"
    deadline = time.time() + 180
    while rounds_done(run_dir) < 3:
        assert time.time() < deadline, (run_dir / LOG_FILE).read_text() if (run_dir / LOG_FILE).exists() else job
        time.sleep(0.1)
    subprocess.run([*interrupt, job], check=True)
    release_requeued(job)
    wait_for_jobs([job], poll_s=0.5, timeout_s=180)
    deadline = time.time() + 180  # squeue can miss a requeued job for a moment: the run ends with its results
    while not ((run_dir / RESULTS_FILE).exists() and json.loads((run_dir / RESULTS_FILE).read_text())["rounds"] == 30):
        assert time.time() < deadline, (run_dir / LOG_FILE).read_text()
        time.sleep(0.5)
    log = (run_dir / LOG_FILE).read_text()
    assert "training stopped early; resume checkpoint saved" in log and "continuing from" in log, log
    assert (run_dir / "exit_status").read_text() == "0\n", log  # rank 0's, written once the run finished
    sequential(tmp_path / "sequential", *settings, "algo=fedavg")
    assert same_model(tmp_path / "sequential", run_dir)

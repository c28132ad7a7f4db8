"""Sweeps on a real SLURM cluster: the single-node one of scripts/slurm_cluster.sh, which .ci/run starts.
Without a cluster these tests skip, unless FEDSIM_REQUIRE_SLURM=1 (set by .ci/run) makes that a failure."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from src.algo.base import RESULTS_FILE
from src.sweep.backends import LOG_FILE, wait_for_jobs
from src.sweep.collect import collect
from src.sweep.experiment import Experiment, SweepError
from src.sweep.runner import launch
from src.utils.io import load_torch
from tests.conftest import ROOT
from tests.inprocess import SMALL, SMALL_SHARED, as_shared

CLUSTER = ROOT / "experiments" / "slurm" / "local.yaml"
quiet = dict(log=lambda *_: None)


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster():
    up = shutil.which("sinfo") and subprocess.run(["sinfo", "-h", "-p", "debug", "-o", "%a"],
                                                  capture_output=True, text=True).stdout.strip() == "up"
    if not up:
        message = "no SLURM cluster with partition 'debug': run scripts/slurm_cluster.sh install && start"
        if os.environ.get("FEDSIM_REQUIRE_SLURM") == "1":
            pytest.fail(message)
        pytest.skip(message)


def report_rows(report: Path) -> dict[str, str]:
    return {line.split(" | ")[0].lstrip("| "): line for line in report.read_text().splitlines()
            if line.startswith("| ")}


def test_sbatch_sweep_and_its_aggregation_job(tmp_path):
    exp = Experiment(name="sb", grid={"algo": ["fedavg", "fairavg"]}, shared=SMALL_SHARED, seeds=[0, 1])
    outcome = launch(exp, "slurm", tmp_path, cluster_file=CLUSTER, wait=True, **quiet)
    jobs = json.loads((tmp_path / "sb" / "slurm" / "jobs.json").read_text())
    assert sorted(jobs) == ["collect", "fairavg/seed0", "fairavg/seed1", "fedavg/seed0", "fedavg/seed1"]
    assert sorted(outcome["job_ids"]) == sorted(jobs.values())
    for key in ("fedavg/seed0", "fairavg/seed1"):
        assert json.loads((tmp_path / "sb" / key / RESULTS_FILE).read_text())["rounds"] == 4
        job = json.loads((tmp_path / "sb" / key / "job.json").read_text())
        assert (job["backend"], job["job_id"]) == ("slurm", jobs[key]) and "seed=" + key[-1] in job["overrides"]
    # the table was written by the aggregation job (afterok on every run), not by this test
    assert "# sb" in (tmp_path / "sb" / "collect.log").read_text()
    rows = report_rows(tmp_path / "sb" / "report.md")
    assert rows["fedavg"].startswith("| fedavg | 2/2 | ") and rows["fairavg"].startswith("| fairavg | 2/2 | ")
    assert " ± " in rows["fedavg"]
    # launched again: everything finished, nothing is submitted
    again = launch(exp, "slurm", tmp_path, cluster_file=CLUSTER, **quiet)
    assert again["job_ids"] == [] and len(again["skipped"]) == 4


def test_submitit_sweep_as_a_job_array(tmp_path):
    exp = Experiment(name="si", grid={"algo": ["fedavg", "fedprox"]}, shared=SMALL_SHARED, seeds=[0])
    launch(exp, "submitit", tmp_path, cluster_file=CLUSTER, wait=True, **quiet)
    jobs = json.loads((tmp_path / "si" / "submitit" / "jobs.json").read_text())
    array = {jobs["fedavg/seed0"].split("_")[0], jobs["fedprox/seed0"].split("_")[0]}
    assert len(array) == 1 and "_" in jobs["fedavg/seed0"]   # one array, one task per run
    rows = report_rows(tmp_path / "si" / "report.md")
    assert rows["fedavg"].startswith("| fedavg | 1/1 | ") and rows["fedprox"].startswith("| fedprox | 1/1 | ")


# ~0.2 s per round: long enough to be caught mid-run
LONG = ["dataset=synthetic", "model=mlp", "clients.total=20", "clients.per_round=0.5", "num_rounds=40",
        "eval_every=10", "device=cpu", "client.batch_size=10", "client.local_epochs=2"]


def rounds_done(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def squeue_reason(job: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job, "-o", "%r"], capture_output=True, text=True).stdout.strip()


def release_requeued(job: str) -> None:
    """Start a requeued job now rather than after SLURM's hold (reason BeginTime). The hold is there
    because slurmd revokes the killed attempt's credential to the second: a launch within that
    second is refused ("already killed") and the job fails, so let the clock pass it first."""
    deadline = time.time() + 60
    while squeue_reason(job) != "BeginTime":
        assert time.time() < deadline, f"job {job} not requeued: {squeue_reason(job)!r}"
        time.sleep(0.2)
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"jobid={job}", "starttime=now"], check=True)


@pytest.mark.parametrize("backend, interrupt", [
    ("slurm", ["scontrol", "requeue"]),                 # the job is killed and put back in the queue
    ("submitit", ["scancel", "--signal=USR2"]),         # submitit's time-out / preemption notice
])
def test_requeued_job_finishes_with_the_model_of_an_uninterrupted_run(tmp_path, monkeypatch, backend, interrupt):
    exp = Experiment(name="rq", grid={"algo": ["fedavg"]}, shared=as_shared(LONG))
    job = launch(exp, backend, tmp_path / backend, cluster_file=CLUSTER, **quiet)["job_ids"][0]
    run_dir = tmp_path / backend / "rq" / "fedavg" / "seed0"
    deadline = time.time() + 120
    while rounds_done(run_dir) < 3:
        assert time.time() < deadline, (run_dir / LOG_FILE).read_text()
        time.sleep(0.1)
    subprocess.run([*interrupt, job], check=True)
    deadline = time.time() + 60
    while squeue_reason(job) != "BeginTime":
        assert time.time() < deadline, f"job {job} not requeued: {squeue_reason(job)!r}"
        time.sleep(0.2)
    assert rounds_done(run_dir) < 40
    status = {r.run.key: r.status for r in collect(str(tmp_path / backend / "rq"))[1]}
    assert status == {"fedavg/seed0": "queued or running"}   # requeued, not failed
    release_requeued(job)
    wait_for_jobs([job], poll_s=0.5, timeout_s=180)
    # squeue can miss a requeued job for longer than wait_for_jobs' two polls: the run is over when
    # its results are written
    deadline = time.time() + 180
    while not ((run_dir / RESULTS_FILE).exists()
               and json.loads((run_dir / RESULTS_FILE).read_text()).get("rounds") == 40):
        assert time.time() < deadline, (run_dir / LOG_FILE).read_text()
        time.sleep(0.5)
    log = (run_dir / LOG_FILE).read_text()
    # train.py got SIGTERM, saved at a client boundary, and the new attempt continued from there
    assert "received SIGTERM" in log and "training stopped early; resume checkpoint saved" in log, log
    assert "continuing from" in log, log
    assert json.loads((run_dir / RESULTS_FILE).read_text())["rounds"] == 40

    monkeypatch.setenv("OMP_NUM_THREADS", "1")   # as in the job: other thread counts round differently
    launch(exp, "local", tmp_path / "local", **quiet)
    straight = load_torch(tmp_path / "local" / "rq" / "fedavg" / "seed0" / "FINAL_MODEL.pt")
    requeued = load_torch(run_dir / "FINAL_MODEL.pt")
    assert straight.keys() == requeued.keys()
    for name in straight:
        assert torch.equal(straight[name], requeued[name]), name


def test_unknown_partition_is_refused_before_anything_is_written(tmp_path):
    exp = Experiment(name="np", grid={"algo": ["fedavg"]}, shared=SMALL_SHARED)
    for backend in ("slurm", "submitit"):
        with pytest.raises(SweepError, match="partition 'nope' does not exist on this cluster; sinfo lists: debug"):
            launch(exp, backend, tmp_path, cluster_file=CLUSTER, slurm_set=("partition=nope",), **quiet)
    assert not (tmp_path / "np").exists()


def test_train_multirun_through_the_hydra_submitit_launcher(tmp_path):
    cmd = [sys.executable, "train.py", "-m", "hydra/launcher=slurm", "hydra.launcher.partition=debug",
           f"hydra.sweep.dir={tmp_path}", *SMALL, "seed=0,1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = sorted(next(o for o in p.parent.name.split(",") if o.startswith("seed="))
                  for p in tmp_path.glob(f"*/{RESULTS_FILE}"))
    assert runs == ["seed=0", "seed=1"]

"""Golden trajectories: every algorithm on tiny CPU settings at seed 0, compared bit for bit (per-round
metrics and a hash of the final global model) with values recorded from main. A refactor keeps them;
a change that must move a number says which and why in its commit, then re-records them:
    FEDSIM_RECORD_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py

They run in one subprocess whose CPU kernels take the same path on every x86 machine (PORTABLE_KERNELS):
with each machine's fastest kernels, the last bits of every final model differed between an AMD EPYC
(AVX2) and the machine they were first recorded on."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

if __name__ == "__main__":  # the subprocess: the repository's root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest
import torch
from omegaconf import OmegaConf

from src.checkpoint import check_resumable
from src.utils.io import load_torch
from tests.inprocess import SMALL, build_algo, compose_config, metrics_without_times

ROOT = Path(__file__).resolve().parents[1]
# MKL's conditional numerical reproducibility mode (its SSE2 path, the same results on Intel and AMD),
# ATen's and oneDNN's baseline kernels, and 2 threads (reductions split by the thread count)
PORTABLE_KERNELS = {"MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41",
                    "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}

GOLDEN_FILE = Path(__file__).parent / "golden" / "trajectories.json"
HEAD_RESUME = GOLDEN_FILE.with_name("head_resume_fedseq.json")  # and its .pt
# partition=hsu: the partition setting these were recorded with (the default before issue 11)
BASE = [*SMALL, "num_rounds=3", "eval_every=1", "clients.total=8", "partition=hsu"]
CASES = {
    "fedavg": ["algo=fedavg"],
    "fairavg": ["algo=fairavg"],
    "fedprox": ["algo=fedprox"],
    "scaffold": ["algo=scaffold", "optimizer.momentum=0.9"],
    "feddyn": ["algo=feddyn"],
    "fedadam": ["algo=fedadam"],
    "fedseq": ["algo=fedseq", "algo.min_examples=100", "algo.pretrain_epochs=2"],
    "centralized": ["algo=centralized"],
    "playbook_switches": ["algo=fedavg", "optimizer=adam", "optimizer.lr=0.01", "client.persist_optimizer=true",
                          "schedule=cosine", "schedule.continuous=true", "schedule.warmup=0.1",
                          "client.ema.decay=0.9", "client.ema.persist=true"],
}


def model_hash(state: dict) -> str:
    """sha256 over the entries of a state dict in key order: names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def trajectory(run_dir: Path, overrides: list[str]) -> dict:
    algo = build_algo(compose_config, run_dir, *BASE, *overrides)
    algo.fit()
    return {"metrics": metrics_without_times(algo), "final_model_sha256": model_hash(algo.server.global_state)}


def head_checkpoint_resumed(run_dir: Path) -> dict:
    """HEAD_RESUME: the resume.pt of commit 03c7df8 (before checkpoints were a dict of parts) after
    round 1 of a FedSeq run with persisted optimizer state and EMA (client state, the EMA evaluation
    mean, superclients), continued as src/run.py continues it: settings, then every part, checked
    before anything is written. When it was recorded it matched the uninterrupted run bit for bit."""
    run_dir.mkdir(parents=True)
    shutil.copy(HEAD_RESUME.with_suffix(".pt"), run_dir / "resume.pt")
    state = load_torch(run_dir / "resume.pt")
    algo = build_algo(compose_config, run_dir, *json.loads(HEAD_RESUME.read_text())["settings"])
    check_resumable(state["config"], OmegaConf.to_container(algo.cfg, resolve=True), algo.cfg)
    algo.check_state(state)
    algo.start(state)
    algo.fit()
    # metrics lines name their clients since the file was recorded: round 1 came from the old checkpoint
    return {"metrics": [{k: v for k, v in m.items() if k != "clients"} for m in metrics_without_times(algo)],
            "clients_per_round": [len(m.get("clients", [])) for m in algo.history],
            "final_model_sha256": model_hash(algo.server.global_state)}


@pytest.fixture(scope="module")
def trajectories(tmp_path_factory) -> dict:
    """Every case's trajectory, from `python tests/test_golden.py DIR` under PORTABLE_KERNELS."""
    proc = subprocess.run([sys.executable, __file__, str(tmp_path_factory.mktemp("golden"))], cwd=ROOT,
                          env={**os.environ, **PORTABLE_KERNELS}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def record(path: Path, values: dict) -> None:
    recorded = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps(dict(sorted({**recorded, **values}.items())), indent=1) + "\n")


@pytest.fixture(scope="module")
def golden():
    if os.environ.get("FEDSIM_RECORD_GOLDEN"):
        return None
    return json.loads(GOLDEN_FILE.read_text())


def test_the_kernels_are_pinned():
    probe = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    out = subprocess.run([sys.executable, "-c", probe], env={**os.environ, **PORTABLE_KERNELS}, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == "DEFAULT"


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_trajectory(case, trajectories, golden):
    got = trajectories[case]
    if golden is None:   # recording
        record(GOLDEN_FILE, {case: got})
        return
    assert got == golden[case]


def test_checkpoint_written_before_the_parts_resumes_bit_for_bit(trajectories, golden):
    got = trajectories[HEAD_RESUME.stem]
    assert got.pop("clients_per_round") == [0, 4, 4]
    if golden is None:
        record(HEAD_RESUME, got)
        return
    expected = json.loads(HEAD_RESUME.read_text())
    assert got == {k: expected[k] for k in got}


if __name__ == "__main__":
    out = Path(sys.argv[1])
    runs = {case: trajectory(out / case, overrides) for case, overrides in sorted(CASES.items())}
    print(json.dumps({**runs, HEAD_RESUME.stem: head_checkpoint_resumed(out / HEAD_RESUME.stem)}))

"""Golden trajectories: every algorithm on tiny CPU settings at seed 0, compared bit for bit (per-round
metrics and a hash of the final global model) with values recorded from main. A refactor keeps them;
a change that must move a number says which and why in its commit, then re-records them:
    FEDSIM_RECORD_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py"""
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from tests.inprocess import SMALL, build_algo, metrics_without_times

GOLDEN_FILE = Path(__file__).parent / "golden" / "trajectories.json"
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


def trajectory(compose_cfg, run_dir: Path, overrides: list[str]) -> dict:
    algo = build_algo(compose_cfg, run_dir, *BASE, *overrides)
    algo.fit()
    return {"metrics": metrics_without_times(algo), "final_model_sha256": model_hash(algo.server.global_state)}


@pytest.fixture(scope="module")
def golden():
    if os.environ.get("FEDSIM_RECORD_GOLDEN"):
        return None
    return json.loads(GOLDEN_FILE.read_text())


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_trajectory(case, compose_cfg, tmp_path, golden):
    got = trajectory(compose_cfg, tmp_path / case, CASES[case])
    if golden is None:   # recording
        recorded = json.loads(GOLDEN_FILE.read_text()) if GOLDEN_FILE.exists() else {}
        recorded[case] = got
        GOLDEN_FILE.write_text(json.dumps(dict(sorted(recorded.items())), indent=1) + "\n")
        return
    assert got == golden[case]

"""Checkpoint parts: a resume.pt written before checkpoints became a dict of parts (commit 03c7df8)
still resumes, bit for bit. tests/golden/head_resume_fedseq.pt is that commit's checkpoint after
round 1 of a FedSeq run with persisted optimizer state and EMA (client state, the EMA evaluation
mean, superclients); head_resume_fedseq.json holds the settings and the uninterrupted run's metrics
and final-model hash (tests.inprocess.interrupted(..., stop_round=1) beside a straight fit())."""
import json
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from src.checkpoint import check_resumable
from src.errors import UserError
from src.transforms import UpdateTransform
from src.utils.io import load_torch
from tests.inprocess import SMALL, build_algo, metrics_without_times
from tests.test_golden import model_hash

GOLDEN = Path(__file__).parent / "golden"


def test_checkpoint_written_before_the_parts_resumes_bit_for_bit(compose_cfg, tmp_path):
    expected = json.loads((GOLDEN / "head_resume_fedseq.json").read_text())
    shutil.copy(GOLDEN / "head_resume_fedseq.pt", tmp_path / "resume.pt")
    state = load_torch(tmp_path / "resume.pt")
    algo = build_algo(compose_cfg, tmp_path, *expected["settings"])
    # src/run.py's protocol: settings, then every part, checked before anything is written
    check_resumable(state["config"], OmegaConf.to_container(algo.cfg, resolve=True), algo.cfg)
    algo.check_state(state)
    algo.start(state)
    algo.fit()
    # metrics lines name their clients since the file was recorded: every recorded number must match
    resumed = [{k: v for k, v in m.items() if k != "clients"} for m in metrics_without_times(algo)]
    assert resumed == expected["metrics"]
    assert [len(m.get("clients", [])) for m in algo.history] == [0, 4, 4]  # round 1 came from the old checkpoint
    assert model_hash(algo.server.global_state) == expected["final_model_sha256"]


def test_final_model_is_written_by_fit_not_by_results(compose_cfg, tmp_path):
    algo = build_algo(compose_cfg, tmp_path, *SMALL, "num_rounds=1")
    algo.results()
    assert not (tmp_path / "FINAL_MODEL.pt").exists()
    algo.fit()
    assert (tmp_path / "FINAL_MODEL.pt").exists()


def test_transforms_state_is_a_part_of_the_checkpoint(compose_cfg, tmp_path):
    class Counting(UpdateTransform):
        def __init__(self):
            self.seen = 0

        def client(self, update, client_id, store):
            self.seen += 1
            return update

        def state_dict(self):
            return {"seen": self.seen}

        def load_state_dict(self, state):
            self.seen = state["seen"]
    algo = build_algo(compose_cfg, tmp_path, *SMALL, "num_rounds=2")
    algo.transforms.append(Counting())
    algo.fit()
    state = load_torch(tmp_path / "resume.pt")
    assert state["transforms"] == [{"seen": 6}]
    again = build_algo(compose_cfg, tmp_path, *SMALL, "num_rounds=2")
    again.transforms.append(restored := Counting())
    again.load_state_dict(state)
    assert restored.seen == 6
    again.transforms.append(Counting())
    with pytest.raises(UserError, match="transforms: expected the states of 2"):
        again.check_state(state)


def test_superclients_of_another_federation_are_refused(compose_cfg, tmp_path):
    expected = json.loads((GOLDEN / "head_resume_fedseq.json").read_text())
    state = load_torch(GOLDEN / "head_resume_fedseq.pt")
    state["superclients"] = [[0, 1], [1, 2]]
    algo = build_algo(compose_cfg, tmp_path, *expected["settings"])
    with pytest.raises(UserError, match="superclients: they do not group this run's 8 clients"):
        algo.check_state(state)
    assert not (tmp_path / "superclients.json").exists()

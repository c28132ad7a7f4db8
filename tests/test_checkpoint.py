"""Checkpoint parts: what each part checks before anything loads, the transforms' state as a part,
and refusals of a checkpoint from another federation. (That a resume.pt written before checkpoints
became a dict of parts still resumes is a golden trajectory: tests/test_golden.py.)"""
import json
from pathlib import Path

import pytest

from src.errors import UserError
from src.transforms import UpdateTransform
from src.utils.io import load_torch
from tests.inprocess import SMALL, build_algo

GOLDEN = Path(__file__).parent / "golden"


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

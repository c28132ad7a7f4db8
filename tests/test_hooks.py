"""Round hooks: what they see of the round loop, and their state in the resume checkpoint."""
import pytest

from src.algo.base import TrainingInterrupted
from src.hooks import CheckpointCadence, RoundHook
from src.utils.io import load_torch
from tests.inprocess import SMALL, build_algo, metrics_without_times, resume, stop_after_round


class Counter(RoundHook):
    key = "counter"

    def __init__(self):
        self.events, self.updates = [], 0

    def on_round_start(self):
        self.events.append("start")

    def on_update(self, update):
        self.updates += 1

    def on_round_end(self, metrics):
        self.events.append(metrics["round"])

    def state_dict(self):
        return {"updates": self.updates}

    def check_state(self, saved):
        return [] if isinstance(saved, dict) and "updates" in saved else ["counter: not a counter's state"]

    def load_state_dict(self, saved):
        self.updates = saved["updates"]


def test_a_hook_sees_every_round_and_update_and_resumes(compose_cfg, tmp_path):
    settings = [*SMALL, "num_rounds=3"]  # 3 of 6 clients per round
    straight = build_algo(compose_cfg, tmp_path / "straight", *settings)
    straight.hooks.append(counter := Counter())
    straight.fit()
    assert counter.events == ["start", 1, "start", 2, "start", 3] and counter.updates == 9
    assert load_torch(tmp_path / "straight" / "resume.pt")["counter"] == {"updates": 9}

    first = build_algo(compose_cfg, tmp_path / "cut", *settings)
    first.hooks.append(Counter())
    stop_after_round(first, 1)
    with pytest.raises(TrainingInterrupted):
        first.fit()
    cut = build_algo(compose_cfg, tmp_path / "cut", *settings)
    cut.hooks.append(resumed := Counter())
    resume(cut).fit()
    assert resumed.events == ["start", 2, "start", 3] and resumed.updates == 9
    assert metrics_without_times(cut) == metrics_without_times(straight)


def test_checkpoint_cadence_saves_every_n_rounds_and_after_the_last():
    saved = []
    cadence = CheckpointCadence(every=2, num_rounds=5, save=lambda: saved.append(round_idx))
    for round_idx in range(1, 6):
        cadence.on_round_end({"round": round_idx})
    assert saved == [2, 4, 5]

"""System heterogeneity (src/system.py): dropout and stragglers, seeded per (seed, round, client);
partial work on a toy client by hand; drop vs partial; a round nobody reports; resume bit for bit."""
import logging
import math

import numpy as np
import pytest
import torch

from src.client.client import Client
from src.client.schedule import LRSchedule
from src.engine import Chain, Link, SequentialEngine
from src.errors import ConfigError
from src.server import FedAvgServer
from src.system import SystemModel
from tests.inprocess import SMALL, build_algo, interrupted, metrics_without_times, resume
from tests.toy import toy_setup

SYSTEM_KEYS = {"dropped_out", "stragglers", "reported", "local_steps_mean", "local_steps_min", "local_steps"}
# 8 clients, 4 a round, 4 local steps each (SMALL's synthetic clients have too few samples for more)
STEPS = [*SMALL, "clients.total=8", "client.local_epochs=null", "client.local_steps=4", "eval_every=1"]


def chains(n):
    setup = toy_setup([[1.0]] * n, [0.0] * n)
    return [Chain.of(Client(i, torch.tensor([i]), setup)) for i in range(n)]


def reporting(model, round_idx, some_chains):
    return {chain.sender.client_id for chain in model.plan(round_idx, some_chains)}


def test_dropout_depends_only_on_seed_round_and_client():
    everyone = chains(50)
    model = SystemModel(seed=3, num_clients=50, full_steps=lambda c: 4, dropout=0.3)
    first = [reporting(model, r, everyone) for r in range(40)]
    again = SystemModel(seed=3, num_clients=50, full_steps=lambda c: 4, dropout=0.3)
    assert [reporting(again, r, everyone) for r in range(40)] == first  # same seed, same dropouts
    # whoever else is selected, and in whatever order: a client's fate is its own
    assert reporting(model, 7, everyone[::-1]) == first[7]
    assert reporting(model, 7, everyone[10:20]) == first[7] & set(range(10, 20))
    dropped = 1 - sum(map(len, first)) / (40 * 50)
    assert abs(dropped - 0.3) < 0.03  # 2000 draws: 3 standard deviations are 0.031
    other = SystemModel(seed=4, num_clients=50, full_steps=lambda c: 4, dropout=0.3)
    assert [reporting(other, r, everyone) for r in range(40)] != first


def test_the_model_is_off_by_default_and_leaves_chains_alone():
    model = SystemModel(seed=0, num_clients=5, full_steps=lambda c: 4)
    some = chains(5)
    assert not model.enabled and model.plan(0, some) is some and model.stats == {}


def test_a_straggler_does_the_first_steps_of_its_round_at_the_full_rounds_lr():
    """w starts at 0, loss 0.5 (w - 1)^2, 5 steps at base LR 0.1 with linear decay over the round:
    step sizes 0.1, 0.08, 0.06, 0.04, 0.02. Cut to 2 steps: w = 0.1, then 0.1 + 0.08 * 0.9 = 0.172."""
    setup = toy_setup([[1.0]], [1.0], local_steps=5, schedule=LRSchedule("linear", continuous=False))
    server = FedAvgServer()
    server.set_global_state(setup.model.state_dict())
    client = Client(0, torch.tensor([0]), setup)
    (_, update), = SequentialEngine().train([Chain([Link(client, max_steps=2)], 1, "late")], 0, server.send_data)
    assert update.state["weight"].item() == pytest.approx(0.172)
    assert client.step_lrs == pytest.approx([0.1, 0.08]) and update.samples_seen == 2
    (_, update), = SequentialEngine().train([Chain([Link(client, max_steps=9)], 1, "early")], 0, server.send_data)
    assert client.step_lrs == pytest.approx([0.1, 0.08, 0.06, 0.04, 0.02])  # a budget above the round's: all 5


def expected_steps(algo, round_idx, deadline):
    """Each selected client's budget, floor(deadline * speed), from the model's own speeds."""
    speeds = algo.system.speeds(None)
    return {c: math.floor(deadline * speeds[c]) for c in algo.draw(round_idx, len(algo.clients))}


@pytest.mark.parametrize("mode", ["drop", "partial"])
def test_drop_leaves_stragglers_out_and_partial_keeps_their_steps(mode, compose_cfg, tmp_path):
    algo = build_algo(compose_cfg, tmp_path, *STEPS, "num_rounds=3", "system.speed_sigma=1.0",
                      "system.deadline_steps=4", f"system.stragglers={mode}")
    algo.fit()
    for r, metrics in enumerate(algo.history):
        budget = expected_steps(algo, r, 4)
        if mode == "drop":
            want = {c: 4 for c, b in budget.items() if b >= 4}
        else:
            want = {c: min(b, 4) for c, b in budget.items() if b > 0}
        assert metrics["local_steps"] == {str(c): s for c, s in sorted(want.items())}
        assert metrics["stragglers"] == sum(b < 4 for b in budget.values())
        assert metrics["reported"] == len(want) and metrics["dropped_out"] == 0
        if want:
            assert metrics["local_steps_min"] == min(want.values())
            assert metrics["local_steps_mean"] == pytest.approx(np.mean(list(want.values())))
    late = [m["stragglers"] for m in algo.history]
    assert sum(late) > 0 and any(m["local_steps_min"] not in (None, 4) for m in algo.history) == (mode == "partial")


def test_speeds_fixed_for_the_run_or_drawn_every_round():
    fixed = SystemModel(seed=0, num_clients=6, full_steps=lambda c: 4, speed_sigma=0.5, deadline_steps=4)
    again = SystemModel(seed=0, num_clients=6, full_steps=lambda c: 4, speed_sigma=0.5, deadline_steps=4,
                        speed="round")
    assert np.array_equal(fixed.fixed_speeds, fixed.speeds(None)) and again.fixed_speeds is None
    assert not np.array_equal(again.speeds(0), again.speeds(1))
    assert np.median(SystemModel(0, 10001, lambda c: 4, speed_sigma=0.5).speeds(None)) == pytest.approx(1, abs=0.02)


def test_on_but_inactive_is_bit_identical_to_off(compose_cfg, tmp_path):
    """A deadline nobody reaches and no dropout: the system model draws only from its own streams,
    so the run is the run without it, plus its metrics."""
    runs = {}
    for name, extra in {"off": [], "on": ["system.deadline_steps=1000"]}.items():
        runs[name] = build_algo(compose_cfg, tmp_path / name, *STEPS, "algo=fedavg", *extra)
        runs[name].fit()
    a, b = runs["off"].server.global_state, runs["on"].server.global_state
    assert all(torch.equal(a[k], b[k]) for k in a)
    off = metrics_without_times(runs["off"])
    on = [{k: v for k, v in m.items() if k not in SYSTEM_KEYS} for m in metrics_without_times(runs["on"])]
    assert on == off and not SYSTEM_KEYS & set(off[0])
    assert all(m["stragglers"] == m["dropped_out"] == 0 and m["local_steps_min"] == 4 for m in runs["on"].history)


def test_a_round_nobody_reports_keeps_the_global_model_and_server_state(compose_cfg, tmp_path, caplog):
    algo = build_algo(compose_cfg, tmp_path, *STEPS, "algo=scaffold", "num_rounds=2", "system.dropout=1.0")
    start = {k: v.clone() for k, v in algo.server.global_state.items()}
    with caplog.at_level(logging.WARNING, logger="src.system"):
        algo.fit()
    assert all(torch.equal(algo.server.global_state[k], start[k]) for k in start)
    assert all(not c.any() for c in algo.server.control.values())  # SCAFFOLD's server control stays 0
    assert algo.setup.store.state_dict() == {}  # no client control was written
    for m in algo.history:
        assert m["reported"] == 0 and m["dropped_out"] == 4 and m["train_loss"] is None
    assert "none of the 4 selected clients reports" in caplog.text


@pytest.mark.parametrize("algo", ["fednova", "scaffold"])  # scaffold: per-client state under dropout
def test_resumes_bit_for_bit_with_dropout_and_partial_stragglers(algo, compose_cfg, tmp_path):
    settings = [*STEPS, f"algo={algo}", "num_rounds=4", "optimizer.momentum=0.9", "system.dropout=0.3",
                "system.speed_sigma=0.8", "system.deadline_steps=3", "system.stragglers=partial", "system.speed=round"]
    straight = build_algo(compose_cfg, tmp_path / "straight", *settings)
    straight.fit()
    resumed = resume(interrupted(compose_cfg, tmp_path / "cut", settings, 2))
    resumed.fit()
    a, b = straight.server.state_dict(), resumed.server.state_dict()
    for part in a:
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert metrics_without_times(straight) == metrics_without_times(resumed)
    assert sum(m["dropped_out"] for m in straight.history) and sum(m["stragglers"] for m in straight.history)


@pytest.mark.parametrize("settings, message", [
    (["algo=fedseq", "system.dropout=0.1"], "system: FedSeq does not train one device per update"),
    (["algo=centralized", "system.deadline_steps=3"], "system: Centralized"),
    (["system.speed_sigma=0.5"], "system.speed_sigma: client speeds only matter against a round deadline"),
    (["system.dropout=1.5"], "system.dropout: must be a probability in"),
    (["system.stragglers=late"], "system.stragglers"),
])
def test_bad_settings_are_refused_at_start(settings, message, compose_cfg, tmp_path):
    with pytest.raises(ConfigError, match=message):
        build_algo(compose_cfg, tmp_path, *SMALL, *settings)

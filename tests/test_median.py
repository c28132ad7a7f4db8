"""The coordinate-wise median server (src/server/median.py) against hand-computed numbers, on
updates that are views of the one working model as the clients send them."""
import pytest
import torch

from src.client.client import Client, ClientUpdate
from src.server.median import MedianServer
from tests.inprocess import SMALL, build_algo
from tests.toy import run_round, toy_setup, weight


def update(w, tracked):
    return ClientUpdate({"w": torch.tensor(w), "tracked": torch.tensor(tracked)}, 1, torch.zeros(()), 1)


def server(state):
    s = MedianServer()
    s.set_global_state(state)
    s.attach(["w"], num_clients=4)
    return s


def test_median_by_hand():
    s = server({"w": torch.zeros(3), "tracked": torch.tensor(0)})
    s.aggregate(iter([update([1.0, 5.0, -2.0], 1), update([100.0, 0.0, -1.0], 2), update([2.0, 4.0, -3.0], 3)]))
    torch.testing.assert_close(s.global_state["w"], torch.tensor([2.0, 4.0, -2.0]))  # the outlier 100 is ignored
    assert s.global_state["tracked"].item() == 3  # integer buffers: the last client's
    s.aggregate(iter([update([1.0, 5.0, 0.0], 0), update([3.0, -1.0, 0.0], 0)]))
    torch.testing.assert_close(s.global_state["w"], torch.tensor([2.0, 2.0, 0.0]))  # even: mean of the middle two
    before = {k: v.clone() for k, v in s.global_state.items()}
    s.aggregate(iter([]))
    assert all(torch.equal(before[k], s.global_state[k]) for k in before)


def test_median_of_three_clients_trained_on_the_one_working_model():
    """One SGD step (lr 0.1) on 0.5 (w x - y)^2 from w = 0 gives w = 0.1 x y: 0.1, 0.3, 0.5 for
    y = 1, 3, 5. The median is 0.3; handed views of the working model, the server would see the
    last client's 0.5 three times."""
    setup = toy_setup([[1.0]] * 3, [1.0, 3.0, 5.0])
    s = server(setup.model.state_dict())
    run_round(s, [Client(i, torch.tensor([i]), setup) for i in range(3)])
    assert weight(s) == pytest.approx([0.3])
    assert setup.live_state["weight"].item() == pytest.approx(0.5)  # the working model: the last client


def test_fedmedian_trains(compose_cfg, tmp_path):
    algo = build_algo(compose_cfg, tmp_path, *SMALL, "algo=fedmedian", "num_rounds=2", "logger.mode=disabled")
    assert isinstance(algo.server, MedianServer)
    assert 0.0 <= algo.fit()["final_test_accuracy"] <= 1.0

"""SCAFFOLD (Karimireddy et al., ICML 2020, Algorithm 1) against hand-computed numbers."""

from functools import partial

import pytest
import torch

from src.algo.scaffold import ScaffoldClient, ScaffoldServer
from src.errors import ConfigError
from tests.inprocess import SMALL, build_algo
from tests.toy import run_round, toy_setup, weight

# Scalar model w, loss 0.5 (w x - y)^2, lr 0.1, K = 2 steps. Client A: x=1, y=1; client B: x=2, y=0;
# two more clients never sampled, so N = 4 and |S|/N = 1/2.


def federation(tmp_path, option="II", lr=1.0, momentum=0.0):
    setup = toy_setup([[1.0], [2.0]], [1.0, 0.0], local_steps=2, tmp_path=tmp_path)
    setup.optimizer = partial(torch.optim.SGD, lr=0.1, momentum=momentum)
    server = ScaffoldServer(lr=lr)
    server.set_global_state(setup.model.state_dict())
    server.attach(setup.param_names, num_clients=4)
    clients = [ScaffoldClient(i, torch.tensor([i]), setup, option=option) for i in range(2)]
    return setup, server, clients


def test_two_rounds_option_II_by_hand(tmp_path):
    setup, server, clients = federation(tmp_path)
    # round 1, controls 0: A: w 0 -> 0.1 -> 0.19; B: grad 4w = 0 stays at 0. x = (0.19 + 0) / 2
    run_round(server, clients, 0)
    assert weight(server) == pytest.approx([0.095])
    # c_A = (x - y_A) / (K lr) = -0.19 / 0.2 = -0.95, c_B = 0; c = (1/N) sum = -0.95 / 4
    assert setup.store.get(0)["control"]["weight"].item() == pytest.approx(-0.95)
    assert server.control["weight"].item() == pytest.approx(-0.2375)

    # round 2 from 0.095. A's correction c - c_A = 0.7125: grads -0.905 + 0.7125, then
    # (0.11425 - 1) + 0.7125 -> y_A = 0.131575. B's correction c = -0.2375: grads 0.38 - 0.2375,
    # then 4 * 0.08075 - 0.2375 -> y_B = 0.0722.
    run_round(server, clients, 1)
    assert weight(server) == pytest.approx([(0.131575 + 0.0722) / 2])
    # c_A+ = c_A - c + (x - y_A)/0.2 = -0.895375 (change 0.054625); c_B+ = 0.2375 + 0.114 = 0.3515
    assert setup.store.get(0)["control"]["weight"].item() == pytest.approx(-0.895375)
    assert setup.store.get(1)["control"]["weight"].item() == pytest.approx(0.3515)
    assert server.control["weight"].item() == pytest.approx(-0.2375 + (0.054625 + 0.3515) / 4)


def test_option_I_uses_the_gradient_at_the_server_model(tmp_path):
    setup, server, clients = federation(tmp_path, option="I")
    run_round(server, clients, 0)
    # g_A(0) = (0 - 1) * 1 = -1, g_B(0) = 4 * 0 = 0; c = (-1 + 0) / 4
    assert setup.store.get(0)["control"]["weight"].item() == pytest.approx(-1.0)
    assert server.control["weight"].item() == pytest.approx(-0.25)
    assert weight(server) == pytest.approx([0.095])  # the local steps themselves are unchanged


def test_global_step_size_scales_the_move(tmp_path):
    _, server, clients = federation(tmp_path, lr=0.5)
    run_round(server, clients, 0)
    assert weight(server) == pytest.approx([0.5 * 0.095])


def test_round_one_with_zero_controls_is_fedavg(compose_cfg, tmp_path):
    """SCAFFOLD's mean is uniform over the sampled clients, as FairAvg's. Equal up to float rounding:
    x + 1.0 * (mean - x) need not round to mean."""
    states = {}
    for algo in ("scaffold", "fairavg"):
        run = build_algo(compose_cfg, tmp_path / algo, *SMALL, f"algo={algo}", "num_rounds=1")
        run.fit()
        states[algo] = run.server.global_state
    for k in states["fairavg"]:
        torch.testing.assert_close(states["scaffold"][k], states["fairavg"][k], rtol=0, atol=1e-6)


def test_option_II_with_momentum_by_hand(tmp_path):
    """Heavy-ball momentum 0.5: A's steps take buffers -1 and 0.5 (-1) - 0.9 = -1.4, so
    y_A = 0.1 + 0.14 = 0.24 (B's gradient stays 0). The step sum is K lr / (1 - beta) = 0.4:
    c_A = (0 - 0.24) / 0.4 = -0.6 (not -0.24 / 0.2 = -1.2), c = -0.6 / 4."""
    setup, server, clients = federation(tmp_path, momentum=0.5)
    run_round(server, clients, 0)
    assert weight(server) == pytest.approx([0.12])
    assert setup.store.get(0)["control"]["weight"].item() == pytest.approx(-0.6)
    assert server.control["weight"].item() == pytest.approx(-0.15)


# Four clients of a 2-weight least-squares problem, all sampled every round; its optimum loss is
# that of the least-squares solution.
TOY_X = [[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [2.0, -1.0]]
TOY_Y = [1.0, -2.0, 3.0, 0.5]


@pytest.mark.parametrize("persist", [False, True])
def test_option_II_with_momentum_converges_on_the_toy(persist, tmp_path):
    """Momentum 0.9, K = 5 steps at lr 0.1: dividing by K lr alone, the loss went 1.3 -> 278 in 30
    rounds (2.5e4 with persisted optimizer state); with K lr / (1 - beta) it reaches the optimum."""
    setup = toy_setup(TOY_X, TOY_Y, local_steps=5, tmp_path=tmp_path, persist_optimizer=persist)
    setup.optimizer = partial(torch.optim.SGD, lr=0.1, momentum=0.9)
    server = ScaffoldServer()
    server.set_global_state(setup.model.state_dict())
    server.attach(setup.param_names, num_clients=4)
    clients = [ScaffoldClient(i, torch.tensor([i]), setup) for i in range(4)]
    for r in range(30):
        run_round(server, clients, r)
    x, y = torch.tensor(TOY_X), torch.tensor(TOY_Y)
    optimum = torch.linalg.lstsq(x, y.unsqueeze(1)).solution.flatten()
    loss = lambda w: 0.5 * (x @ w - y).pow(2).mean().item()  # noqa: E731
    assert loss(server.global_state["weight"].flatten()) == pytest.approx(loss(optimum), abs=1e-3)


def test_option_II_refuses_an_adaptive_optimizer(compose_cfg, tmp_path):
    setup = toy_setup([[1.0]], [1.0])
    setup.optimizer = partial(torch.optim.Adam, lr=0.01)
    with pytest.raises(ConfigError, match="algo.client.option=I.*optimizer=sgd"):
        ScaffoldClient(0, torch.tensor([0]), setup)
    ScaffoldClient(0, torch.tensor([0]), setup, option="I")  # option I holds for any optimizer
    with pytest.raises(ConfigError, match="option II"):  # at start-up, before any round
        build_algo(compose_cfg, tmp_path, *SMALL, "algo=scaffold", "optimizer=adam")


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="option"):
        ScaffoldClient(0, torch.tensor([0]), None, option="III")
    with pytest.raises(ValueError, match="lr"):
        ScaffoldServer(lr=0.0)

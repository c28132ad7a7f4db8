"""FedNova (Wang et al., NeurIPS 2020) against hand-computed numbers: the local solvers' ||a_i||_1,
normalized averaging of unequal local work, and FedAvg as the case of equal work with plain SGD."""
from functools import partial

import pytest
import torch

from src.algo.fednova import FedNovaClient, FedNovaServer, step_sum
from src.engine import Chain, Link, SequentialEngine
from src.errors import ConfigError
from src.losses.proximal import ProximalTerm
from src.server import FedAvgServer
from tests.inprocess import SMALL, build_algo
from tests.toy import toy_setup, weight


@pytest.mark.parametrize("tau", [1, 2, 5, 13])
@pytest.mark.parametrize("lr", [0.1, 0.03])
def test_step_sum_is_the_papers_a_i_for_a_constant_lr(tau, lr):
    """Sec. 3's ||a_i||_1 times eta: tau (SGD), [tau - rho (1 - rho^tau) / (1 - rho)] / (1 - rho)
    (momentum rho), [1 - (1 - eta mu)^tau] / (eta mu) (proximal term mu)."""
    lrs = [lr] * tau
    assert step_sum(lrs) == pytest.approx(lr * tau)
    for rho in (0.5, 0.9):
        assert step_sum(lrs, momentum=rho) == pytest.approx(lr * (tau - rho * (1 - rho ** tau) / (1 - rho)) / (1 - rho))
    for mu in (0.1, 1.0):
        alpha = lr * mu
        assert step_sum(lrs, mu=mu) == pytest.approx(lr * (1 - (1 - alpha) ** tau) / alpha)


def test_step_sum_by_hand():
    # tau = 5, eta = 0.1, rho = 0.9: sum_k (1 - 0.9^(k+1)) = 0.1 + 0.19 + 0.271 + 0.3439 + 0.40951 = 1.31441
    assert step_sum([0.1] * 5, momentum=0.9) == pytest.approx(1.31441)
    # tau = 4, eta = 0.1, mu = 0.5: (1 - 0.95^4) / 0.5 * 0.1 = 0.18549375 / 0.5 = 0.3709875
    assert step_sum([0.1] * 4, mu=0.5) == pytest.approx(0.3709875)
    # an LR schedule: the steps taken, 0.1 then 0.05; with momentum 0.5 the first gradient also moves
    # the second step by 0.5 * 0.05
    assert step_sum([0.1, 0.05]) == pytest.approx(0.15)
    assert step_sum([0.1, 0.05], momentum=0.5) == pytest.approx(0.175)
    # Nesterov 0.5, eta 0.1: steps g + 0.5 buf = 1.5 then 1 + 0.5 * 1.5 = 1.75 -> 0.325
    assert step_sum([0.1, 0.1], momentum=0.5, nesterov=True) == pytest.approx(0.325)
    # dampening 0.5: the second buffer is 0.5 * 1 + 0.5 * 1 = 1 -> 0.2
    assert step_sum([0.1, 0.1], momentum=0.5, dampening=0.5) == pytest.approx(0.2)
    assert step_sum([]) == 0.0


# Scalar w from 0, loss 0.5 (w - y)^2, lr 0.1, 2 local steps. Client A: y = 1 (samples: `a_samples`
# copies of one point); client B: y = -2, a straggler cut to 1 step.
def round_by_hand(server, momentum=0.0, mu=0.0, a_samples=1, b_steps=1):
    setup = toy_setup([[1.0], [1.0]], [1.0, -2.0], local_steps=2,
                      prox=ProximalTerm(mu) if mu else None)
    setup.optimizer = partial(torch.optim.SGD, lr=0.1, momentum=momentum)
    server.set_global_state(setup.model.state_dict())
    server.attach(setup.param_names, num_clients=2)
    a = FedNovaClient(0, torch.tensor([0] * a_samples), setup)
    b = FedNovaClient(1, torch.tensor([1]), setup)
    chains = [Chain.of(a), Chain([Link(b, max_steps=b_steps)], 1, "client 1")]
    server.aggregate(update for _, update in SequentialEngine().train(chains, 0, server.send_data))
    return weight(server)


def test_unequal_local_work_by_hand():
    """A: w 0 -> 0.1 -> 0.19, eta ||a_A|| = 0.2, d_A = -0.19 / 0.2 = -0.95. B: 1 step, w -> -0.2,
    eta ||a_B|| = 0.1, d_B = 0.2 / 0.1 = 2. p = 1/2 each: tau_eff = 0.15, sum p d = 0.525,
    x = -0.15 * 0.525 = -0.07875 (FedAvg: (0.19 - 0.2) / 2 = -0.005)."""
    assert round_by_hand(FedNovaServer()) == pytest.approx([-0.07875])
    assert round_by_hand(FedAvgServer()) == pytest.approx([-0.005])


def test_sample_weights_by_hand():
    """A holds 3 samples: p = (3/4, 1/4). tau_eff = 0.75 * 0.2 + 0.25 * 0.1 = 0.175, sum p d =
    0.75 * -0.95 + 0.25 * 2 = -0.2125, x = 0.0371875; uniform weights give -0.07875 again."""
    assert round_by_hand(FedNovaServer(), a_samples=3) == pytest.approx([0.0371875])
    assert round_by_hand(FedNovaServer(weighting="uniform"), a_samples=3) == pytest.approx([-0.07875])


def test_momentum_by_hand():
    """Momentum 0.5. A: buffers -1, then 0.5 * -1 - 0.9 = -1.4: w = 0.1 + 0.14 = 0.24; eta ||a_A|| =
    0.1 [2 - 0.5 (1 - 0.25) / 0.5] / 0.5 = 0.25, d_A = -0.96. B: w = -0.2, 0.1, d_B = 2.
    tau_eff = 0.175, sum p d = 0.52, x = -0.091."""
    assert round_by_hand(FedNovaServer(), momentum=0.5) == pytest.approx([-0.091])


def test_proximal_term_by_hand():
    """mu = 1. A: grads -1, then (0.1 - 1) + 0.1 = -0.8: w = 0.18; eta ||a_A|| = 0.1 (1 - 0.9^2) /
    0.1 = 0.19, d_A = -18/19. B: the term's gradient is 0 at the start: w = -0.2, d_B = 2.
    tau_eff = 0.145, sum p d = (2 - 18/19) / 2 = 10/19, x = -1.45 / 19."""
    assert round_by_hand(FedNovaServer(), mu=1.0) == pytest.approx([-1.45 / 19])


def test_equal_work_with_plain_sgd_is_fedavg_by_hand():
    """Both clients take 2 steps: A -> 0.19, B -> -0.2 - 0.1 * 1.8 = -0.38; both give -0.095 (in float32)."""
    nova, avg = round_by_hand(FedNovaServer(), b_steps=2), round_by_hand(FedAvgServer(), b_steps=2)
    assert nova == pytest.approx([-0.095]) and nova == pytest.approx(avg, rel=1e-7)


def test_equal_work_with_plain_sgd_is_fedavg_in_a_run(compose_cfg, tmp_path):
    """Every client takes 3 steps: FedNova's global model is FedAvg's up to float rounding
    (x - tau_eff sum p_i d_i need not round to the mean)."""
    states = {}
    for algo in ("fednova", "fedavg"):
        run = build_algo(compose_cfg, tmp_path / algo, *SMALL, f"algo={algo}", "client.local_epochs=null",
                         "client.local_steps=3", "num_rounds=2")
        run.fit()
        states[algo] = run.server.global_state
    for k in states["fedavg"]:
        torch.testing.assert_close(states["fednova"][k], states["fedavg"][k], rtol=0, atol=1e-6)


@pytest.mark.parametrize("settings, message", [
    (["optimizer=adam"], "optimizer: FedNova normalizes .* not for Adam: use optimizer=sgd"),
    (["optimizer.momentum=0.9", "client.persist_optimizer=true"], "client.persist_optimizer: with momentum"),
    (["client.ema.decay=0.9"], "client.ema.send: FedNova normalizes the change of the trained weights"),
])
def test_what_a_i_cannot_describe_is_refused_at_start(settings, message, compose_cfg, tmp_path):
    with pytest.raises(ConfigError, match=message):
        build_algo(compose_cfg, tmp_path, *SMALL, "algo=fednova", *settings)

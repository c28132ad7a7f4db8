"""FedDyn (Acar et al., ICLR 2021, Algorithm 1) against hand-computed numbers, and the two faults
of the FedSeq reference code it must not have."""
from types import SimpleNamespace

import pytest
import torch

from src.algo.feddyn import FedDynClient, FedDynServer
from src.algo.fedseq import FedSeq
from tests.inprocess import SMALL, build_algo
from tests.toy import run_round, toy_setup, weight

# Scalar model, loss 0.5 (w x - y)^2 with x = 1, y = 1, lr 0.1, alpha 0.5; one sampled client of m = 2.


def federation(tmp_path, local_steps=1):
    setup = toy_setup([[1.0]], [1.0], local_steps=local_steps, tmp_path=tmp_path)
    server = FedDynServer(alpha=0.5)
    server.set_global_state(setup.model.state_dict())
    server.attach(setup.param_names, num_clients=2)
    return setup, server, [FedDynClient(0, torch.tensor([0]), setup)]


def test_two_rounds_by_hand(tmp_path):
    setup, server, clients = federation(tmp_path)
    # round 1: grad (0 - 1) - g + alpha (0 - 0) = -1 -> theta_k = 0.1; g = 0 - 0.5 * 0.1 = -0.05
    # h = 0 - alpha/m * 0.1 = -0.025; theta = 0.1 - h / alpha = 0.15
    run_round(server, clients, 0)
    assert setup.store.get(0)["grad_state"]["weight"].item() == pytest.approx(-0.05)
    assert server.h["weight"].item() == pytest.approx(-0.025)
    assert weight(server) == pytest.approx([0.15])
    # round 2 from 0.15: grad (0.15 - 1) - (-0.05) + 0 = -0.8 -> theta_k = 0.23; g = -0.05 - 0.5 * 0.08
    # h = -0.025 - 0.25 * 0.08 = -0.045; theta = 0.23 + 0.045 / 0.5 = 0.32
    run_round(server, clients, 1)
    assert setup.store.get(0)["grad_state"]["weight"].item() == pytest.approx(-0.09)
    assert weight(server) == pytest.approx([0.32])


def test_linear_term_has_a_gradient(tmp_path):
    """At the anchor the quadratic term's gradient is 0, so the penalty's gradient is -g_k."""
    setup, server, clients = federation(tmp_path)
    run_round(server, clients, 0)  # g_k = -0.05 from now on
    client = clients[0]
    client.receive_data(server.send_data())
    client.begin_round(setup.store.get(0))
    (grad,) = torch.autograd.grad(client.penalty(), setup.params)
    assert grad.item() == pytest.approx(0.05)


def test_gradient_state_changes_once_per_round(tmp_path):
    """With 3 local steps the state moves by exactly -alpha (theta_end - theta_start), not per step."""
    setup, server, clients = federation(tmp_path, local_steps=3)
    start = server.global_state["weight"].clone()
    clients[0].receive_data(server.send_data())
    clients[0].client_update(0)
    end = setup.live_state["weight"].clone()
    setup.store.commit()
    assert torch.allclose(setup.store.get(0)["grad_state"]["weight"], -0.5 * (end - start))


def test_alpha_must_be_positive():
    with pytest.raises(ValueError, match="alpha"):
        FedDynServer(alpha=0.0)


@pytest.mark.parametrize("ema", [[], ["client.ema.decay=0.9", "client.ema.send=ema"]])
def test_server_h_stays_the_mean_of_the_client_gradient_states(ema, compose_cfg, tmp_path):
    """h^t = (1/m) sum_k g_k over all m clients (g_k = 0 for those never sampled), also when the
    clients send their EMA: both sides use the weights the server receives."""
    algo = build_algo(compose_cfg, tmp_path, *SMALL, "algo=feddyn", "num_rounds=3", *ema)
    algo.fit()
    store, m = algo.setup.store, len(algo.clients)
    for name, h in algo.server.h.items():
        total = sum(store.get(i)["grad_state"][name] for i in store.client_ids())
        torch.testing.assert_close(h, total / m)


# ---- FedSeq + FedDyn on the toy: four clients (x = 1, y = 1, 3, 0, 4), superclients [0, 1], [2, 3]

def chain_federation(tmp_path, alpha, local_steps=1):
    setup = toy_setup([[1.0]] * 4, [1.0, 3.0, 0.0, 4.0], local_steps=local_steps, tmp_path=tmp_path)
    server = FedDynServer(alpha=alpha)
    server.set_global_state(setup.model.state_dict())
    server.attach(setup.param_names, num_clients=4)  # m counts clients, as FedSeq attaches it
    clients = [FedDynClient(i, torch.tensor([i]), setup) for i in range(4)]
    return setup, server, [clients[:2], clients[2:]]


def run_chains(server, chains, round_idx=0):
    """One FedSeq round (FedSeq.superclient_updates, one pass): each chain trains from the global
    model, every client anchored at it, and sends the merged payload of its clients."""
    def updates():
        for chain in chains:
            received, payloads = server.send_data(), []
            for i, client in enumerate(chain):
                FedSeq.hand_over(None, client, received, first=i == 0)
                client.client_update(round_idx)
                last = client.send_data()
                payloads.append(last.extra)
            merged = FedSeq.merge_payloads(SimpleNamespace(clients=chain, superclient_passes=1), payloads)
            yield last._replace(extra=merged)
    server.aggregate(updates())
    chains[0][0].setup.store.commit()


def test_fedseq_chain_by_hand(tmp_path):
    """Superclient [0, 1] alone, one step each at lr 0.1, alpha 0.5, both anchored at 0.
    Client 0 (y = 1): grad -1 -> 0.1, g_0 = -0.5 * 0.1 = -0.05. Client 1 (y = 3) from 0.1:
    grad (0.1 - 3) + 0.5 * 0.1 = -2.85 -> 0.385, g_1 = -0.5 * 0.385 = -0.1925. h is the mean of
    all four g_k, -0.2425 / 4 = -0.060625 (from the superclient's move alone, -0.5/2 * 0.385 with
    m = 2 superclients), and theta = 0.385 - h / alpha = 0.50625."""
    setup, server, chains = chain_federation(tmp_path, alpha=0.5)
    run_chains(server, chains[:1])
    assert setup.store.get(0)["grad_state"]["weight"].item() == pytest.approx(-0.05)
    assert setup.store.get(1)["grad_state"]["weight"].item() == pytest.approx(-0.1925)
    assert server.h["weight"].item() == pytest.approx(-0.060625)
    assert weight(server) == pytest.approx([0.50625])


def test_fedseq_chains_reach_feddyns_fixed_point(tmp_path):
    """Both superclients every round, 5 steps: the optimum of sum_k 0.5 (w - y_k)^2 is the mean of
    the y_k, 2. With h from the superclients' moves (m = 2) the run settled at 3.5, the mean of
    the chains' last clients."""
    setup, server, chains = chain_federation(tmp_path, alpha=0.5, local_steps=5)
    for r in range(100):
        run_chains(server, chains, r)
    assert weight(server) == pytest.approx([2.0], abs=1e-4)
    g = [setup.store.get(i)["grad_state"]["weight"].item() for i in range(4)]
    assert server.h["weight"].item() == pytest.approx(sum(g) / 4, abs=1e-6)

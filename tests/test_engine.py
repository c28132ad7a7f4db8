"""The engine seam: chains of clients trained by the sequential engine, one update per chain."""
import pytest
import torch

from src.client.client import Client
from src.engine import Chain, Link, SequentialEngine
from src.server import FedAvgServer
from src.transforms import UpdateTransform
from tests.inprocess import SMALL, build_algo
from tests.toy import toy_setup


def toy(tmp_path):
    """Two one-sample clients (x = 1, y = 1 and 3), w starts at 0, one SGD step at lr 0.1."""
    setup = toy_setup([[1.0], [1.0]], [1.0, 3.0], tmp_path=tmp_path)
    server = FedAvgServer()
    server.set_global_state(setup.model.state_dict())
    return server, [Client(i, torch.tensor([i]), setup) for i in range(2)]


def test_a_chain_hands_its_weights_on_and_sends_one_update(tmp_path):
    """Client 0: grad -1 -> w 0.1, loss 0.5. Client 1 continues from 0.1: grad -2.9 -> 0.39,
    loss 0.5 * 2.9^2 = 4.205. Alone, client 1 would start at 0: -> 0.3."""
    server, clients = toy(tmp_path)
    payloads = []

    def merge(p):
        payloads.append(p)
        return {"merged": len(p)}
    chain = Chain([Link(clients[0]), Link(clients[1])], 7, "pair")
    (got, update), = SequentialEngine().train([chain], 0, server.send_data, merge=merge)
    assert got is chain and payloads == [[None, None]] and update.extra == {"merged": 2}
    assert update.state["weight"].item() == pytest.approx(0.39)
    assert update.num_samples == 7 and update.samples_seen == 2
    assert update.loss_sum.item() == pytest.approx(0.5 + 4.205)
    singles = SequentialEngine().train([Chain.of(c) for c in clients], 0, server.send_data)
    assert [u.state["weight"].item() for _, u in singles] == pytest.approx([0.1, 0.3])


def test_client_transforms_see_each_chains_update_and_its_sender(tmp_path):
    server, clients = toy(tmp_path)
    seen = []

    class Double(UpdateTransform):
        def client(self, update, client_id, store):
            seen.append((client_id, store))
            return update._replace(num_samples=2 * update.num_samples)
    chains = [Chain([Link(clients[1]), Link(clients[0])], 2, "both"), Chain.of(clients[1])]
    updates = [u for _, u in SequentialEngine().train(chains, 0, server.send_data, transforms=[Double()],
                                                      merge=lambda p: None)]
    assert [u.num_samples for u in updates] == [4, 2]
    assert seen == [(0, clients[0].setup.store), (1, clients[1].setup.store)]


def test_check_stop_runs_before_every_client(tmp_path):
    server, clients = toy(tmp_path)
    calls = []
    chain = Chain([Link(clients[0]), Link(clients[1]), Link(clients[0], stream=1)], 2, "two passes")
    list(SequentialEngine().train([chain], 0, server.send_data, merge=lambda p: None,
                                  check_stop=lambda: calls.append(1)))
    assert len(calls) == 3


def test_the_engine_is_a_config_group(compose_cfg, tmp_path):
    algo = build_algo(compose_cfg, tmp_path, *SMALL, "engine=sequential")
    assert isinstance(algo.engine, SequentialEngine)

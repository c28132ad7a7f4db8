"""FedAvg and FairAvg aggregation against hand-computed numbers on toy clients."""
from functools import partial

import pytest
import torch
import torch.nn as nn

from src.client.client import Client, ClientUpdate, TrainSetup
from src.data.device_data import DeviceDataset
from src.losses import CrossEntropy
from src.server import FedAvgServer


def update(w, b, n, tracked=0):
    state = {"w": torch.tensor(w), "b": torch.tensor(b), "tracked": torch.tensor(tracked)}
    return ClientUpdate(state, n, torch.zeros(()), n)


def server(weighting):
    s = FedAvgServer(weighting)
    s.set_global_state({"w": torch.zeros(2), "b": torch.zeros(()), "tracked": torch.tensor(0)})
    return s


def test_fedavg_weights_by_sample_count():
    s = server("samples")
    s.aggregate(iter([update([1.0, 2.0], 3.0, 1), update([4.0, -2.0], 0.0, 2), update([0.0, 1.0], 6.0, 3)]))
    # w = (1*[1,2] + 2*[4,-2] + 3*[0,1]) / 6 = [9, 1] / 6 ; b = (3 + 0 + 18) / 6
    torch.testing.assert_close(s.global_state["w"], torch.tensor([1.5, 1 / 6]))
    torch.testing.assert_close(s.global_state["b"], torch.tensor(3.5))


def test_fairavg_weights_uniformly():
    s = server("uniform")
    s.aggregate(iter([update([1.0, 2.0], 3.0, 1), update([4.0, -2.0], 0.0, 2), update([0.0, 1.0], 6.0, 3)]))
    torch.testing.assert_close(s.global_state["w"], torch.tensor([5 / 3, 1 / 3]))
    torch.testing.assert_close(s.global_state["b"], torch.tensor(3.0))


def test_integer_buffers_come_from_the_last_client_and_empty_round_changes_nothing():
    s = server("samples")
    s.aggregate(iter([update([1.0, 1.0], 1.0, 5, tracked=7), update([1.0, 1.0], 1.0, 5, tracked=9)]))
    assert s.global_state["tracked"].item() == 9 and s.global_state["tracked"].dtype == torch.int64
    before = {k: v.clone() for k, v in s.global_state.items()}
    s.aggregate(iter([]))
    assert all(torch.equal(before[k], s.global_state[k]) for k in before)


def test_unknown_weighting_is_refused():
    with pytest.raises(ValueError, match="weighting"):
        FedAvgServer("median")


def test_batchnorm_running_statistics_are_averaged():
    bn = nn.BatchNorm1d(2)
    s = FedAvgServer("samples")
    s.set_global_state(bn.state_dict())
    a = {k: v.clone() for k, v in bn.state_dict().items()}
    b = {k: v.clone() for k, v in bn.state_dict().items()}
    a["running_mean"] = torch.tensor([1.0, 2.0])
    b["running_mean"] = torch.tensor([4.0, 8.0])
    s.aggregate(iter([ClientUpdate(a, 1, torch.zeros(()), 1), ClientUpdate(b, 3, torch.zeros(()), 3)]))
    torch.testing.assert_close(s.global_state["running_mean"], torch.tensor([3.25, 6.5]))


def test_one_round_of_clients_and_server_by_hand():
    """Two clients, one sample each, one SGD step (lr 0.5) of a zero-initialised linear model with
    cross-entropy. At zero weights softmax is uniform, so the gradient is (p - onehot) x^T."""
    model = nn.Linear(2, 2)
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    y = torch.tensor([0, 1])
    setup = TrainSetup(model, DeviceDataset(x, y, 2), CrossEntropy(), partial(torch.optim.SGD, lr=0.5),
                       batch_size=1, local_epochs=1, local_steps=None, amp_dtype=None, seed=0)
    clients = [Client(0, torch.tensor([0]), setup), Client(1, torch.tensor([1, 1, 1]), setup)]
    s = FedAvgServer("samples")
    s.set_global_state(model.state_dict())

    def updates():
        for c in clients:
            c.receive_data(s.send_data())
            c.client_update(0)
            yield c.send_data()

    # client 1 has 3 copies of its sample and takes 3 steps; from zero, step 1 gives
    # W = -0.5 * ([0.5, -0.5]^T [3, -1]); later steps use the softmax at the new weights.
    w1 = torch.zeros(2, 2)
    b1 = torch.zeros(2)
    for _ in range(3):
        p = torch.softmax(w1 @ x[1] + b1, 0)
        g = p - torch.tensor([0.0, 1.0])
        w1, b1 = w1 - 0.5 * torch.outer(g, x[1]), b1 - 0.5 * g
    g0 = torch.tensor([0.5, 0.5]) - torch.tensor([1.0, 0.0])
    w0, b0 = -0.5 * torch.outer(g0, x[0]), -0.5 * g0
    s.aggregate(updates())
    torch.testing.assert_close(s.global_state["weight"], (1 * w0 + 3 * w1) / 4)
    torch.testing.assert_close(s.global_state["bias"], (1 * b0 + 3 * b1) / 4)

"""Toy federations for hand-computed algorithm tests: scalar or 2-weight linear models with the
loss 0.5 (w.x - y)^2, one sample per client, plain SGD."""
from functools import partial

import torch
import torch.nn as nn

from src.client.client import TrainSetup
from src.client.state_store import ClientStateStore
from src.data.device_data import DeviceDataset
from src.engine import Chain, SequentialEngine


class HalfSquaredError(nn.Module):
    def forward(self, pred, target):
        return 0.5 * (pred.squeeze(-1) - target).pow(2).mean()


def toy_setup(xs, ys, lr=0.1, local_steps=1, weight=0.0, tmp_path=None, **kw):
    """One sample per client: x of shape (clients, features), y (clients,)."""
    x = torch.tensor(xs, dtype=torch.float32)
    model = nn.Linear(x.shape[1], 1, bias=False)
    nn.init.constant_(model.weight, weight)
    store = ClientStateStore("host", torch.device("cpu"), tmp_path) if tmp_path is not None else None
    return TrainSetup(model, DeviceDataset(x, torch.tensor(ys, dtype=torch.float32), 1), HalfSquaredError(),
                      partial(torch.optim.SGD, lr=lr), batch_size=1, local_epochs=None, local_steps=local_steps,
                      seed=0, store=store, **kw)


def run_round(server, clients, round_idx=0):
    """Train `clients` in order from the server's model and aggregate, as FedAvg.train_step does."""
    chains = SequentialEngine().train([Chain.of(c) for c in clients], round_idx, server.send_data)
    server.aggregate(update for _, update in chains)
    store = clients[0].setup.store
    if store is not None:
        store.commit()


def weight(server):
    return server.global_state["weight"].flatten().tolist()

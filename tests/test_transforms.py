"""Update transforms (src/transforms.py): server-side ones run in order before accumulation; a
client-side one keeps per-client state in the store beside the client's own, and its own state
in state_dict."""
import pytest
import torch

from src.client.client import ClientUpdate
from src.client.state_store import ClientStateStore
from src.server import FedAvgServer
from src.transforms import UpdateTransform


class Affine(UpdateTransform):
    """Server side: w -> a w + b."""

    def __init__(self, a, b):
        self.a, self.b = a, b

    def server(self, update):
        return update._replace(state={k: self.a * v + self.b for k, v in update.state.items()})


class Quantize(UpdateTransform):
    """Client side: sends its weights rounded to multiples of `step`, carrying the rounding error
    into its next round (error feedback, per client in the store); counts the updates it rounded."""

    def __init__(self, step):
        self.step, self.rounded = step, 0

    def client(self, update, client_id, store):
        residual = store.get(client_id).get("residual", {})
        target = {k: v + residual[k] if k in residual else v for k, v in update.state.items()}
        sent = {k: torch.round(v / self.step) * self.step for k, v in target.items()}
        store.update(client_id, {"residual": {k: target[k] - sent[k] for k in sent}})
        self.rounded += 1
        return update._replace(state=sent)

    def state_dict(self):
        return {"rounded": self.rounded}

    def load_state_dict(self, state):
        self.rounded = state["rounded"]


def update(w, n=1):
    return ClientUpdate({"w": torch.tensor(w)}, n, torch.zeros(()), n)


@pytest.mark.parametrize("order, expected", [("shift_then_scale", 2 * (2.0 + 1)), ("scale_then_shift", 2 * 2.0 + 1)])
def test_server_transforms_run_in_order_before_accumulation(order, expected):
    s = FedAvgServer("samples")
    s.set_global_state({"w": torch.zeros(())})
    s.attach(["w"], num_clients=2)
    shift, scale = Affine(1.0, 1.0), Affine(2.0, 0.0)
    s.transforms = [shift, scale] if order == "shift_then_scale" else [scale, shift]
    s.aggregate(iter([update(1.0, n=1), update(3.0, n=1)]))  # mean of the raw weights: 2
    assert s.global_state["w"].item() == expected


def test_identity_is_the_default():
    u = update(1.5)
    assert UpdateTransform().client(u, 0, None) is u and UpdateTransform().server(u) is u
    assert UpdateTransform().state_dict() == {}


@pytest.mark.parametrize("where", ["device", "host", "disk"])
def test_client_transform_keeps_its_state_beside_the_clients_own(where, tmp_path):
    store = ClientStateStore(where, torch.device("cpu"), tmp_path)
    q = Quantize(0.25)
    # round 1: the client stages its own state, then 0.1 is sent as 0.0, residual 0.1
    store.put(0, {"control": torch.tensor(7.0)})
    assert q.client(update(0.1), 0, store).state["w"].item() == 0.0
    store.commit()
    assert store.get(0)["control"].item() == 7.0  # not replaced by the transform's entry
    assert store.get(0)["residual"]["w"].item() == pytest.approx(0.1)
    # round 2, nothing staged by the client: 0.2 + 0.1 is sent as 0.25, residual 0.05
    assert q.client(update(0.2), 0, store).state["w"].item() == 0.25
    store.commit()
    assert store.get(0)["residual"]["w"].item() == pytest.approx(0.05)
    assert store.get(0)["control"].item() == 7.0
    # a dropped client's round does not count: its staged residual goes with the rest
    q.client(update(0.0), 0, store)
    store.discard(0)
    store.commit()
    assert store.get(0)["residual"]["w"].item() == pytest.approx(0.05)
    resumed = Quantize(0.25)
    resumed.load_state_dict(q.state_dict())
    assert resumed.rounded == 3


def test_transforms_run_inside_training_and_are_checkpointed(compose_cfg, tmp_path):
    """End to end: the engine applies the client transform to every trained client's update, the
    server its own before accumulating; both lists are the algorithm's, saved in resume.pt."""
    from tests.inprocess import SMALL, build_algo
    from src.utils.io import load_torch

    algo = build_algo(compose_cfg, tmp_path / "run", *SMALL, "num_rounds=2")
    quantize, seen = Quantize(0.5), []

    class Record(UpdateTransform):
        def server(self, update):
            seen.append(sorted(torch.unique(torch.cat([v.flatten() / 0.5 for v in update.state.values()
                                                       if v.is_floating_point()])).frac().abs().tolist()))
            return update
    algo.transforms.extend([quantize, Record()])
    algo.fit()
    per_round = round(0.5 * len(algo.clients))
    assert quantize.rounded == 2 * per_round and len(seen) == 2 * per_round
    assert all(fracs == [0.0] for fracs in seen)   # the server received the quantized weights
    assert load_torch(tmp_path / "run" / "resume.pt")["transforms"][0] == {"rounded": 2 * per_round}
    trained = [i for i in algo.setup.store.client_ids() if "residual" in algo.setup.store.get(i)]
    assert len(trained) >= per_round

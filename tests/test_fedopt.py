"""FedAdagrad, FedAdam, FedYogi and FedAvgM (FedOptServer) against hand-computed numbers on toy clients."""
import io
import logging
import math

import pytest
import torch
import torch.nn as nn
from hydra.utils import instantiate

from src.client.client import ClientUpdate
from src.config import validate
from src.errors import ConfigError
from src.server import FedAvgServer, FedOptServer

SPREAD = torch.tensor([3.0, -6.0])


def clients(server, delta, tracked=0):
    """Two clients (1 and 3 samples) at x_t + delta + SPREAD and x_t + delta - SPREAD/3: their
    sample-weighted mean is x_t + delta, so Delta_t = delta."""
    x = server.global_state
    delta = torch.tensor(delta)
    for w, n in ((x["w"] + delta + SPREAD, 1), (x["w"] + delta - SPREAD / 3, 3)):
        yield ClientUpdate({"w": w, "tracked": torch.tensor(tracked)}, n, torch.zeros(()), n)


def start(server, state, param_names=("w",)):
    """As FedBase starts a server: the initial model, then the parameter names."""
    server.set_global_state(state)
    server.attach(list(param_names), num_clients=10)
    return server


def fedopt(optimizer, **kw):
    return start(FedOptServer(optimizer, **kw), {"w": torch.zeros(2), "tracked": torch.tensor(0)})


def two_rounds(s, delta1, delta2):
    s.aggregate(clients(s, delta1, tracked=1))
    x1 = s.global_state["w"].clone()
    s.aggregate(clients(s, delta2, tracked=2))
    assert s.global_state["tracked"].item() == 2  # integer buffers as FedAvg: the last client's
    return x1, s.global_state["w"]


def test_fedadagrad_by_hand():
    s = fedopt("adagrad", lr=1.0, beta1=0.5, tau=3.0)  # v_{-1} = tau^2 = 9
    x1, x2 = two_rounds(s, [4.0, -4.0], [12.0, 0.0])
    # round 1: m = 0.5*Delta = [2, -2]; v = 9 + 16 = 25; x = m / (5 + 3) = [0.25, -0.25]
    torch.testing.assert_close(x1, torch.tensor([0.25, -0.25]))
    # round 2: m = 0.5*[2, -2] + 0.5*[12, 0] = [7, -1]; v = 25 + [144, 0] = [169, 25]
    # x = [0.25 + 7/(13 + 3), -0.25 - 1/(5 + 3)] = [0.6875, -0.375]
    torch.testing.assert_close(x2, torch.tensor([0.6875, -0.375]))
    torch.testing.assert_close(s.v["w"], torch.tensor([169.0, 25.0]))


def test_fedadam_by_hand():
    s = fedopt("adam", lr=1.0, beta1=0.5, beta2=0.75, tau=3.0)
    x1, x2 = two_rounds(s, [3.0, -3.0], [13.0, 3.0])
    # round 1: m = [1.5, -1.5]; v = 0.75*9 + 0.25*9 = 9; x = 1.5 / (3 + 3) = [0.25, -0.25] (no bias correction)
    torch.testing.assert_close(x1, torch.tensor([0.25, -0.25]))
    # round 2: m = 0.5*[1.5, -1.5] + 0.5*[13, 3] = [7.25, 0.75]; v = 6.75 + 0.25*[169, 9] = [49, 9]
    # x = [0.25 + 7.25/(7 + 3), -0.25 + 0.75/(3 + 3)] = [0.975, -0.125]
    torch.testing.assert_close(x2, torch.tensor([0.975, -0.125]))
    torch.testing.assert_close(s.m["w"], torch.tensor([7.25, 0.75]))


def test_fedyogi_by_hand():
    s = fedopt("yogi", lr=1.0, beta1=0.5, beta2=0.75, tau=3.0)
    x1, x2 = two_rounds(s, [8.0, 2.0], [-2.0, 4.0])
    # round 1: Delta^2 = [64, 4] against v_{-1} = 9: v grows where Delta^2 > v, shrinks where it is smaller:
    # v = [9 + 0.25*64, 9 - 0.25*4] = [25, 8]; m = [4, 1]; x = [4/(5 + 3), 1/(sqrt 8 + 3)]
    torch.testing.assert_close(x1, torch.tensor([0.5, 1 / (math.sqrt(8) + 3)]))
    # round 2: Delta^2 = [4, 16] against v = [25, 8]: v = [25 - 0.25*4, 8 + 0.25*16] = [24, 12]
    # m = 0.5*[4, 1] + 0.5*[-2, 4] = [1, 2.5]
    torch.testing.assert_close(s.v["w"], torch.tensor([24.0, 12.0]))
    torch.testing.assert_close(x2, torch.tensor([0.5 + 1 / (math.sqrt(24) + 3),
                                                 1 / (math.sqrt(8) + 3) + 2.5 / (math.sqrt(12) + 3)]))


def test_fedavgm_by_hand():
    s = fedopt("momentum", lr=0.5, beta1=0.5)
    x1, x2 = two_rounds(s, [4.0, -4.0], [2.0, 1.0])
    # round 1: m = Delta = [4, -4]; x = 0.5*m = [2, -2]
    torch.testing.assert_close(x1, torch.tensor([2.0, -2.0]))
    # round 2: m = 0.5*[4, -4] + [2, 1] = [4, -1]; x = [2, -2] + 0.5*[4, -1] = [4, -2.5]
    torch.testing.assert_close(x2, torch.tensor([4.0, -2.5]))
    assert s.v == {}


def random_rounds(num_rounds, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[ClientUpdate({"w": torch.randn(5, generator=g), "tracked": torch.tensor(r)}, n, torch.zeros(()), n)
             for n in (1, 3, 7)] for r in range(num_rounds)]


def test_fedavgm_without_momentum_and_unit_lr_is_fedavg_exactly():
    init = {"w": torch.randn(5, generator=torch.Generator().manual_seed(1)), "tracked": torch.tensor(0)}
    avg, avgm = FedAvgServer("samples"), FedOptServer("momentum", lr=1.0, beta1=0.0)
    for s in (avg, avgm):
        start(s, init)
    for updates in random_rounds(4):
        avg.aggregate(iter(updates))
        avgm.aggregate(iter(updates))
        assert all(torch.equal(avg.global_state[k], avgm.global_state[k]) for k in init)


def test_empty_round_changes_nothing():
    s = fedopt("adam", lr=0.1)
    s.aggregate(clients(s, [1.0, 2.0]))
    before = {k: v.clone() for k, v in {**s.global_state, "m": s.m["w"], "v": s.v["w"]}.items()}
    s.aggregate(iter([]))
    after = {**s.global_state, "m": s.m["w"], "v": s.v["w"]}
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_batchnorm_buffers_are_averaged_not_optimized_and_a_warning_is_logged(caplog):
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    s = FedOptServer("adam", lr=0.1)
    params = [n for n, _ in model.named_parameters()]
    with caplog.at_level(logging.WARNING, logger="src.server.fedopt"):
        start(s, model.state_dict(), params)
    assert "GroupNorm" in caplog.text
    assert sorted(s.m) == ["0.bias", "0.weight", "1.bias", "1.weight"]
    a = {k: v.clone() for k, v in model.state_dict().items()}
    b = {k: v + 1 for k, v in model.state_dict().items()}
    a["1.running_mean"], b["1.running_mean"] = torch.tensor([1.0, 2.0]), torch.tensor([4.0, 8.0])
    s.aggregate(iter([ClientUpdate(a, 1, torch.zeros(()), 1), ClientUpdate(b, 3, torch.zeros(()), 3)]))
    # buffers: plain FedAvg, (1*[1, 2] + 3*[4, 8]) / 4 and (1*1 + 3*2) / 4; the step counter from the last client
    torch.testing.assert_close(s.global_state["1.running_mean"], torch.tensor([3.25, 6.5]))
    torch.testing.assert_close(s.global_state["1.running_var"], torch.full((2,), 1.75))
    assert s.global_state["1.num_batches_tracked"].item() == 1
    # parameters: Delta = 0.75 everywhere, m = 0.075, v = 0.99e-6 + 0.01*0.5625; step = lr*m/(sqrt(v) + tau)
    step = 0.1 * 0.075 / (math.sqrt(0.99e-6 + 0.005625) + 1e-3)
    torch.testing.assert_close(s.global_state["1.weight"], torch.full((2,), 1 + step))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="src.server.fedopt"):
        start(FedOptServer("adam", lr=0.1), nn.Linear(2, 2).state_dict(), ["weight", "bias"])  # no BatchNorm, no warning
    assert caplog.text == ""


@pytest.mark.parametrize("optimizer", ["adagrad", "adam", "yogi", "momentum"])
def test_resume_from_state_dict_continues_bit_for_bit(optimizer):
    rounds = random_rounds(3)
    init = {"w": torch.zeros(5), "tracked": torch.tensor(0)}
    a, b = FedOptServer(optimizer, lr=0.1), FedOptServer(optimizer, lr=0.1)
    start(a, init)
    for updates in rounds[:2]:
        a.aggregate(iter(updates))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    start(b, init)  # as FedBase does before it loads a checkpoint
    b.load_state_dict(torch.load(buf, weights_only=True))
    for s in (a, b):
        s.aggregate(iter(rounds[2]))
    for part in ("global_state", "m", "v"):
        sa, sb = a.state_dict()[part], b.state_dict()[part]
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), part


@pytest.mark.parametrize("kwargs,message", [
    ({"optimizer": "sgd", "lr": 0.1}, "optimizer must be"),
    ({"optimizer": "adam", "lr": 0.0}, "lr must be > 0"),
    ({"optimizer": "adam", "lr": 0.1, "beta1": 1.0}, r"beta1 must be in \[0, 1\)"),
    ({"optimizer": "momentum", "lr": 1.0, "beta1": -0.1}, r"beta1 must be in \[0, 1\)"),
    ({"optimizer": "yogi", "lr": 0.1, "beta2": 1.5}, r"beta2 must be in \[0, 1\)"),
    ({"optimizer": "adagrad", "lr": 0.1, "tau": 0.0}, "tau must be > 0"),
    ({"optimizer": "adam", "lr": 0.1, "weighting": "median"}, "weighting"),
])
def test_bad_values_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FedOptServer(**kwargs)


@pytest.mark.parametrize("name,optimizer", [("fedadam", "adam"), ("fedyogi", "yogi"), ("fedadagrad", "adagrad"),
                                            ("fedavgm", "momentum")])
def test_config_composes_and_instantiates(compose_cfg, name, optimizer):
    cfg = compose_cfg(f"algo={name}")
    validate(cfg)
    server = instantiate(cfg.algo.server)
    assert isinstance(server, FedOptServer) and server.optimizer == optimizer


def test_bad_config_values_are_reported(compose_cfg):
    with pytest.raises(ConfigError) as info:
        validate(compose_cfg("algo=fedyogi", "algo.server.beta2=1.0"))
    assert "beta2 must be in [0, 1)" in "\n".join(info.value.problems)
    with pytest.raises(ConfigError) as info:
        validate(compose_cfg("algo=fedadam", "algo.server.optimizer=sgd"))
    assert "algo.server.optimizer: expected 'adagrad' | 'adam' | 'yogi' | 'momentum'" in "\n".join(info.value.problems)

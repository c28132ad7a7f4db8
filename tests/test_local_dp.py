"""Local DP-SGD (src/local_dp.py): per-sample clipping by hand, the noise's scale and stream (an empty
Poisson batch: noise alone), a data-independent penalty added after the noise, the Poisson sampling
rate, epsilon against dp_accounting called directly, the target_epsilon refusal, seeded runs and
resume bit for bit, train.py end to end, refused settings."""
import json
import math
from functools import partial

import dp_accounting
import pytest
import torch
from dp_accounting.rdp import RdpAccountant
from torch import nn

from src.client.client import Client, TrainSetup
from src.data.device_data import DeviceDataset
from src.errors import ConfigError
from src.local_dp import LocalAccountant, LocalDP
from src.utils.seeding import CLIENT_DATA, LOCAL_DP_NOISE, torch_generator
from tests.conftest import run_train
from tests.inprocess import SMALL, build_algo, interrupted, metrics_without_times, resume

LDP = [*SMALL, "client.batch_size=10", "local_dp.enabled=true", "local_dp.noise_multiplier=1.0",
       "local_dp.clip_norm=0.5", "eval_every=1"]


def library_epsilon(rate, z, steps, delta):
    """dp_accounting itself: `steps` Poisson-sampled Gaussian steps, add-or-remove-one (its default)."""
    accountant = RdpAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(z)), steps)
    return accountant.get_epsilon(delta)


def linear_client(x: torch.Tensor, batch_size: int, z: float, clip: float, weight=None):
    """A client holding the rows of `x`, training w in w.x with lr 1 on the loss mean_j w.x_j, whose
    per-sample gradients are the x_j themselves."""
    model = nn.Linear(x.shape[1], 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.zeros_like(model.weight) if weight is None else weight)
    n = x.shape[0]
    setup = TrainSetup(model=model, data=DeviceDataset(x, torch.zeros(n, dtype=torch.long), 2),
                       loss_fn=lambda out, y: out.mean(), optimizer=partial(torch.optim.SGD, lr=1.0),
                       batch_size=batch_size, local_epochs=None, local_steps=1, seed=0)
    setup.local_dp = LocalDP(setup, [n], noise_multiplier=z, clip_norm=clip, delta=1e-5, seed=0)
    return Client(0, torch.arange(n), setup), setup.local_dp


def one_step(client, local, x, y, penalty=lambda: None):
    """One DP step on the given batch, as Client.client_update takes it."""
    optimizer = local.optimizer(torch.optim.SGD(client.setup.params, lr=1.0), client, 0, 0)
    optimizer.zero_grad(set_to_none=True)
    loss = local.backward(x, y, penalty)
    optimizer.step()
    return loss


def test_without_noise_a_step_is_the_mean_of_the_per_sample_gradients_clipped_by_hand():
    """x_1 = (3, 4) (norm 5, clipped to C = 1: (0.6, 0.8)), x_2 = (0.3, 0.4) (norm 0.5, kept); batch
    size 2 of 2 samples: q = 1, both drawn, and w = -(0.6 + 0.3, 0.8 + 0.4) / 2 after one step."""
    x = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    client, local = linear_client(x, batch_size=2, z=0.0, clip=1.0)
    client.client_update(0)
    # opacus divides by the norm + 1e-6
    assert torch.allclose(client.setup.model.weight, torch.tensor([[-0.45, -0.6]]), atol=1e-6)
    assert local._pending == {0: 1}
    # outside a DP step the hooks are off: plain training and evaluation compute no per-sample gradients
    client.setup.model(x).sum().backward()
    assert all(p.grad_sample is None for p in client.setup.params)


def test_the_noise_has_std_z_c_over_the_expected_batch_and_an_empty_batch_is_noise_alone():
    """4 samples, batch size 2: q = 1/2, expected batch 2; z = 2, C = 0.5: an empty batch moves w by
    N(0, (z C)^2) / 2, std 0.5, drawn from the (seed, round, client) stream LOCAL_DP_NOISE."""
    d = 200_000
    x = torch.randn(4, d)
    client, local = linear_client(x, batch_size=2, z=2.0, clip=0.5)
    loss = one_step(client, local, x[:0], torch.zeros(0, dtype=torch.long))
    assert loss.item() == 0.0 and local._pending == {0: 1}  # a step taken: it is accounted
    w = client.setup.model.weight.detach()
    assert w.std().item() == pytest.approx(0.5, rel=0.01)  # 2e5 draws: the std's sd is 0.16 %
    noise = torch.normal(0.0, 1.0, size=(1, d), generator=torch_generator(torch.device("cpu"), 0, LOCAL_DP_NOISE, 0, 0))
    assert torch.allclose(w, -noise / 2)


def test_a_data_independent_penalty_joins_the_noisy_gradient():
    """z = 0, the batch of test 1 (clipped mean (0.45, 0.6)) and a penalty <c, w> of gradient c."""
    x = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    client, local = linear_client(x, batch_size=2, z=0.0, clip=1.0, weight=torch.tensor([[1.0, 1.0]]))
    c = torch.tensor([[0.25, -0.5]])
    w = client.setup.model.weight
    one_step(client, local, x, torch.zeros(2, dtype=torch.long), penalty=lambda: (w * c).sum())
    assert torch.allclose(w, torch.tensor([[1 - 0.45 - 0.25, 1 - 0.6 + 0.5]]), atol=1e-6)


def test_batches_are_poisson_samples_at_rate_batch_size_over_n_from_the_clients_stream():
    n, steps = 1000, 400
    client, local = linear_client(torch.randn(n, 3), batch_size=100, z=1.0, clip=1.0)
    gen = torch_generator(torch.device("cpu"), 0, CLIENT_DATA, 0, 0)
    first = torch.rand(n, generator=torch_generator(torch.device("cpu"), 0, CLIENT_DATA, 0, 0)) < 0.1
    sizes = []
    for i, (x, _) in enumerate(local.batches(client, steps, gen)):
        if i == 0:
            assert torch.equal(x, client.setup.data.x[first])  # sample j in when u_j < q, u from the stream
        sizes.append(x.shape[0])
    # mean 100, sd sqrt(1000 * 0.1 * 0.9) / sqrt(400) = 0.47
    assert sum(sizes) / steps == pytest.approx(100, abs=2) and len(set(sizes)) > 10
    small, local = linear_client(torch.randn(5, 3), batch_size=10, z=1.0, clip=1.0)  # B > n: q = 1
    assert local.rates == [1.0] and all(x.shape[0] == 5 for x, _ in local.batches(small, 3, gen))


def test_epsilon_is_dp_accountings_for_each_clients_poisson_steps_and_the_worst_is_reported(compose_cfg, tmp_path):
    accountant = LocalAccountant([0.05, 0.2], [20, 5], noise_multiplier=1.1, delta=1e-5)
    assert accountant.client_epsilon(0, 90) == library_epsilon(0.05, 1.1, 90, 1e-5)
    assert accountant.epsilon(3) == max(library_epsilon(0.05, 1.1, 60, 1e-5), library_epsilon(0.2, 1.1, 15, 1e-5))
    algo = build_algo(compose_cfg, tmp_path, *LDP)
    results = algo.fit()
    sizes = [c.num_samples for c in algo.clients]
    steps, expected = [0] * len(sizes), []
    for m in algo.history:  # one local epoch of ceil(n / 10) steps for every client selected
        for cid in m["clients"]:
            steps[cid] += math.ceil(sizes[cid] / 10)
        expected.append(max(library_epsilon(min(1.0, 10 / sizes[i]), 1.0, k, 1e-5) for i, k in enumerate(steps) if k))
    assert [m["local_dp_epsilon"] for m in algo.history] == expected and algo.local_dp.steps == steps
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["local_dp_epsilon"] == results["local_dp_epsilon"] == expected[-1]
    assert saved["local_dp_delta"] == 1e-5 and saved["local_dp_noise_multiplier"] == 1.0


def test_target_epsilon_refuses_a_run_that_could_spend_more_naming_the_rounds_that_fit(compose_cfg, tmp_path):
    algo = build_algo(compose_cfg, tmp_path, *LDP)
    sizes = [c.num_samples for c in algo.clients]
    # the bound: every client trains every round
    eps = [max(library_epsilon(min(1.0, 10 / n), 1.0, r * math.ceil(n / 10), 1e-5) for n in sizes)
           for r in range(1, 4)]
    target = (eps[1] + eps[2]) / 2  # two rounds fit, three do not
    with pytest.raises(ConfigError, match="every round.*2 rounds fit: set num_rounds=2"):
        build_algo(compose_cfg, tmp_path / "refused", *LDP, f"local_dp.target_epsilon={target}")
    assert not (tmp_path / "refused").exists()  # refused before anything is written
    with pytest.raises(ConfigError, match="not even one round fits"):
        build_algo(compose_cfg, tmp_path, *LDP, f"local_dp.target_epsilon={eps[0] / 2}")
    build_algo(compose_cfg, tmp_path, *LDP, "num_rounds=2", f"local_dp.target_epsilon={target}")  # fits


def test_runs_are_seeded_and_a_resumed_run_is_the_uninterrupted_one_bit_for_bit(compose_cfg, tmp_path):
    settings = [*LDP, "client.persist_optimizer=true", "optimizer.momentum=0.9"]
    full = build_algo(compose_cfg, tmp_path / "full", *settings)
    full.fit()
    again = build_algo(compose_cfg, tmp_path / "again", *settings)
    again.fit()
    assert metrics_without_times(again) == metrics_without_times(full)
    cut = resume(interrupted(compose_cfg, tmp_path / "cut", settings, stop_round=2))
    assert cut.local_dp.steps != full.local_dp.steps  # two rounds' counts, from the checkpoint
    cut.fit()
    assert metrics_without_times(cut) == metrics_without_times(full) and cut.local_dp.steps == full.local_dp.steps
    for run in (again, cut):
        assert all(torch.equal(run.server.global_state[k], v) for k, v in full.server.global_state.items())


@pytest.mark.parametrize("algo", ["fedprox", "scaffold", "feddyn", "centralized"])
def test_algorithms_with_penalties_and_centralized_train_under_local_dp(algo, compose_cfg, tmp_path):
    run = build_algo(compose_cfg, tmp_path, *LDP, f"algo={algo}", "num_rounds=2")
    run.fit()
    assert all(math.isfinite(m["test_loss"]) and m["local_dp_epsilon"] > 0 for m in run.history)


def test_train_py_end_to_end(tmp_path):
    run_train(tmp_path, *LDP, "num_rounds=2")
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(rows) == 2 and 0 < rows[0]["local_dp_epsilon"] < rows[1]["local_dp_epsilon"]
    assert results["local_dp_epsilon"] == rows[1]["local_dp_epsilon"] and results["local_dp_clip_norm"] == 0.5


@pytest.mark.parametrize("overrides, named", [
    (["client.grad_clip=1.0"], "client.grad_clip"),
    (["client.amp=fp16"], "client.amp"),
    (["algo=fedseq"], "algo: FedSeq"),
    (["engine=vmap"], "engine"),
    (["algo=scaffold", "algo.client.option=I"], "algo.client.option"),
    (["local_dp.delta=0.5"], "local_dp.delta"),
    (["local_dp.noise_multiplier=0"], "local_dp.noise_multiplier"),
])
def test_settings_local_dp_cannot_keep_its_bound_with_are_refused(overrides, named, compose_cfg, tmp_path):
    with pytest.raises(ConfigError, match=named):
        build_algo(compose_cfg, tmp_path, *LDP, *overrides)


def test_a_model_with_batchnorm_is_refused():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    setup = TrainSetup(model=model, data=DeviceDataset(torch.zeros(2, 2), torch.zeros(2, dtype=torch.long), 2),
                       loss_fn=nn.CrossEntropyLoss(), optimizer=partial(torch.optim.SGD, lr=1.0), batch_size=2,
                       local_epochs=1, local_steps=None, seed=0)
    with pytest.raises(ConfigError, match="model: .*BatchNorm"):
        LocalDP(setup, [2], noise_multiplier=1.0, clip_norm=1.0, delta=1e-5, seed=0)


def test_local_dp_off_adds_nothing(compose_cfg, tmp_path):
    algo = build_algo(compose_cfg, tmp_path, *SMALL)
    assert algo.local_dp is None and algo.setup.local_dp is None and not any(isinstance(h, LocalDP) for h in algo.hooks)
    assert not any(hasattr(p, "grad_sample") for p in algo.setup.params)

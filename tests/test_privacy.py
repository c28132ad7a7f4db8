"""Central DP (src/privacy.py): the clip by hand, the server's noise scale and its fixed denominator,
epsilon against dp_accounting called directly, the target_epsilon refusal, one adaptive-clipping
step by hand, resume bit for bit, FedAvg and FedAdam receiving the noisy mean, refused settings."""
import json
import math
from types import SimpleNamespace

import dp_accounting
import pytest
import torch
from dp_accounting.rdp import RdpAccountant

from src.client.client import ClientUpdate
from src.errors import ConfigError
from src.privacy import CentralDP
from src.server import FedAvgServer
from src.server.fedopt import FedOptServer
from src.server.robust import Mean
from src.utils.seeding import DP_CLIP_NOISE, DP_NOISE, numpy_rng, torch_generator
from tests.inprocess import SMALL, build_algo, interrupted, metrics_without_times, resume

# SMALL draws 3 of 6 clients a round; DP needs uniform weights
DP = [*SMALL, "algo.server.weighting=uniform", "dp.enabled=true", "dp.noise_multiplier=1.0", "dp.clip_norm=0.5",
      "eval_every=1"]


def library_epsilon(population, per_round, z, rounds, delta):
    """dp_accounting itself: m of N without replacement, replace-one. Replacing one client moves the
    clipped sum by up to 2C, so the Gaussian's multiplier relative to that sensitivity is z / 2."""
    event = dp_accounting.SampledWithoutReplacementDpEvent(
        population, per_round, dp_accounting.GaussianDpEvent(z / 2))
    accountant = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    accountant.compose(event, rounds)
    return accountant.get_epsilon(delta)


def toy(g: dict, m: int, server=None, round_idx: int = 0, trainable=None, **settings):
    """A CentralDP installed on a uniform FedAvg server holding global model `g` (every entry trainable
    unless `trainable` names them)."""
    params = list(g) if trainable is None else trainable
    server = server or FedAvgServer(weighting="uniform")
    server.set_global_state(g)
    server.attach(params, 10)
    server.aggregator = Mean()
    algo = SimpleNamespace(server=server, setup=SimpleNamespace(param_names=params), round=round_idx, transforms=[])
    server.transforms = algo.transforms
    dp = CentralDP(**{"noise_multiplier": 1.0, "clip_norm": 1.0, "population": 10, "per_round": m, "seed": 0,
                      "delta": 1e-5, **settings})
    dp.install(algo)
    return dp, server


def sent(dp, state: dict, client_id: int = 0) -> ClientUpdate:
    update = ClientUpdate(state, 1, torch.zeros(()), 1, sender=client_id)
    return dp.client(update, client_id, None)


def run_round(dp, server, states: list[dict]) -> None:
    server.aggregate([sent(dp, s, i) for i, s in enumerate(states)])


def test_an_update_is_clipped_to_norm_c_over_all_parameters_and_one_within_it_is_sent_as_trained():
    dp, _ = toy({"a": torch.zeros(1), "b": torch.ones(1)}, m=2)
    clipped = sent(dp, {"a": torch.tensor([3.0]), "b": torch.tensor([5.0])})  # delta (3, 4): norm 5
    assert clipped.state["a"].item() == pytest.approx(0.6) and clipped.state["b"].item() == pytest.approx(1.8)
    within = {"a": torch.tensor([0.3]), "b": torch.tensor([1.4])}  # delta (0.3, 0.4): norm 0.5
    assert all(torch.equal(sent(dp, within, 1).state[k], within[k]) for k in within)
    assert [bool(b) for b in dp._unclipped.values()] == [False, True]


def test_the_servers_noise_has_std_z_c_over_m_and_the_sum_is_divided_by_m():
    g = {"w": torch.zeros(200_000)}
    dp, server = toy(g, m=4, noise_multiplier=2.0, clip_norm=0.5)
    run_round(dp, server, [g, g])  # two of the four drawn report unchanged models: the noise alone
    noise = server.global_state["w"].clone()
    assert noise.std().item() == pytest.approx(2.0 * 0.5 / 4, rel=0.01)  # 2e5 draws: the std's sd is 0.16 %
    assert abs(noise.mean().item()) < 3 * 0.25 / math.sqrt(2e5)
    expected = torch.randn(200_000, generator=torch_generator(torch.device("cpu"), 0, DP_NOISE, 0)) * 0.25
    assert torch.allclose(noise, expected)  # from the (seed, round) stream DP_NOISE
    # same round, so the same noise: the difference is the clipped deltas' sum over m = 4, not over the 2 sent
    dp, server = toy(g, m=4, noise_multiplier=2.0, clip_norm=0.5)
    run_round(dp, server, [{"w": torch.full((200_000,), 1e-3)}, {"w": torch.full((200_000,), 5.0)}])
    d1 = 1e-3  # norm 0.45: within C
    d2 = 0.5 / math.sqrt(200_000)  # clipped to norm 0.5
    assert torch.allclose(server.global_state["w"] - noise, torch.full((200_000,), (d1 + d2) / 4), atol=1e-6)
    other, server = toy(g, m=4, round_idx=1, noise_multiplier=2.0, clip_norm=0.5)
    run_round(other, server, [g, g])
    assert not torch.allclose(server.global_state["w"], noise)  # another round, other noise


def test_epsilon_is_dp_accountings_for_m_of_n_without_replacement(compose_cfg, tmp_path):
    dp = CentralDP(noise_multiplier=1.1, clip_norm=1.0, population=100, per_round=10, seed=0, delta=1e-5)
    assert dp.accountant.epsilon(25) == library_epsilon(100, 10, 1.1, 25, 1e-5)
    algo = build_algo(compose_cfg, tmp_path, *DP)
    results = algo.fit()
    eps = [m["dp_epsilon"] for m in algo.history]
    assert eps == [library_epsilon(6, 3, 1.0, r, 1e-5) for r in range(1, 5)] and eps == sorted(eps)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["dp_epsilon"] == results["dp_epsilon"] == eps[-1] and saved["dp_delta"] == 1e-5


def test_target_epsilon_refuses_a_run_that_would_spend_more_naming_the_rounds_that_fit(compose_cfg, tmp_path):
    eps = [library_epsilon(6, 3, 1.0, r, 1e-5) for r in range(1, 5)]
    target = (eps[1] + eps[2]) / 2  # two rounds fit, three do not
    with pytest.raises(ConfigError, match="2 rounds fit: set num_rounds=2"):
        build_algo(compose_cfg, tmp_path, *DP, f"dp.target_epsilon={target}")
    assert not (tmp_path / "metrics.jsonl").exists()  # refused before anything is written
    with pytest.raises(ConfigError, match="not even one round fits"):
        build_algo(compose_cfg, tmp_path, *DP, f"dp.target_epsilon={eps[0] / 2}")
    build_algo(compose_cfg, tmp_path, *DP, "num_rounds=2", f"dp.target_epsilon={target}")  # fits


def test_adaptive_clipping_one_round_by_hand():
    """C = 1, m = 4, gamma = 0.5, eta_C = 0.2, sigma_b = 2, z = 1: norms 0.5, 2, 3 and 0.1, so 2 are
    unclipped; b_bar = (2 + N(0, 4)) / 4, C <- exp(-0.2 (b_bar - 0.5)); the updates' noise multiplier
    z_Delta = (1 - 1 / 16)^-1/2."""
    g = {"w": torch.zeros(1)}
    dp, server = toy(g, m=4, adaptive=True, target_quantile=0.5, clip_lr=0.2, clip_count_stddev=2.0)
    run_round(dp, server, [{"w": torch.tensor([n])} for n in (0.5, 2.0, -3.0, 0.1)])
    b_bar = (2 + numpy_rng(0, DP_CLIP_NOISE, 0).normal(0.0, 2.0)) / 4
    assert dp.clip_norm == pytest.approx(math.exp(-0.2 * (b_bar - 0.5)))
    metrics = dp.round_metrics()
    assert metrics["dp_unclipped_estimate"] == pytest.approx(b_bar) and metrics["dp_clipped_fraction"] == 0.5
    assert metrics["dp_clip_norm"] == 1.0  # the C this round clipped with
    assert metrics["dp_noise_std"] == pytest.approx((1 - 1 / 16) ** -0.5 / 4)
    assert dp.state_dict() == {"clip_norm": dp.clip_norm}


def test_a_resumed_run_is_the_uninterrupted_one_bit_for_bit(compose_cfg, tmp_path):
    settings = [*DP, "dp.adaptive=true", "dp.clip_count_stddev=1.0"]  # C changes every round: state
    full = build_algo(compose_cfg, tmp_path / "full", *settings)
    full.fit()
    assert len({m["dp_clip_norm"] for m in full.history}) == 4
    again = resume(interrupted(compose_cfg, tmp_path / "cut", settings, stop_round=2))
    again.fit()
    assert metrics_without_times(again) == metrics_without_times(full)
    assert all(torch.equal(again.server.global_state[k], v) for k, v in full.server.global_state.items())


@pytest.mark.parametrize("server", [FedAvgServer(weighting="uniform"),
                                    FedOptServer("adam", lr=0.1, weighting="uniform")], ids=["fedavg", "fedadam"])
def test_the_server_receives_the_noisy_mean(server):
    g = {"w": torch.tensor([1.0, 2.0, 3.0])}
    received = []
    update = server.server_update
    server.server_update = lambda mean, sums: (received.append(mean["w"].clone()), update(mean, sums))
    dp, server = toy(g, m=3, server=server, noise_multiplier=0.5, clip_norm=1.0)
    run_round(dp, server, [{"w": torch.tensor([1.0, 2.0, 7.0])}, {"w": torch.tensor([1.5, 2.0, 3.0])}])
    noise = torch.randn(3, generator=torch_generator(torch.device("cpu"), 0, DP_NOISE, 0)) * 0.5 / 3
    clipped = torch.tensor([0.0, 0.0, 1.0]) + torch.tensor([0.5, 0.0, 0.0])
    assert torch.allclose(received[0], g["w"] + clipped / 3 + noise)
    if isinstance(server, FedOptServer):  # Adam's first step from the noisy pseudo-gradient
        delta = clipped / 3 + noise
        m, v = 0.1 * delta, 0.99 * 1e-6 + 0.01 * delta ** 2
        assert torch.allclose(server.global_state["w"], g["w"] + 0.1 * m / (v.sqrt() + 1e-3))
    else:
        assert torch.equal(server.global_state["w"], received[0])


def test_a_fedadam_run_under_dp(compose_cfg, tmp_path):  # FedAvg's: the epsilon test
    run = build_algo(compose_cfg, tmp_path, *DP, "algo=fedadam")
    results = run.fit()
    assert results["dp_epsilon"] == library_epsilon(6, 3, 1.0, 4, 1e-5)
    assert all(math.isfinite(m["test_loss"]) and 0 <= m["dp_clipped_fraction"] <= 1 for m in run.history)


@pytest.mark.parametrize("overrides, named", [
    (["algo.server.weighting=samples"], "algo.server.weighting"),
    (["aggregator=median"], "aggregator"),
    (["algo=fedseq"], "dp.enabled"),
    (["algo=scaffold"], "dp.enabled"),
    (["dp.adaptive=true"], "dp.clip_count_stddev"),  # m / 20 = 0.15: 2 sigma_b <= z
    (["dp.delta=0.2"], "dp.delta"),
    (["dp.noise_multiplier=0"], "dp.noise_multiplier"),
])
def test_settings_dp_cannot_keep_its_bound_with_are_refused(overrides, named, compose_cfg, tmp_path):
    with pytest.raises(ConfigError, match=named):
        build_algo(compose_cfg, tmp_path, *DP, *overrides)


def test_a_model_with_floating_point_buffers_is_refused():
    with pytest.raises(ConfigError, match="running_mean"):
        toy({"w": torch.zeros(1), "bn.running_mean": torch.zeros(1)}, m=2, trainable=["w"])


def test_dp_off_adds_nothing(compose_cfg, tmp_path):
    algo = build_algo(compose_cfg, tmp_path, *SMALL)
    assert algo.dp is None and algo.transforms == [] and type(algo.server.aggregator) is Mean

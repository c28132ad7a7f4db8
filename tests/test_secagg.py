"""Secure aggregation (src/secagg.py): Shamir by hand, masks that cancel, masked vectors that say
nothing of their update, the unmasked sum within the quantization bound, dropouts up to n - t,
aborted rounds, and in-process runs (equal to plain FairAvg within the bound; resume bit for bit)."""
import logging
from types import SimpleNamespace

import pytest
import torch

from src.client.client import ClientUpdate
from src.errors import ConfigError
from src.secagg import MASK, SecureAggregation, dequantize, quantize, reconstruct, secure_sum, share
from tests.inprocess import SMALL, build_algo, interrupted, metrics_without_times, resume

SECAGG = [*SMALL, "algo=fairavg", "secagg.enabled=true"]


def residues(n, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {u: torch.randint(0, 1 << 32, (d,), generator=gen, dtype=torch.int64) for u in range(n)}


def test_shamir_two_of_three_by_hand():
    """f(x) = 7 + 3x mod 11: shares f(1) = 10, f(2) = 13 = 2, f(3) = 16 = 5. From x = 1 and 3,
    Lagrange at 0: 10 * 3/2 - 5 * 1/2 = (2^-1 = 6 mod 11) 10*3*6 - 5*6 = 180 - 30 = 4 + 3 = 7."""
    shares = share(7, 2, [1, 2, 3], [3], prime=11)
    assert shares == {1: 10, 2: 2, 3: 5}
    for pair in ([1, 2], [1, 3], [2, 3]):
        assert reconstruct({x: shares[x] for x in pair}, prime=11) == 7


def test_shamir_needs_t_shares_of_a_large_secret():
    secret, coefficients = 2**126 + 12345, [2**100 + 1, 987654321]
    shares = share(secret, 3, [1, 2, 3, 4, 5], coefficients)
    assert reconstruct({x: shares[x] for x in (5, 2, 4)}) == secret
    assert reconstruct({x: shares[x] for x in (1, 3)}) != secret  # t - 1 shares give another value


def test_masks_cancel_exactly_for_three_clients():
    inputs = residues(3, 1000)
    outcome = secure_sum(inputs, seed=0, round_idx=0, t=2)
    assert torch.equal(outcome.total, sum(inputs.values()) & MASK)
    for u, y in outcome.received.items():
        assert not torch.equal(y, inputs[u])  # the server holds masked vectors only


def test_each_masked_vector_is_independent_of_its_update():
    d = 100_000
    x = torch.randn(4, d, generator=torch.Generator().manual_seed(1)) * 0.05
    q, _ = quantize(x, 8.0, 16)
    outcome = secure_sum(dict(enumerate(q)), seed=3, round_idx=5, t=3)
    for u, y in outcome.received.items():
        corr = torch.corrcoef(torch.stack([y.double(), x[u].double()]))[0, 1]
        assert abs(corr) < 0.02  # 5 standard deviations (1 / sqrt(d) = 0.003)
        assert abs(y.double().mean() / 2**32 - 0.5) < 0.01  # uniform on Z_(2^32)
        assert abs(torch.corrcoef(torch.stack([dequantize(q[u], 16), x[u].double()]))[0, 1] - 1) < 1e-6


def test_unmasked_sum_is_the_plain_sum_within_the_quantization_bound():
    n, bits = 5, 16
    x = torch.randn(n, 2000, generator=torch.Generator().manual_seed(2)).double()
    q, clipped = quantize(x, 8.0, bits)
    assert clipped == 0
    outcome = secure_sum(dict(enumerate(q)), seed=0, round_idx=1, t=3)
    error = (dequantize(outcome.total, bits) - x.sum(0)).abs().max()
    assert 0 < error <= n * 2 ** -(bits + 1)


@pytest.mark.parametrize("lost_upload, lost_unmask", [({1, 4}, set()), (set(), {0, 2}), ({1}, {3}), ({4}, {0})])
def test_the_round_survives_up_to_n_minus_t_dropouts(lost_upload, lost_unmask):
    inputs = residues(5, 500, seed=4)
    outcome = secure_sum(inputs, 0, 2, 3, frozenset(lost_upload), frozenset(lost_unmask))
    arrived = [u for u in inputs if u not in lost_upload]
    assert sorted(outcome.received) == arrived and outcome.lost_unmask == sorted(lost_unmask)
    assert torch.equal(outcome.total, sum(inputs[u] for u in arrived) & MASK)


@pytest.mark.parametrize("lost_upload, lost_unmask", [({0, 1, 2}, set()), ({0}, {1, 2}), (set(), {2, 3, 4})])
def test_fewer_than_t_survivors_abort(lost_upload, lost_unmask):
    outcome = secure_sum(residues(5, 10), 0, 0, 3, frozenset(lost_upload), frozenset(lost_unmask))
    assert outcome.total is None and "fewer than" in outcome.reason and "t=3" in outcome.reason


def test_the_server_averages_the_clients_whose_input_arrived():
    """Clients 0, 1, 2 send w = [1, 2, 3], [10, 10, 10], [3, 0, -1] from G = 0; 1 drops after
    masking: the mean of 0 and 2 is [2, 1, 1] (exact on the 2^-16 grid). Client 1's 10s were clipped to 8."""
    agg = SecureAggregation(seed=0, threshold=2, scale_bits=16, clip=8.0, dropout_upload=0.0, dropout_unmask=0.0)
    agg.server, agg.round, agg.num_clients = SimpleNamespace(global_state={"w": torch.zeros(3)}), lambda: 0, 3
    agg.lost = lambda phase, r, ids: frozenset({1}) if phase == 0 else frozenset()
    sent = [[1.0, 2.0, 3.0], [10.0, 10.0, 10.0], [3.0, 0.0, -1.0]]
    updates = [ClientUpdate({"w": torch.tensor(w)}, 1, torch.zeros(()), 1, sender=i) for i, w in enumerate(sent)]
    (out,) = agg.aggregate(updates)
    assert torch.equal(out.state["w"], torch.tensor([2.0, 1.0, 1.0]))
    assert agg.stats == {"secagg_clients": 3, "secagg_threshold": 2, "secagg_lost_upload": 1, "secagg_lost_unmask": 0,
                         "secagg_clipped": 3, "secagg_aborted": 0}


def test_a_run_with_secagg_is_plain_fairavg_within_the_quantization_error(compose_cfg, tmp_path):
    runs = {}
    for name, settings in {"plain": [*SMALL, "algo=fairavg"], "secagg": SECAGG}.items():
        runs[name] = build_algo(compose_cfg, tmp_path / name, *settings)
        runs[name].fit()
    plain, masked = runs["plain"].server.global_state, runs["secagg"].server.global_state
    gap = max((plain[k] - masked[k]).abs().max().item() for k in plain)
    assert 0 < gap < 1e-4  # 4 rounds of at most 2^-17 each, through training
    m = runs["secagg"].history[-1]
    assert m["secagg_clients"] == 3 and m["secagg_threshold"] == 2 and m["secagg_aborted"] == 0


def test_fewer_than_t_survivors_abort_the_round_cleanly(compose_cfg, tmp_path, caplog):
    algo = build_algo(compose_cfg, tmp_path, *SECAGG, "secagg.threshold=3", "secagg.dropout_upload=0.9")
    start = {k: v.clone() for k, v in algo.server.global_state.items()}
    with caplog.at_level(logging.WARNING, logger="src.secagg"):
        algo.fit()
    assert [m["secagg_aborted"] for m in algo.history] == [1, 1, 1, 1]
    assert all(torch.equal(start[k], algo.server.global_state[k]) for k in start)
    assert "secure aggregation aborted" in caplog.text


def test_secagg_run_with_dropouts_resumes_bit_for_bit(compose_cfg, tmp_path):
    settings = [*SECAGG, "clients.total=10", "secagg.dropout_upload=0.2", "secagg.dropout_unmask=0.2"]
    straight = build_algo(compose_cfg, tmp_path / "straight", *settings)
    straight.fit()
    assert sum(m["secagg_lost_upload"] + m["secagg_lost_unmask"] for m in straight.history) > 0
    resumed = resume(interrupted(compose_cfg, tmp_path / "cut", settings, 2))
    resumed.fit()
    assert metrics_without_times(resumed) == metrics_without_times(straight)
    assert all(torch.equal(v, straight.server.global_state[k]) for k, v in resumed.server.global_state.items())


@pytest.mark.parametrize("overrides, message", [
    (["algo=fedavg"], "weighting='samples'"),
    (["algo=fairavg", "secagg.threshold=4"], "secagg.threshold: t=4"),
    (["algo=fairavg", "secagg.scale_bits=30"], "secagg.clip / secagg.scale_bits"),
    (["algo=fairavg", "aggregator=median"], "needs more than the sum"),
])
def test_settings_secure_aggregation_cannot_serve_are_refused(overrides, message, compose_cfg, tmp_path):
    with pytest.raises(ConfigError, match=message):
        build_algo(compose_cfg, tmp_path, *SMALL, "secagg.enabled=true", *overrides)


@pytest.mark.parametrize("adaptive", [[], ["dp.adaptive=true", "dp.clip_count_stddev=1.0"]])
def test_secagg_composes_with_central_dp_noise_on_the_secure_sum(adaptive, compose_cfg, tmp_path):
    """DP's clip before masking, its noise on the unmasked sum: the same noise DP alone draws, so the
    round's model is DP alone's within the quantization (2^-17 per coordinate of the sum, over m),
    and the clipped count (summed securely) is the same, so is adaptive C's step."""
    dp = ["dp.enabled=true", "dp.noise_multiplier=1.0", "dp.clip_norm=0.5", "num_rounds=1", *adaptive]
    runs = {}
    for name, extra in {"dp": [], "both": ["secagg.enabled=true"]}.items():
        runs[name] = build_algo(compose_cfg, tmp_path / name, *SMALL, "algo=fairavg", *dp, *extra)
        runs[name].fit()
    alone, both = runs["dp"].server.global_state, runs["both"].server.global_state
    gap = max((alone[k] - both[k]).abs().max().item() for k in alone)
    assert 0 < gap < 3 * 2 ** -17 / 3 + 1e-6  # 3 updates each within 2^-17, divided by m = 3; float rounding
    assert runs["both"].dp.secure and not runs["dp"].dp.secure
    m_alone, m_both = runs["dp"].history[0], runs["both"].history[0]
    for key in ("dp_epsilon", "dp_clipped_fraction", "dp_noise_std", "dp_clip_norm"):
        assert m_both[key] == m_alone[key]
    assert runs["both"].dp.clip_norm == runs["dp"].dp.clip_norm
    assert m_both["secagg_aborted"] == 0 and m_both["secagg_clients"] == 3


def test_secagg_with_dp_divides_by_the_fixed_m_when_a_client_drops(compose_cfg, tmp_path):
    """Clients lost after masking still count in m (DP's fixed denominator): the sum of those that
    arrived, plus (negligible) noise, over m. Checked against the survivors' clipped updates."""
    settings = [*SMALL, "algo=fairavg", "dp.enabled=true", "dp.noise_multiplier=1e-9", "dp.clip_norm=0.5",
                "num_rounds=1", "secagg.enabled=true", "secagg.threshold=2", "clients.total=10"]
    algo = build_algo(compose_cfg, tmp_path, *settings, "secagg.dropout_upload=0.3")
    g = {k: v.clone() for k, v in algo.server.global_state.items()}
    seen = {}
    original = algo.secagg.aggregate
    algo.server.intercept = lambda updates: (seen.update({u.sender: u for u in updates}), original(updates))[1]
    algo.fit()
    m = algo.history[0]
    lost = algo.secagg.lost(0, 0, list(seen))
    assert m["secagg_lost_upload"] == len(lost) >= 1 and m["secagg_aborted"] == 0
    arrived = [u for c, u in seen.items() if c not in lost]
    for k in algo.setup.param_names:
        expected = g[k] + sum(u.state[k] - g[k] for u in arrived) / len(seen)
        assert torch.allclose(algo.server.global_state[k], expected, atol=1e-5)

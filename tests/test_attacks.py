"""Simulated attackers (src/attacks.py): each kind's update by hand on toy clients, the seeded fixed
malicious set, the per-round counts, and every kind end to end and through an interrupted run."""
import logging
import math
from statistics import NormalDist
from types import SimpleNamespace

import pytest
import torch

from src.attacks import ALIE, AttackMetrics, Gaussian, LabelFlip, ModelReplacement, NoAttack, Scaled, alie_z
from src.client.client import ClientUpdate
from src.config import validate
from src.errors import ConfigError
from src.server import FedAvgServer
from src.utils.seeding import CLIENT_DATA, torch_generator
from tests.inprocess import SMALL, build_algo, interrupted, metrics_without_times, resume
from tests.test_golden import model_hash

G = {"w": torch.tensor([1.0, 2.0]), "count": torch.tensor(7)}  # a parameter and an integer buffer


def toy_algo(num_clients=5, per_round=4, server=None, seed=0):
    """What Attack.install reads of a FedBase."""
    server = server or FedAvgServer("uniform")
    server.set_global_state(G)
    server.attach(["w"], num_clients)
    return SimpleNamespace(cfg=SimpleNamespace(seed=seed), clients=list(range(num_clients)),
                           server=server, setup=SimpleNamespace(param_names=["w"]), round=3, hooks=[],
                           transforms=[], spec=SimpleNamespace(num_classes=10),
                           draw=lambda round_idx, population: list(range(per_round)))


def armed(attack, malicious=(0,), **kw):
    """`attack` installed on a toy federation, with the given clients malicious."""
    algo = toy_algo(**kw)
    attack.install(algo)
    attack.malicious = frozenset(malicious)
    return attack, algo


def update(w, sender, n=1, count=3):
    return ClientUpdate({"w": torch.tensor(w), "count": torch.tensor(count)}, n, torch.zeros(()), n, sender=sender)


# ---- the malicious set --------------------------------------------------------------------------
def test_malicious_set_is_seeded_and_fixed():
    a = Scaled(0.3, 1.0).draw(seed=4, num_clients=20)
    assert len(a) == 6 and a <= set(range(20))
    assert a == Scaled(0.3, 1.0).draw(seed=4, num_clients=20) == LabelFlip(0.3).draw(seed=4, num_clients=20)
    assert a != Scaled(0.3, 1.0).draw(seed=5, num_clients=20)
    assert Scaled(0.0, 1.0).draw(seed=4, num_clients=20) == frozenset()


def test_no_malicious_client_is_warned_about(caplog):
    with caplog.at_level(logging.WARNING):
        attack, _ = armed(Scaled(0.05, 1.0), malicious=(), num_clients=5)  # round(0.25) = 0
    assert "rounds to no malicious client" in caplog.text


# ---- each kind by hand ----------------------------------------------------------------------------
@pytest.mark.parametrize("scale, expected", [(1.0, [0.0, 4.0]), (3.0, [-2.0, 8.0])])
def test_scaled_sends_global_minus_lambda_delta(scale, expected):
    attack, algo = armed(Scaled(0.2, scale))
    assert algo.transforms == [attack]
    honest = update([2.0, 0.0], sender=1)
    assert attack.client(honest, 1, None) is honest
    sent = attack.client(update([2.0, 0.0], sender=0), 0, None)  # Delta = [1, -2]: G - lambda Delta
    assert sent.state["w"].tolist() == expected
    assert sent.state["count"].item() == 3  # buffers as trained


def test_gaussian_sends_global_plus_seeded_noise():
    attack, _ = armed(Gaussian(0.2, sigma=0.5))
    attack.center.set_global_state({"w": torch.full((20000,), 2.0), "count": torch.tensor(7)})
    big = ClientUpdate({"w": torch.zeros(20000), "count": torch.tensor(1)}, 1, torch.zeros(()), 1, sender=0)
    noise = attack.client(big, 0, None).state["w"] - 2.0
    assert abs(noise.mean().item()) < 0.02 and noise.std().item() == pytest.approx(0.5, rel=0.03)
    assert torch.equal(attack.client(big, 0, None).state["w"] - 2.0, noise)  # a function of (seed, round, client)
    attack.round = lambda: 4
    assert not torch.equal(attack.client(big, 0, None).state["w"] - 2.0, noise)  # another round, other noise
    assert attack.client(big, 1, None) is big


@pytest.mark.parametrize("server_lr, gamma", [(None, 4.0), (0.5, 8.0)])
def test_model_replacement_boost_is_n_over_eta(server_lr, gamma):
    server = FedAvgServer("uniform")
    if server_lr is not None:
        server.lr = server_lr  # what a server with a global learning rate (FedOpt's) exposes
    attack, _ = armed(ModelReplacement(0.2), server=server, per_round=4)
    assert attack.factor == gamma
    sent = attack.client(update([2.0, 0.0], sender=0), 0, None)  # G + gamma [1, -2]
    assert sent.state["w"].tolist() == [1.0 + gamma, 2.0 - 2 * gamma]


def test_model_replacement_replaces_the_fedavg_model():
    """Bagdasaryan et al.'s point: with n clients, FedAvg's mean of n - 1 updates near G and one
    boosted by n is the attacker's model."""
    attack, algo = armed(ModelReplacement(0.2), per_round=4)
    target = [5.0, -1.0]
    boosted = attack.client(update(target, sender=0), 0, None)
    algo.server.aggregate(iter([boosted] + [update(G["w"].tolist(), sender=i) for i in (1, 2, 3)]))
    assert algo.server.global_state["w"].tolist() == target


def test_alie_z_is_the_papers_z_max():
    # s = floor(n/2 + 1) - f, z = Phi^-1((n - s) / n)
    assert alie_z(5, 2) == NormalDist().inv_cdf(4 / 5)    # s = 3 - 2 = 1
    assert alie_z(10, 2) == NormalDist().inv_cdf(6 / 10)  # s = 6 - 2 = 4
    assert alie_z(10, 1) == 0.0                           # s = 5: the mean
    assert alie_z(10, 7) == NormalDist().inv_cdf(9 / 10)  # s = -1: at least 1


def test_alie_sends_mean_minus_z_std_of_the_honest_updates():
    attack, algo = armed(ALIE(0.4), malicious=(3, 4))
    assert algo.server.intercept == attack.collude
    updates = [update([1.0, 0.0], 0), update([2.0, 0.0], 1), update([6.0, 3.0], 2),
               update([100.0, 100.0], 3), update([-50.0, 9.0], 4)]
    sent = attack.collude(updates)
    # honest w[0]: 1, 2, 6 -> mean 3, sample std sqrt((4 + 1 + 9) / 2); w[1]: 0, 0, 3 -> 1, sqrt(3)
    z = NormalDist().inv_cdf(0.8)  # n = 5, f = 2: s = 1
    crafted = [3 - z * math.sqrt(7), 1 - z * math.sqrt(3)]
    assert sent[:3] == updates[:3]
    for u in sent[3:]:
        assert u.state["w"].tolist() == pytest.approx(crafted, abs=1e-6)
        assert u.state["count"].item() == 3
    # through the server: the mean of the three honest and two crafted updates
    algo.server.aggregate(iter(updates))
    expected = [(9 + 2 * crafted[0]) / 5, (3 + 2 * crafted[1]) / 5]
    assert algo.server.global_state["w"].tolist() == pytest.approx(expected, abs=1e-6)


def test_alie_with_a_given_z_and_too_few_honest_updates(caplog):
    attack, _ = armed(ALIE(0.4, z=1.0), malicious=(2,))
    sent = attack.collude([update([1.0, 0.0], 0), update([3.0, 2.0], 1), update([9.0, 9.0], 2)])
    assert sent[2].state["w"].tolist() == pytest.approx([2 - math.sqrt(2), 1 - math.sqrt(2)])
    lone = [update([1.0, 0.0], 0), update([9.0, 9.0], 2)]
    with caplog.at_level(logging.WARNING):
        assert attack.collude(lone) == lone
    assert "alie needs 2 honest updates" in caplog.text


def test_label_flip_changes_only_the_malicious_clients_labels(compose_cfg, tmp_path):
    algo = build_algo(compose_cfg, tmp_path / "run", *SMALL, "clients.total=10", "attack=label_flip",
                      "attack.fraction=0.3")
    bad = algo.attack.malicious
    assert len(bad) == 3
    assert [c.client_id for c in algo.clients if c.label_map is not None] == sorted(bad)
    seen = []
    loss_fn = algo.setup.loss_fn
    algo.setup.loss_fn = lambda out, y: seen.append(y.clone()) or loss_fn(out, y)
    s, num_classes = algo.setup, algo.spec.num_classes
    for client in algo.clients[:5] + [algo.clients[min(bad)]]:
        seen.clear()
        client.receive_data(algo.server.send_data())
        client.client_update(0)
        gen = torch_generator(client.indices.device, s.seed, CLIENT_DATA, 0, client.client_id)
        true = [y for _, y in s.data.batches(client.indices, s.batch_size, s.num_steps(client.num_samples), gen)]
        expected = [num_classes - 1 - y if client.client_id in bad else y for y in true]
        assert len(seen) == len(expected) and all(torch.equal(a, b) for a, b in zip(seen, expected))
        assert any(not torch.equal(a, b) for a, b in zip(seen, true)) == (client.client_id in bad)


# ---- per-round counts ---------------------------------------------------------------------------
def test_attack_metrics_count_the_attackers_selected_and_kept():
    server = SimpleNamespace(aggregator=SimpleNamespace(last_selected=None))
    hook = AttackMetrics(frozenset({1, 4}), server)
    hook.on_round_start()
    hook.trained(1)  # trained, then dropped as non-finite: selected, never accumulated
    for sender in (4, 0, 1, 2):
        hook.trained(sender)
        hook.on_update(update([0.0, 0.0], sender))
    metrics = {}
    hook.on_round_end(metrics)
    assert metrics == {"attackers_selected": 3}  # an aggregator that keeps all: nothing to count
    server.aggregator.last_selected = torch.tensor([0, 1, 3])  # positions in accumulation order
    hook.on_round_end(metrics)
    assert metrics == {"attackers_selected": 3, "attackers_kept": 1}


def test_attackers_selected_per_round(straight):
    algo = straight("sign_flip")
    bad = algo.attack.malicious
    expected = [len(bad & set(algo.draw(r, 10))) for r in range(algo.num_rounds)]
    assert [m["attackers_selected"] for m in algo.history] == expected
    assert sum(expected) > 0


# ---- settings -----------------------------------------------------------------------------------
def problems_of(compose_cfg, *overrides):
    with pytest.raises(ConfigError) as info:
        validate(compose_cfg(*SMALL, *overrides))
    return info.value.problems


@pytest.mark.parametrize("overrides, expected", [
    (["attack=sign_flip", "attack.fraction=1.0"], "attack.fraction: src.attacks.Scaled refuses fraction=1.0"),
    (["attack=label_flip", "attack.fraction=-0.1"], "attack.fraction: src.attacks.LabelFlip refuses"),
    (["attack=scaled", "attack.scale=0"], "attack.scale: src.attacks.Scaled refuses scale=0"),
    (["attack=gaussian", "attack.sigma=-1"], "attack.sigma: src.attacks.Gaussian refuses"),
    (["attack=model_replacement", "attack.boost=0"], "attack.boost: src.attacks.ModelReplacement refuses"),
    (["attack=alie", "attack.z=-1"], "attack.z: src.attacks.ALIE refuses"),
    (["attack=alie", "attack.fraction=0.5"], "attack: alie takes the std of a round's honest updates"),
    (["attack=sign_flip", "+attack.lam=2"], "attack.lam: unknown key"),
])
def test_bad_attack_settings_are_refused(compose_cfg, overrides, expected):
    assert any(p.startswith(expected) for p in problems_of(compose_cfg, *overrides)), expected


def test_attack_none_is_the_default(compose_cfg):
    cfg = compose_cfg()
    assert cfg.attack._target_ == "src.attacks.NoAttack"
    assert NoAttack().check(cfg) == []


# ---- end to end ---------------------------------------------------------------------------------
# 10 clients, 3 malicious, 5 per round: every kind's settings hold (alie: about 3 honest per round)
FEDERATION = [*SMALL, "clients.total=10"]


def attacked(kind):
    return [*FEDERATION, f"attack={kind}"] + (["attack.fraction=0.3"] if kind != "none" else [])
KINDS = ["label_flip", "sign_flip", "scaled", "gaussian", "model_replacement", "alie"]


@pytest.fixture(scope="module")
def runs():
    return {}


@pytest.fixture
def straight(runs, compose_cfg, tmp_path_factory):
    """straight(kind): the uninterrupted run under attack=kind (none: attack-free), trained once for the module."""
    def get(kind):
        if kind not in runs:
            runs[kind] = build_algo(compose_cfg, tmp_path_factory.mktemp(kind), *attacked(kind))
            runs[kind].fit()
        return runs[kind]
    return get


@pytest.mark.parametrize("kind", KINDS)
def test_each_attack_runs_and_changes_training(kind, straight):
    attacked = straight(kind)
    assert sum(m["attackers_selected"] for m in attacked.history) > 0
    assert model_hash(attacked.server.global_state) != model_hash(straight("none").server.global_state)


@pytest.mark.parametrize("kind", ["label_flip", "gaussian", "alie"])  # the data path, seeded noise, the server seam
def test_attacked_run_resumes_bit_for_bit(kind, straight, compose_cfg, tmp_path):
    resumed = resume(interrupted(compose_cfg, tmp_path / "cut", attacked(kind), 2))
    assert resumed.attack.malicious == straight(kind).attack.malicious
    resumed.fit()
    assert metrics_without_times(resumed) == metrics_without_times(straight(kind))
    assert model_hash(resumed.server.global_state) == model_hash(straight(kind).server.global_state)


def test_no_attackers_trains_as_attack_none(compose_cfg, tmp_path, straight):
    honest = straight("none")
    algo = build_algo(compose_cfg, tmp_path / "run", *FEDERATION, "attack=alie", "attack.fraction=0.01")
    algo.fit()
    assert [m.pop("attackers_selected") for m in algo.history] == [0] * algo.num_rounds
    assert metrics_without_times(algo) == metrics_without_times(honest)
    assert model_hash(algo.server.global_state) == model_hash(honest.server.global_state)


def test_attackers_kept_by_krum(compose_cfg, tmp_path):
    algo = build_algo(compose_cfg, tmp_path / "run", *attacked("scaled"), "aggregator=krum")
    algo.fit()
    assert all(0 <= m["attackers_kept"] <= min(m["attackers_selected"], 1) for m in algo.history)
    agg = algo.server.aggregator  # the last round's, from the aggregator's own record of the senders
    assert algo.history[-1]["attackers_kept"] == sum(agg.last_senders[p] in algo.attack.malicious
                                                     for p in agg.last_selected)

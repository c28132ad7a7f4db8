"""FedSeq through the algorithm object (src/algo/fedseq.py): the superclients it builds (constraints,
seeding, heterogeneity), sequential training against a hand computation, FedProx's anchor inside a
superclient, passes, resume bit for bit, and train.py end to end."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import run_train
from src.algo.fedseq import SUPERCLIENTS_FILE, FedSeq
from src.algo.fedseq_grouping import group_distributions, label_histogram, similarity_to_uniform
from src.errors import ConfigError
from src.losses import ProximalTerm
from src.utils.seeding import CLIENT_DATA, torch_generator
from tests.inprocess import build_algo, interrupted, metrics_without_times, resume

# 12 Synthetic devices of at most 80 samples, a small MLP, a short pre-training.
SMALL = ["algo=fedseq", "dataset=synthetic", "model=mlp", "model.hidden=[16]", "clients.total=12",
         "dataset.max_device_size=80", "algo.min_examples=100", "algo.pretrain_epochs=2", "clients.per_round=0.5",
         "optimizer.lr=0.05", "device=cpu"]
# Two clients, a linear model (MLP without hidden layers), one superclient holding both.
PAIR = ["dataset=synthetic", "model=mlp", "model.hidden=[]", "clients.total=2", "dataset.max_device_size=40",
        "algo.representation=label_histogram", "algo.min_examples=100000", "clients.per_round=1.0",
        "client.local_epochs=null", "client.local_steps=1", "client.batch_size=16", "optimizer.lr=0.1",
        "num_rounds=1", "device=cpu"]


def groups_of(algo):
    return [s.client_ids for s in algo.superclients]


def clone(state):
    return {k: v.detach().clone() for k, v in state.items()}


def capture_updates(algo):
    """Record (state, num_samples, samples_seen) of every update the server aggregates."""
    seen = []
    aggregate = algo.server.aggregate

    def recording(updates):
        def record(stream):
            for u in stream:
                seen.append((clone(u.state), u.num_samples, u.samples_seen))
                yield u
        aggregate(record(updates))
    algo.server.aggregate = recording
    return seen


# ---- the superclients ---------------------------------------------------------------------------
@pytest.mark.parametrize("settings", [
    ["algo.grouping=greedy"],  # confidence representation, pre-trained
    ["algo.grouping=greedy", "algo.representation=label_histogram", "algo.measure=gini", "algo.max_clients=3"],
    ["algo.grouping=kmeans", "algo.representation=label_histogram", "algo.num_clusters=3"],
    ["algo.grouping=random"],
])
def test_superclients_satisfy_the_constraints(settings, compose_cfg, tmp_path):
    algo = build_algo(compose_cfg, tmp_path, *SMALL, *settings)
    groups = groups_of(algo)
    sizes = np.array([c.num_samples for c in algo.clients])
    assert sorted(k for g in groups for k in g) == list(range(12))  # every client in exactly one superclient
    max_clients = algo.max_clients
    assert all(len(g) <= max_clients for g in groups)
    # at least min_examples samples, unless closed full at max_clients or the only superclient
    assert all(sizes[g].sum() >= 100 or len(g) == max_clients or len(groups) == 1 for g in groups)
    assert len(groups) > 1
    saved = json.loads((tmp_path / SUPERCLIENTS_FILE).read_text())
    assert [s["clients"] for s in saved["superclients"]] == groups
    assert [s["num_samples"] for s in saved["superclients"]] == [int(sizes[g].sum()) for g in groups]
    assert saved["num_superclients"] == len(groups)
    pretrained = "algo.grouping=random" not in settings and "algo.representation=label_histogram" not in settings
    assert (saved["pretrain_time_s"] is not None) == pretrained


def test_same_seed_same_superclients(compose_cfg, tmp_path):
    a = build_algo(compose_cfg, tmp_path / "a", *SMALL)
    b = build_algo(compose_cfg, tmp_path / "b", *SMALL)
    assert groups_of(a) == groups_of(b)  # pre-training included
    random = [groups_of(build_algo(compose_cfg, tmp_path / f"r{s}", *SMALL, "algo.grouping=random", f"seed={s}"))
              for s in (0, 0, 1)]
    assert random[0] == random[1] != random[2]


@pytest.mark.parametrize("representation", ["label_histogram", "confidence"])
def test_greedy_superclients_are_closer_to_uniform_than_random(representation, compose_cfg, tmp_path):
    """Single-class clients (partition alpha=0): 30 clients of ~33 noise images, 3 per class.
    With min_examples=300 a superclient holds about ten clients; greedy picks one of each class."""
    skewed = ["algo=fedseq", "dataset=random", "dataset.shape=[1,4,4]", "dataset.train_size=1000",
              "dataset.test_size=50", "model=mlp", "model.hidden=[8]", "partition.alpha=0", "clients.total=30",
              "algo.min_examples=300", f"algo.representation={representation}", "algo.pretrain_lr=0.5",
              "device=cpu"]
    kl = {}
    for grouping in ("greedy", "random"):
        algo = build_algo(compose_cfg, tmp_path / grouping, *skewed, f"algo.grouping={grouping}")
        labels = algo.data.train.y.numpy()
        truth = label_histogram(labels, [c.indices.numpy() for c in algo.clients], 10)
        sizes = np.array([c.num_samples for c in algo.clients])
        kl[grouping] = 1.0 - similarity_to_uniform(group_distributions(truth, sizes, groups_of(algo)), "kl")
    assert kl["greedy"].mean() < 0.5 * kl["random"].mean()
    if representation == "label_histogram":
        assert kl["greedy"].max() < 0.01  # one client of every class in every superclient


def test_bad_settings_are_reported_together(compose_cfg, tmp_path):
    cfg = compose_cfg(*SMALL)
    with pytest.raises(ConfigError) as e:
        FedSeq(cfg, tmp_path, cfg.algo.server, grouping="spectral", max_clients=0, superclient_passes=0,
               num_clusters=4, pretrain_lr=0.0)
    text = str(e.value)
    for key in ("grouping", "max_clients", "superclient_passes", "num_clusters", "pretrain_lr"):
        assert f"algo.{key}" in text
    # known only once the superclients exist; reported before a resume checkpoint could be written
    algo = build_algo(compose_cfg, tmp_path, *SMALL, "clients.num_per_round=12")
    with pytest.raises(ConfigError, match="clients.num_per_round"):
        algo.fit()
    assert not (tmp_path / "resume.pt").exists()


# ---- sequential training, by hand ---------------------------------------------------------------
def hand_sgd_step(state, x, y, lr, mu=0.0, anchor=None):
    """One SGD step of the linear model net.1 on cross-entropy (+ mu/2 ||w - anchor||^2)."""
    w = state["net.1.weight"].clone().requires_grad_(True)
    b = state["net.1.bias"].clone().requires_grad_(True)
    loss = F.cross_entropy(x @ w.T + b, y)
    if mu:
        loss = loss + 0.5 * mu * ((w - anchor["net.1.weight"]).pow(2).sum() + (b - anchor["net.1.bias"]).pow(2).sum())
    gw, gb = torch.autograd.grad(loss, [w, b])
    return {"net.1.weight": (w - lr * gw).detach(), "net.1.bias": (b - lr * gb).detach()}


def first_batch(algo, client, round_idx=0):
    gen = torch_generator(client.indices.device, algo.cfg.seed, CLIENT_DATA, round_idx, client.client_id)
    return next(algo.data.train.batches(client.indices, algo.setup.batch_size, 1, gen))


@pytest.mark.parametrize("algo_name, mu", [("fedseq", 0.0), ("fedseq_fedprox", 0.5)])
def test_superclient_trains_its_clients_in_sequence(algo_name, mu, compose_cfg, tmp_path):
    """One superclient of clients A and B, one SGD step each: its result is B's step from A's
    result (with FedProx: both anchored at the global model), not the FedAvg of the two steps."""
    algo = build_algo(compose_cfg, tmp_path, f"algo={algo_name}", *PAIR, f"algo.prox_mu={mu}")
    assert len(algo.superclients) == 1 and sorted(groups_of(algo)[0]) == [0, 1] and algo.prox_mu == mu
    start = clone(algo.server.global_state)
    first, second = algo.chain(algo.superclients[0], 0, 0)
    seen = capture_updates(algo)
    algo.fit()
    assert len(seen) == 1
    state, num_samples, samples_seen = seen[0]
    assert num_samples == first.num_samples + second.num_samples
    assert samples_seen == 32  # two clients, one batch of 16 each

    after_a = hand_sgd_step(start, *first_batch(algo, first), 0.1, mu, start)
    after_b = hand_sgd_step(after_a, *first_batch(algo, second), 0.1, mu, start)
    for k in after_b:
        torch.testing.assert_close(state[k], after_b[k], rtol=1e-5, atol=1e-7)

    alone_b = hand_sgd_step(start, *first_batch(algo, second), 0.1, mu, start)
    n_a, n_b = first.num_samples, second.num_samples
    fedavg = {k: (n_a * after_a[k] + n_b * alone_b[k]) / (n_a + n_b) for k in after_a}
    assert (state["net.1.weight"] - fedavg["net.1.weight"]).abs().max() > 1e-3
    if mu:  # anchored at A's result instead, B's step would differ
        chained_anchor = hand_sgd_step(after_a, *first_batch(algo, second), 0.1, mu, after_a)
        assert (state["net.1.weight"] - chained_anchor["net.1.weight"]).abs().max() > 1e-4


def test_fedprox_anchor_is_the_global_model_the_superclient_received(compose_cfg, tmp_path):
    algo = build_algo(compose_cfg, tmp_path, "algo=fedseq_fedprox", *PAIR, "client.local_steps=2", "num_rounds=2")
    anchors, starts = [], []

    class Recording(ProximalTerm):
        def forward(self, params, anchor):
            anchors.append([a.clone() for a in anchor])
            starts.append([p.detach().clone() for p in params])
            return super().forward(params, anchor)
    algo.setup.prox = Recording(algo.setup.prox.mu)
    globals_at_round = []
    aggregate = algo.server.aggregate

    def remembering(updates):
        globals_at_round.append(clone(algo.server.global_state))
        aggregate(updates)
    algo.server.aggregate = remembering
    algo.fit()
    assert len(anchors) == 2 * 2 * 2  # rounds x clients x local steps
    names = algo.setup.param_names
    for i, anchor in enumerate(anchors):
        expected = globals_at_round[i // 4]
        assert all(torch.equal(a, expected[n]) for a, n in zip(anchor, names))
    # the second client of each round starts from the first one's weights, not the global model
    for r in range(2):
        second_start = starts[4 * r + 2]
        assert not torch.equal(second_start[0], globals_at_round[r][names[0]])


def test_each_pass_shuffles_the_chain_and_draws_new_batches(compose_cfg, tmp_path):
    algo = build_algo(compose_cfg, tmp_path, "algo=fedseq", *PAIR, "algo.superclient_passes=3")
    calls = []
    data = algo.data.train
    batches = data.batches

    def recording(indices, batch_size, num_steps, gen, augment=True):
        for x, y in batches(indices, batch_size, num_steps, gen, augment):
            calls.append((int(indices[0]), x.clone()))
            yield x, y
    data.batches = recording
    seen = capture_updates(algo)
    algo.fit()
    assert seen[0][2] == 3 * 2 * 16  # passes x clients x batch
    owner = {int(c.indices[0]): c.client_id for c in algo.clients}
    trained = [owner[first_index] for first_index, _ in calls]
    orders = [[c.client_id for c in algo.chain(algo.superclients[0], 0, p)] for p in range(3)]
    assert trained == [k for order in orders for k in order]  # the chain order of every pass
    for k in (0, 1):  # three passes, three different batches
        xs = [x for first_index, x in calls if owner[first_index] == k]
        assert len(xs) == 3 and not torch.equal(xs[0], xs[1]) and not torch.equal(xs[1], xs[2])


@pytest.mark.parametrize("passes", [1, 2])
def test_feddyn_h_stays_the_mean_of_every_clients_gradient_state(passes, compose_cfg, tmp_path):
    """FedSeq + FedDyn: h = (1/m) sum_k g_k over all m clients, not superclients (g_k = 0 for a
    client never trained). With two passes only the last pass's change counts, as only its
    staged state is committed."""
    settings = [s for s in SMALL if s != "algo=fedseq"]
    algo = build_algo(compose_cfg, tmp_path, *settings, "algo=fedseq_feddyn", "num_rounds=3",
                      f"algo.superclient_passes={passes}")
    algo.fit()
    store, m = algo.setup.store, len(algo.clients)
    assert 1 < len(algo.superclients) < m and len(store.client_ids()) > len(algo.superclients)
    for name, h in algo.server.h.items():
        total = sum(store.get(i)["grad_state"][name] for i in store.client_ids())
        torch.testing.assert_close(h, total / m)


# ---- resume and train.py ------------------------------------------------------------------------
def test_resume_bit_for_bit(compose_cfg, tmp_path):
    settings = [*SMALL, "num_rounds=3", "eval_every=1", "algo.superclient_passes=2", "algo.prox_mu=0.01",
                "optimizer.momentum=0.9", "client.persist_optimizer=true"]
    straight = build_algo(compose_cfg, tmp_path / "straight", *settings)
    straight.fit()
    resumed = interrupted(compose_cfg, tmp_path / "cut", settings, 1)

    def no_pretraining():
        raise AssertionError("a resumed run takes its superclients from the checkpoint")
    resumed.confidence_representation = no_pretraining
    resume(resumed)
    assert resumed.round == 1 and groups_of(resumed) == groups_of(straight)
    resumed.fit()

    a, b = straight.server.global_state, resumed.server.global_state
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert metrics_without_times(straight) == metrics_without_times(resumed) and len(straight.history) == 3


def test_train_py_runs_fedseq(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(run_dir, *SMALL, "num_rounds=2")
    assert "superclients from 12 clients" in proc.stdout + proc.stderr
    results = json.loads((run_dir / "results.json").read_text())
    assert results["algo"] == "FedSeq" and results["rounds"] == 2 and results["num_superclients"] >= 2
    assert 0.0 <= results["final_test_accuracy"] <= 1.0 and results["pretrain_time_s"] > 0
    saved = json.loads((run_dir / SUPERCLIENTS_FILE).read_text())
    assert sorted(k for s in saved["superclients"] for k in s["clients"]) == list(range(12))

"""FedSeq client representations and superclient grouping (src/algo/fedseq_grouping.py): hand-worked
small cases, the min_examples / max_clients / leftover rules, uniformity of greedy and k-means groups
against random ones, seeding, and the batched pre-training of the confidence representation."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from src.algo.fedseq_grouping import (balanced_exemplars, confidence_vectors, cosine_dissimilarity,
                                      group_distributions, kmeans, label_histogram, make_superclients,
                                      pretrain_confidence, similarity_to_uniform)
from src.data.partition import client_sizes, single_class_shards

KL_TO_UNIFORM = lambda p: 1.0 - similarity_to_uniform(p, "kl")  # noqa: E731


def assert_partition(groups, num_clients):
    flat = [k for g in groups for k in g]
    assert sorted(flat) == list(range(num_clients))


# ---------------------------------------------------------------- representations, by hand

def test_label_histogram_by_hand():
    labels = np.array([0, 1, 1, 2, 2, 2])
    got = label_histogram(labels, [np.array([0, 1, 2]), np.array([3, 4, 5]), np.array([0, 3])], 3)
    np.testing.assert_allclose(got, [[1 / 3, 2 / 3, 0], [0, 0, 1], [0.5, 0, 0.5]])


def test_label_histogram_rejects_labels_beyond_num_classes():
    with pytest.raises(ValueError, match="num_classes"):
        label_histogram(np.array([0, 3]), [np.array([0, 1])], 3)


def test_confidence_vectors_by_hand():
    # exemplars of class 0, 0, 1, 1; per class sums [1.7, 0.3] and [0.4, 1.4], then normalised
    probs = torch.tensor([[0.9, 0.8, 0.1, 0.2], [0.1, 0.3, 0.6, 0.8]])
    got = confidence_vectors(probs, torch.tensor([0, 0, 1, 1]), 2)
    np.testing.assert_allclose(got, [[0.85, 0.15], [0.4 / 1.8, 1.4 / 1.8]], rtol=1e-6)
    # a class without exemplars gets 0; numpy input works too
    got3 = confidence_vectors(np.array([[0.5, 0.5]]), np.array([0, 2]), 3)
    np.testing.assert_allclose(got3, [[0.5, 0.0, 0.5]])


def test_balanced_exemplars():
    labels = np.array([0, 1, 2] * 5 + [1, 1])
    idx = balanced_exemplars(labels, 3, np.random.default_rng(0))
    assert len(set(idx.tolist())) == 9
    np.testing.assert_array_equal(labels[idx], [0, 0, 0, 1, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(idx, balanced_exemplars(labels, 3, np.random.default_rng(0)))
    with pytest.raises(ValueError, match="class 0"):
        balanced_exemplars(labels, 6, np.random.default_rng(0))


# ---------------------------------------------------------------- measures, by hand

@pytest.mark.parametrize("p, kl, gini", [
    ([0.5, 0.5], 1.0, 0.5),
    ([1.0, 0.0], 1 - math.log(2), 0.0),
    ([0.75, 0.25], 1 - (0.75 * math.log(1.5) + 0.25 * math.log(0.5)), 0.375),
    ([1 / 3, 1 / 3, 1 / 3], 1.0, 2 / 3),
])
def test_measures_by_hand(p, kl, gini):
    assert similarity_to_uniform(np.array(p), "kl") == pytest.approx(kl)
    assert similarity_to_uniform(np.array(p), "gini") == pytest.approx(gini)


def test_cosine_dissimilarity_by_hand():
    # 1 - cos: [1, 0] vs itself 0, vs [0, 1] 1, vs [0.6, 0.8] 1 - 0.6, vs 0 (orthogonal) 1
    got = cosine_dissimilarity(np.array([1.0, 0.0]), np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.0, 0.0]]))
    np.testing.assert_allclose(got, [0.0, 1.0, 0.4, 1.0])
    # the scale of the group vector does not matter (a weighted sum has the mean's direction)
    np.testing.assert_allclose(cosine_dissimilarity(np.array([3.0, 4.0]), np.array([0.6, 0.8])), 0.0, atol=1e-12)


def test_measures_batched_and_unknown():
    p = np.array([[0.5, 0.5], [1.0, 0.0]])
    np.testing.assert_allclose(similarity_to_uniform(p, "gini"), [0.5, 0.0])
    for unknown in ("l2", "cosine"):  # cosine compares a group with a candidate, not with uniform
        with pytest.raises(ValueError, match="unknown measure"):
            similarity_to_uniform(p, unknown)


def test_group_distribution_is_sample_weighted():
    rep = np.array([[1.0, 0.0], [0.0, 1.0]])
    np.testing.assert_allclose(group_distributions(rep, np.array([30, 10]), [[0, 1]]), [[0.75, 0.25]])


# ---------------------------------------------------------------- greedy, by hand

@pytest.mark.parametrize("measure", ["kl", "gini"])
def test_greedy_by_hand(measure):
    """min_examples=20. Alone, client 4 [0.6, 0.4] is the closest to uniform: it starts group 0.
    Weighted means with each candidate (client 4 holds 5 samples, the others 10):
      +0 -> [13/15, 2/15], +1 -> [0.8, 0.2], +2 -> [0.2, 0.8], +3 -> [1/3, 2/3]: add 3 (15 samples);
      +0 -> [0.6, 0.4], +1 -> [0.56, 0.44], +2 -> [0.2, 0.8]: add 1 (25 samples, closed).
    Clients 0 and 2 are equally far from uniform alone: the lower id starts group 1, then 2 joins."""
    rep = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.2, 0.8], [0.6, 0.4]])
    sizes = np.array([10, 10, 10, 10, 5])
    groups = make_superclients(rep, sizes, "greedy", measure, min_examples=20, max_clients=11)
    assert groups == [[4, 3, 1], [0, 2]]


def test_greedy_cosine_by_hand():
    """The clients of test_greedy_by_hand under the authors' cosine: next the client least like the
    group, d = 1 - cos(group mean, candidate); an empty group counts as uniform u, and
    1 - cos(u, p) = 1 - 1 / (sqrt(2) ||p||) is largest for the most skewed clients, 0 and 2
    (||p|| = 1; gini starts from the most uniform, 4). Group [0] (mean [1, 0]): d = 1 - p_0 / ||p||
    is 0.006 for 1, 1 for 2, 0.757 for 3, 0.168 for 4: add 2 (20 samples, closed). Then the
    most skewed left is 1 (||p|| = 0.906 against 0.825 for 3, 0.721 for 4); with group [1]:
    d(3) = 1 - 0.26 / (0.906 * 0.825) = 0.652, d(4) = 1 - 0.58 / (0.906 * 0.721) = 0.112: add 3
    (closed). Client 4 (5 samples) is left over and joins the lower-index group of the two with
    20 samples."""
    rep = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.2, 0.8], [0.6, 0.4]])
    sizes = np.array([10, 10, 10, 10, 5])
    cosine = make_superclients(rep, sizes, "greedy", "cosine", min_examples=20, max_clients=11)
    assert cosine == [[0, 2, 4], [1, 3]]
    assert cosine != make_superclients(rep, sizes, "greedy", "gini", min_examples=20, max_clients=11)


# ---------------------------------------------------------------- constraints and the leftover rule

def test_leftover_joins_the_group_with_fewest_samples():
    # identical representations: greedy ties always pick the lowest id, i.e. clients in id order
    rep = np.full((5, 2), 0.5)
    groups = make_superclients(rep, np.array([10, 25, 10, 10, 5]), "greedy", min_examples=20)
    # [0, 1] holds 35, [2, 3] holds 20; client 4 (5 samples < 20) goes to the smaller one
    assert groups == [[0, 1], [2, 3, 4]]


def test_leftover_without_room_raises():
    rep = np.full((5, 2), 0.5)
    with pytest.raises(ValueError, match="min_examples=20.*max_clients=2"):
        make_superclients(rep, np.full(5, 10), "greedy", min_examples=20, max_clients=2)


def test_too_little_data_gives_one_group_and_full_groups_may_fall_short():
    rep = np.full((22, 2), 0.5)
    assert make_superclients(rep[:3], np.full(3, 5), "greedy") == [[0, 1, 2]]  # 15 samples < 800 in all
    groups = make_superclients(rep, np.ones(22, dtype=int), "greedy", min_examples=800, max_clients=11)
    assert groups == [list(range(11)), list(range(11, 22))]  # closed at max_clients with 11 samples each


@pytest.mark.parametrize("method", ["random", "greedy", "kmeans"])
def test_constraints_on_a_larger_case(method):
    rng = np.random.default_rng(7)
    n = 203
    rep = rng.dirichlet(np.full(10, 0.3), size=n)
    sizes = rng.integers(100, 400, size=n)  # >= 100: 11 clients always reach 800, so every group must
    groups = make_superclients(rep, sizes, method, min_examples=800, max_clients=11, rng=np.random.default_rng(1))
    assert_partition(groups, n)
    assert all(len(g) <= 11 for g in groups)
    assert all(sizes[g].sum() >= 800 for g in groups)


def test_input_validation_lists_every_problem():
    with pytest.raises(ValueError, match="unknown method.*unknown measure.*max_clients"):
        make_superclients(np.full((3, 2), 0.5), np.ones(3), "spectral", "l2", max_clients=0)
    with pytest.raises(ValueError, match="needs rng"):
        make_superclients(np.full((3, 2), 0.5), np.ones(3), "random")


# ---------------------------------------------------------------- heterogeneity and seeding

@pytest.fixture(scope="module")
def one_class_per_client():
    """100 clients of 600 samples, client k holds only class k mod 10 (FedSeq's alpha = 0)."""
    labels = np.repeat(np.arange(10), 6000)
    rng = np.random.default_rng(0)
    clients = single_class_shards(labels, client_sizes(len(labels), 100, 0.0, rng), 10, rng)
    return label_histogram(labels, clients, 10), np.array([len(c) for c in clients])


def mean_kl(rep, sizes, groups):
    return float(np.mean(KL_TO_UNIFORM(group_distributions(rep, sizes, groups))))


@pytest.mark.parametrize("method, measure", [("greedy", "kl"), ("greedy", "gini"), ("greedy", "cosine"),
                                             ("kmeans", "kl")])
def test_informed_groups_are_closer_to_uniform_than_random(one_class_per_client, method, measure):
    rep, sizes = one_class_per_client
    kw = dict(min_examples=6000, max_clients=11)  # ten clients per superclient
    informed = make_superclients(rep, sizes, method, measure, rng=np.random.default_rng(0), **kw)
    random = make_superclients(rep, sizes, "random", rng=np.random.default_rng(0), **kw)
    assert_partition(informed, 100)
    assert mean_kl(rep, sizes, informed) < 1e-9 < mean_kl(rep, sizes, random)  # one client of each class


def test_greedy_beats_random_with_default_constraints(one_class_per_client):
    rep, sizes = one_class_per_client  # 600 samples a client: pairs under min_examples=800
    greedy = make_superclients(rep, sizes, "greedy")
    random = make_superclients(rep, sizes, "random", rng=np.random.default_rng(0))
    assert mean_kl(rep, sizes, greedy) < mean_kl(rep, sizes, random)


@pytest.mark.parametrize("method", ["random", "greedy", "kmeans"])
def test_same_seed_same_groups(one_class_per_client, method):
    rep, sizes = one_class_per_client
    a = make_superclients(rep, sizes, method, rng=np.random.default_rng(3))
    b = make_superclients(rep, sizes, method, rng=np.random.default_rng(3))
    assert a == b


def test_random_groups_change_with_the_seed(one_class_per_client):
    rep, sizes = one_class_per_client
    runs = [make_superclients(rep, sizes, "random", rng=np.random.default_rng(s)) for s in range(4)]
    assert all(r != runs[0] for r in runs[1:])


def test_kmeans_finds_separated_blobs():
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    truth = np.repeat(np.arange(3), 20)
    points = centres[truth] + rng.normal(0, 0.5, size=(60, 2))
    assign = kmeans(points, 3, np.random.default_rng(1))
    # same partition up to relabelling
    assert len({(t, a) for t, a in zip(truth, assign)}) == 3


# ---------------------------------------------------------------- pre-training (confidence)

def separable(per_class, num_classes=4, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(num_classes).repeat_interleave(per_class)
    x = 3.0 * nn.functional.one_hot(y, dim).float() + 0.3 * torch.randn(len(y), dim, generator=g)
    return x, y


def pretrain(generator, clients, x, y, ex):
    return pretrain_confidence(lambda: nn.Linear(8, 4), x, y, clients, x[ex], y[ex],
                               epochs=3, batch_size=8, lr=0.5, generator=generator)


@pytest.fixture(scope="module")
def single_class_clients():
    x, y = separable(per_class=100)
    ex = torch.from_numpy(balanced_exemplars(y.numpy(), 5, np.random.default_rng(0)))
    rest = torch.ones(len(y), dtype=torch.bool)
    rest[ex] = False
    # 8 clients of different sizes (20 ... 55); client k holds only class k mod 4
    clients = [torch.nonzero(rest & (y == k % 4)).flatten()[(k // 4) * 40:(k // 4) * 40 + 20 + 5 * k] for k in range(8)]
    return x, y, ex, clients


def test_pretrain_is_deterministic(single_class_clients):
    x, y, ex, clients = single_class_clients
    a = pretrain(torch.Generator().manual_seed(5), clients, x, y, ex)
    b = pretrain(torch.Generator().manual_seed(5), clients, x, y, ex)
    c = pretrain(torch.Generator().manual_seed(6), clients, x, y, ex)
    assert a.shape == (8, 20)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_confidence_of_a_single_class_client_peaks_at_its_class(single_class_clients):
    x, y, ex, clients = single_class_clients
    probs = pretrain(torch.Generator().manual_seed(0), clients, x, y, ex)
    conf = confidence_vectors(probs, y[ex], 4)
    np.testing.assert_allclose(conf.sum(1), 1.0)
    np.testing.assert_array_equal(conf.argmax(1), np.arange(8) % 4)


def test_batched_pretraining_matches_training_each_client_alone():
    """Reference: client k alone takes ceil(n_k / B) SGD steps per epoch, each on B samples drawn
    with replacement; the draws follow pretrain_confidence's documented order (one up-front
    torch.rand(steps, clients, B) after the init seed)."""
    x, y = separable(per_class=10)
    clients = [torch.arange(0, 5), torch.arange(5, 17), torch.arange(17, 37)]  # 2, 3 and 5 steps an epoch
    epochs, batch, lr = 2, 4, 0.3
    got = pretrain_confidence(lambda: nn.Linear(8, 4), x, y, clients, x, y, epochs, batch, lr,
                              torch.Generator().manual_seed(9))

    g = torch.Generator().manual_seed(9)
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=g))
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        init = nn.Linear(8, 4)
    per_epoch = 5
    u = torch.rand(epochs * per_epoch, 3, batch, generator=g)
    for k, idx in enumerate(clients):
        model = nn.Linear(8, 4)
        model.load_state_dict(init.state_dict())
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        for s in range(epochs * per_epoch):
            if s % per_epoch >= math.ceil(len(idx) / batch):
                continue
            b = idx[(u[s, k] * len(idx)).long()]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[b]), y[b]).backward()
            opt.step()
        with torch.no_grad():
            want = model(x).softmax(-1)[torch.arange(len(y)), y]
        torch.testing.assert_close(got[k], want, rtol=1e-5, atol=1e-6)

"""Client partitions (src/data/partition.py) on small synthetic label arrays: coverage, sizes,
label skew as a function of alpha, alpha=0 single-class shards, seeding, and the helpers."""
import numpy as np
import pytest

from src.data.partition import IID, Dirichlet, class_histogram, client_sizes

NUM_CLASSES = 10


def balanced_labels(per_class: int = 500, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Sorted labels, `per_class` samples of each class."""
    return np.repeat(np.arange(num_classes), per_class)


def skewed_labels(n: int = 1000, seed: int = 123) -> np.ndarray:
    """Unbalanced labels in [0, 10), every class present."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(NUM_CLASSES, size=n, p=np.linspace(1, 3, NUM_CLASSES) / np.linspace(1, 3, NUM_CLASSES).sum())
    labels[:NUM_CLASSES] = np.arange(NUM_CLASSES)
    return labels


def assert_exact_cover(clients: list[np.ndarray], n: int) -> None:
    """Every index of range(n) appears in exactly one client, once."""
    assert sum(len(c) for c in clients) == n
    allidx = np.concatenate(clients)
    assert np.issubdtype(allidx.dtype, np.integer)
    np.testing.assert_array_equal(np.sort(allidx), np.arange(n))


def fractions(labels, clients):
    h = class_histogram(labels, clients, NUM_CLASSES)
    return h / h.sum(axis=1, keepdims=True)


# ---------------------------------------------------------------- coverage and sizes

PARTITIONERS = [
    pytest.param(IID(), id="iid"),
    pytest.param(Dirichlet(0.05), id="dir0.05"),
    pytest.param(Dirichlet(0.5), id="dir0.5"),
    pytest.param(Dirichlet(1.0), id="dir1"),
    pytest.param(Dirichlet(100.0), id="dir100"),
    pytest.param(Dirichlet(0.0), id="dir0-shards"),
]


@pytest.mark.parametrize("part", PARTITIONERS)
@pytest.mark.parametrize("labels", [balanced_labels(100), skewed_labels(997)], ids=["balanced", "skewed"])
@pytest.mark.parametrize("num_clients", [10, 23])
def test_every_index_exactly_once(part, labels, num_clients):
    for seed in range(3):
        clients = part.split(labels, num_clients, NUM_CLASSES, np.random.default_rng(seed))
        assert len(clients) == num_clients
        assert_exact_cover(clients, len(labels))


@pytest.mark.parametrize("num_clients", [10, 23])
def test_equal_sizes_without_size_sigma(num_clients):
    labels = skewed_labels(997)
    for part in (IID(), Dirichlet(0.3), Dirichlet(50.0)):
        sizes = [len(c) for c in part.split(labels, num_clients, NUM_CLASSES, np.random.default_rng(0))]
        assert max(sizes) - min(sizes) <= 1, (part, sizes)


@pytest.mark.parametrize("part", [
    pytest.param(IID(size_sigma=1.0), id="iid"),
    pytest.param(Dirichlet(0.5, size_sigma=1.0), id="dir0.5"),
    pytest.param(Dirichlet(100.0, size_sigma=1.0), id="dir100"),
])
def test_unequal_sizes_with_size_sigma(part):
    labels = skewed_labels(2000)
    for seed in range(3):
        clients = part.split(labels, 20, NUM_CLASSES, np.random.default_rng(seed))
        assert_exact_cover(clients, len(labels))
        sizes = np.array([len(c) for c in clients])
        # The split draws the client sizes first, from the same generator: exactly those sizes.
        np.testing.assert_array_equal(sizes, client_sizes(len(labels), 20, 1.0, np.random.default_rng(seed)))
        assert sizes.min() >= 1
        assert sizes.max() >= 2 * sizes.min(), sizes  # lognormal(0, 1) sizes really differ
        assert len(np.unique(sizes)) > 10


def test_alpha0_with_size_sigma_still_covers():
    labels = balanced_labels(100)
    for seed in range(3):
        clients = Dirichlet(0.0, size_sigma=1.0).split(labels, 30, NUM_CLASSES, np.random.default_rng(seed))
        assert_exact_cover(clients, len(labels))
        sizes = np.array([len(c) for c in clients])
        assert sizes.max() > 2 * sizes.min()
        for c in clients:
            assert len(np.unique(labels[c])) <= 1


# ---------------------------------------------------------------- label skew

def skew_stats(alpha, seed, labels):
    f = fractions(labels, Dirichlet(alpha).split(labels, 20, NUM_CLASSES, np.random.default_rng(seed)))
    mean_max = f.max(axis=1).mean()  # mean over clients of the largest class fraction
    mean_tv = 0.5 * np.abs(f - 1 / NUM_CLASSES).sum(axis=1).mean()  # mean distance from uniform
    return mean_max, mean_tv


@pytest.mark.parametrize("seed", range(8))
def test_skew_follows_alpha(seed):
    # 5000 balanced samples, 20 clients of 250. Over 200 seeds: alpha=0.1 mean max fraction in
    # [0.77, 1.0], alpha=100 in [0.15, 0.19] and its distance from uniform in [0.13, 0.19].
    labels = balanced_labels(500)
    max_small, tv_small = skew_stats(0.1, seed, labels)
    max_big, tv_big = skew_stats(100.0, seed, labels)
    assert max_small > 0.6
    assert max_small > max_big + 0.3
    assert tv_small > tv_big + 0.3
    assert max_big < 0.25  # close to uniform (1/10), up to sampling noise of 250 draws
    assert tv_big < 0.25


def test_iid_is_close_to_uniform():
    labels = balanced_labels(500)
    for seed in range(4):
        f = fractions(labels, IID().split(labels, 20, NUM_CLASSES, np.random.default_rng(seed)))
        assert f.max(axis=1).mean() < 0.25
        assert np.abs(f - 0.1).max() < 0.15


# ---------------------------------------------------------------- alpha = 0

@pytest.mark.parametrize("num_clients", [10, 25, 40])
def test_alpha0_single_class_clients(num_clients):
    labels = skewed_labels(1000)
    for seed in range(3):
        clients = Dirichlet(0.0).split(labels, num_clients, NUM_CLASSES, np.random.default_rng(seed))
        for k, c in enumerate(clients):
            assert len(c) > 0
            # every label of client k is its class, k mod C (FedSeq's convention)
            np.testing.assert_array_equal(labels[c], np.full(len(c), k % NUM_CLASSES))


def test_alpha0_needs_a_client_per_class():
    labels = balanced_labels(20)
    with pytest.raises(ValueError, match="client"):
        Dirichlet(0.0).split(labels, NUM_CLASSES - 1, NUM_CLASSES, np.random.default_rng(0))
    # exactly one client per class is enough
    clients = Dirichlet(0.0).split(labels, NUM_CLASSES, NUM_CLASSES, np.random.default_rng(0))
    assert len(clients) == NUM_CLASSES


# ---------------------------------------------------------------- seeding

@pytest.mark.parametrize("part", PARTITIONERS + [pytest.param(Dirichlet(0.5, size_sigma=0.8), id="dir0.5-sigma")])
def test_same_seed_same_split_other_seed_other_split(part):
    labels = skewed_labels(500)

    def split(seed):
        return part.split(labels, 20, NUM_CLASSES, np.random.default_rng(seed))

    a, b, c = split(7), split(7), split(8)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert any(len(x) != len(z) or not np.array_equal(x, z) for x, z in zip(a, c))


# ---------------------------------------------------------------- helpers

def test_class_histogram_by_hand():
    labels = np.array([0, 1, 1, 2, 2, 2, 0])
    clients = [np.array([0, 1]), np.array([2, 3, 4, 5]), np.array([], dtype=np.int64), np.array([6, 3])]
    expected = np.array([
        [1, 1, 0, 0],
        [0, 1, 3, 0],  # labels 1, 2, 2, 2
        [0, 0, 0, 0],
        [1, 0, 1, 0],
    ])
    np.testing.assert_array_equal(class_histogram(labels, clients, 4), expected)


def test_client_sizes_equal_by_hand():
    rng = np.random.default_rng(0)
    # 10 = 3 * 1 + 7 spare; 7/3 = 2.33 each -> 1 + 2 = 3 each, remainder 1 goes to the first of
    # the (equal) largest fractional parts (stable order): client 0.
    np.testing.assert_array_equal(client_sizes(10, 3, 0.0, rng), [4, 3, 3])
    np.testing.assert_array_equal(client_sizes(12, 4, 0.0, rng), [3, 3, 3, 3])
    np.testing.assert_array_equal(client_sizes(11, 4, 0.0, rng), [3, 3, 3, 2])
    np.testing.assert_array_equal(client_sizes(5, 5, 0.0, rng), [1, 1, 1, 1, 1])


class FixedWeights:
    """Stands in for the generator: lognormal() returns fixed weights and records its call."""

    def __init__(self, weights):
        self.weights, self.calls = np.asarray(weights, dtype=float), []

    def lognormal(self, mean, sigma, size):
        self.calls.append((mean, sigma, size))
        return self.weights.copy()


def test_client_sizes_weighted_by_hand():
    rng = FixedWeights([1.0, 2.0, 5.0])
    # 20 = 3 * 1 + 17 spare; 17 * [1, 2, 5] / 8 = [2.125, 4.25, 10.625] -> 1 + floor = [3, 5, 11],
    # sum 19; the one left over goes to the largest fractional part (0.625, client 2).
    np.testing.assert_array_equal(client_sizes(20, 3, 0.7, rng), [3, 5, 12])
    assert rng.calls == [(0.0, 0.7, 3)]


def test_client_sizes_every_client_gets_one_and_errors():
    for seed in range(5):
        sizes = client_sizes(30, 25, 3.0, np.random.default_rng(seed))
        assert sizes.sum() == 30 and sizes.min() >= 1 and len(sizes) == 25
    with pytest.raises(ValueError):
        client_sizes(4, 5, 0.0, np.random.default_rng(0))

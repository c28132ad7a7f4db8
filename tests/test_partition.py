"""Client partitions (src/data/partition.py) on synthetic label arrays: every scheme is a partition
(each sample once) and seeded; the peers' Dirichlet statistics (classes holding 90 % of a client's
data) for `dirichlet` and `dirichlet_per_client`; `hsu` reproduces the splits pinned before issue 11;
min_size; McMahan's shards (k classes exactly); quantity skew; alpha=0 single-class shards; old
checkpoints' partition settings read as partition=hsu."""
import hashlib

import numpy as np
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from src.checkpoint import check_resumable, legacy_partition, settings_differences
from src.config import ConfigError, validate
from src.data.partition import (IID, Dirichlet, DirichletPerClient, HsuDirichlet, Pathological, apportion,
                                class_histogram, client_sizes, dirichlet_sizes, spread_classes)
from src.errors import UserError

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


def classes_for_90(hist: np.ndarray) -> np.ndarray:
    """Per client (row): the fewest classes whose counts (largest first) reach 90 % of its samples."""
    cum = np.cumsum(-np.sort(-hist, axis=1), axis=1)
    return (cum < 0.9 * hist.sum(axis=1, keepdims=True)).sum(axis=1) + 1


def digest(clients: list[np.ndarray]) -> str:
    h = hashlib.sha256()
    for c in clients:
        h.update(np.int64(len(c)).tobytes())
        h.update(np.asarray(c, dtype=np.int64).tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------- coverage and sizes

PARTITIONERS = [
    pytest.param(IID(), id="iid"),
    pytest.param(IID(size_beta=1.0, min_size=5), id="iid-beta1"),
    pytest.param(Dirichlet(0.1, min_size=1), id="dir0.1"),
    pytest.param(Dirichlet(0.5), id="dir0.5"),
    pytest.param(Dirichlet(100.0), id="dir100"),
    pytest.param(Dirichlet(0.0), id="dir0-shards"),
    pytest.param(DirichletPerClient(0.1), id="perclient0.1"),
    pytest.param(DirichletPerClient(0.5, size_beta=1.0, min_size=5), id="perclient0.5-beta1"),
    pytest.param(DirichletPerClient(0.0), id="perclient0-shards"),
    pytest.param(HsuDirichlet(0.05), id="hsu0.05"),
    pytest.param(HsuDirichlet(0.5), id="hsu0.5"),
    pytest.param(HsuDirichlet(100.0, size_sigma=1.0), id="hsu100-sigma"),
    pytest.param(HsuDirichlet(0.0), id="hsu0-shards"),
    pytest.param(Pathological(1), id="path1"),
    pytest.param(Pathological(2), id="path2"),
    pytest.param(Pathological(5), id="path5"),
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
def test_equal_sizes_without_quantity_skew(num_clients):
    labels = skewed_labels(997)
    for part in (IID(), HsuDirichlet(0.3), HsuDirichlet(50.0), DirichletPerClient(0.3)):
        sizes = [len(c) for c in part.split(labels, num_clients, NUM_CLASSES, np.random.default_rng(0))]
        assert max(sizes) - min(sizes) <= 1, (part, sizes)
    # shards differ by at most one sample, a client holds 2 of them
    sizes = [len(c) for c in Pathological(2).split(labels, num_clients, NUM_CLASSES, np.random.default_rng(0))]
    assert max(sizes) - min(sizes) <= 2


@pytest.mark.parametrize("part", [
    pytest.param(IID(size_sigma=1.0), id="iid"),
    pytest.param(DirichletPerClient(0.5, size_sigma=1.0), id="perclient0.5"),
    pytest.param(HsuDirichlet(0.5, size_sigma=1.0), id="hsu0.5"),
    pytest.param(HsuDirichlet(100.0, size_sigma=1.0), id="hsu100"),
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


@pytest.mark.parametrize("part", [
    pytest.param(IID(size_beta=1.0, min_size=20), id="iid"),
    pytest.param(DirichletPerClient(0.5, size_beta=1.0, min_size=20), id="perclient0.5"),
    pytest.param(HsuDirichlet(0.5, size_beta=1.0, min_size=20), id="hsu0.5"),
    pytest.param(Dirichlet(0.0, size_beta=1.0, min_size=20), id="dir0-shards"),
])
def test_dirichlet_quantity_skew(part):
    labels = balanced_labels(300)
    for seed in range(3):
        clients = part.split(labels, 20, NUM_CLASSES, np.random.default_rng(seed))
        assert_exact_cover(clients, len(labels))
        sizes = np.array([len(c) for c in clients])
        if not isinstance(part, Dirichlet):  # the shards cut each class in proportion to the sizes, not to them
            np.testing.assert_array_equal(sizes, dirichlet_sizes(3000, 20, 1.0, 20, np.random.default_rng(seed)))
            assert sizes.min() >= 20
        assert sizes.sum() == 3000
        assert sizes.max() >= 3 * sizes.min(), sizes  # Dir(1) over 20 clients: sizes far apart


class FixedDraws:
    """Stands in for the generator: dirichlet() returns the given proportions in turn, permutation()
    keeps the order; records the Dirichlet parameters asked for."""

    def __init__(self, *draws):
        self.draws, self.asked = [np.asarray(d, dtype=float) for d in draws], []

    def dirichlet(self, alpha):
        self.asked.append(np.asarray(alpha).tolist())
        return self.draws.pop(0)

    def permutation(self, x):
        return np.arange(x) if np.isscalar(x) else np.array(x)


def test_dirichlet_sizes_redraw_below_min_size_by_hand():
    # 20 samples, 3 clients, min_size 3: [0.05, 0.45, 0.5] * 20 = [1, 9, 10] leaves client 0 below 3:
    # redrawn; [0.2, 0.3, 0.5] * 20 = [4, 6, 10].
    rng = FixedDraws([0.05, 0.45, 0.5], [0.2, 0.3, 0.5])
    np.testing.assert_array_equal(dirichlet_sizes(20, 3, 0.7, 3, rng), [4, 6, 10])
    assert rng.asked == [[0.7] * 3, [0.7] * 3]


def test_dirichlet_sizes_give_up_with_a_clear_message():
    with pytest.raises(ValueError, match=r"1000 draws of Dir\(size_beta=0.01\).*min_size=10.*partition.size_beta"):
        dirichlet_sizes(1000, 50, 0.01, 10, np.random.default_rng(0))
    with pytest.raises(ValueError, match="10 clients of at least min_size=10 samples need 100, the data has 50"):
        dirichlet_sizes(50, 10, 1.0, 10, np.random.default_rng(0))


# ---------------------------------------------------------------- the peers' Dirichlet statistics

def test_classes_for_90_by_hand():
    hist = np.array([[90, 10, 0], [50, 30, 20], [40, 40, 20], [1, 1, 1]])
    # 90 >= 90; 50 + 30 = 80 < 90 -> 3; 40 + 40 = 80 < 90 -> 3; 2 < 2.7 -> 3
    np.testing.assert_array_equal(classes_for_90(hist), [1, 3, 3, 3])
    np.testing.assert_array_equal(classes_for_90(np.array([[5, 85, 10]])), [2])  # 85 + 10 = 95 >= 90


def mean_classes_for_90(part, seeds=range(5)) -> float:
    """Over clients and seeds, on 60000 balanced labels split among 100 clients."""
    labels = balanced_labels(6000)
    return float(np.mean([classes_for_90(class_histogram(labels, part.split(labels, 100, NUM_CLASSES,
                                                                             np.random.default_rng(seed)),
                                                         NUM_CLASSES)).mean() for seed in seeds]))


# Measured over 20 seeds: dirichlet 4.68 at alpha=0.5, 2.25 at 0.1; dirichlet_per_client 5.02 and 2.38
# (one seed alone spans 2.20-2.58 at 0.1: a pure Dir(0.1) mix over 10 classes averages 2.50); hsu 1.79, 1.23.
@pytest.mark.parametrize("scheme", [Dirichlet, DirichletPerClient])
def test_peer_dirichlet_statistics(scheme):
    assert 4.3 <= mean_classes_for_90(scheme(0.5)) <= 5.4
    assert mean_classes_for_90(scheme(0.1)) < 2.5


def test_hsu_is_ten_times_harsher():
    # Dir(0.5 * p) over 10 balanced classes is Dir(0.05) per class
    assert mean_classes_for_90(HsuDirichlet(0.5)) < 2.0
    # and Hsu's alpha=5 is dirichlet_per_client's alpha=0.5: the same split
    labels = balanced_labels(600)
    for a, b in zip(HsuDirichlet(5.0).split(labels, 50, NUM_CLASSES, np.random.default_rng(3)),
                    DirichletPerClient(0.5).split(labels, 50, NUM_CLASSES, np.random.default_rng(3))):
        np.testing.assert_array_equal(a, b)


def skew_stats(part, seed, labels):
    f = fractions(labels, part.split(labels, 20, NUM_CLASSES, np.random.default_rng(seed)))
    mean_max = f.max(axis=1).mean()  # mean over clients of the largest class fraction
    mean_tv = 0.5 * np.abs(f - 1 / NUM_CLASSES).sum(axis=1).mean()  # mean distance from uniform
    return mean_max, mean_tv


@pytest.mark.parametrize("scheme", [Dirichlet, DirichletPerClient, HsuDirichlet])
@pytest.mark.parametrize("seed", range(4))
def test_skew_follows_alpha(scheme, seed):
    # 5000 balanced samples, 20 clients: alpha=0.05 puts most of a client on one class, alpha=1000
    # (per class, or x p for Hsu's) is close to uniform, up to the noise of ~250 draws.
    labels = balanced_labels(500)
    max_small, tv_small = skew_stats(scheme(0.05, min_size=1), seed, labels)
    max_big, tv_big = skew_stats(scheme(1000.0), seed, labels)
    assert max_small > 0.6
    assert max_small > max_big + 0.3
    assert tv_small > tv_big + 0.3
    assert max_big < 0.25
    assert tv_big < 0.25


def test_iid_is_close_to_uniform():
    labels = balanced_labels(500)
    for seed in range(4):
        f = fractions(labels, IID().split(labels, 20, NUM_CLASSES, np.random.default_rng(seed)))
        assert f.max(axis=1).mean() < 0.25
        assert np.abs(f - 0.1).max() < 0.15


# ---------------------------------------------------------------- dirichlet: NIID-Bench's rules

def test_per_class_shares_by_hand():
    # 2 clients, classes of 4 samples (n / clients = 4). First draw: class 0 all to client 0 ([1, 0]),
    # which then holds its 4 and gets no share of class 1: class 1's [1, 0] becomes [0, 0], a failed
    # draw. Second draw: class 0 [0.75, 0.25] -> cuts at 3: [3, 1]; class 1 [0.25, 0.75] -> [1, 3].
    labels = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    rng = FixedDraws([1.0, 0.0], [1.0, 0.0], [0.75, 0.25], [0.25, 0.75])
    clients = Dirichlet(0.3, min_size=3).split(labels, 2, 2, rng)
    # with permutation() the identity, a class's samples go to the clients in index order
    assert [c.tolist() for c in clients] == [[0, 1, 2, 4], [3, 5, 6, 7]]  # a client's indices ascending
    assert rng.asked == [[0.3, 0.3]] * 4
    np.testing.assert_array_equal(class_histogram(labels, clients, 2), [[3, 1], [1, 3]])


def test_balance_rule_caps_a_full_client_by_hand():
    # class 0 all to client 0 ([1, 0]) fills it (4 = n / clients); class 1's [0.5, 0.5] then goes to client 1 alone
    labels = np.repeat([0, 1], 4)
    clients = Dirichlet(0.3, min_size=1).split(labels, 2, 2, FixedDraws([1.0, 0.0], [0.5, 0.5]))
    np.testing.assert_array_equal(class_histogram(labels, clients, 2), [[4, 0], [0, 4]])


@pytest.mark.parametrize("alpha", [0.1, 0.5])
def test_min_size_respected(alpha):
    # 2000 samples, 20 clients: a single draw leaves every client >= 20 samples 96 % of the time at
    # alpha=0.5, 5 % at alpha=0.1 (measured): there the redraws do the work
    labels = skewed_labels(2000)
    for seed in range(5):
        sizes = [len(c) for c in Dirichlet(alpha, min_size=20).split(labels, 20, NUM_CLASSES,
                                                                      np.random.default_rng(seed))]
        assert min(sizes) >= 20 and sum(sizes) == 2000


def test_min_size_that_cannot_be_met_names_the_setting():
    labels = balanced_labels(60)
    with pytest.raises(ValueError, match=r"1000 draws of the per-class Dir\(alpha=0.05\) split all left a client "
                                         r"below min_size=10 samples.*lower partition.min_size"):
        Dirichlet(0.05).split(labels, 50, NUM_CLASSES, np.random.default_rng(0))
    with pytest.raises(ValueError, match="100 clients of at least min_size=10 samples need 1000, the data has 600"):
        Dirichlet(0.5).split(labels, 100, NUM_CLASSES, np.random.default_rng(0))


def test_dirichlet_refuses_quantity_skew_except_for_shards():
    for kwargs in ({"size_sigma": 1.0}, {"size_beta": 0.5}):
        with pytest.raises(ValueError, match="dirichlet_per_client, hsu or iid"):
            Dirichlet(0.5, **kwargs)
        Dirichlet(0.0, **kwargs)  # the shards are cut in proportion to the client sizes


def test_settings_are_checked():
    for bad, match in [(dict(size_sigma=-1.0), "size_sigma must be >= 0"),
                       (dict(size_beta=0.0), "size_beta must be > 0"),
                       (dict(size_sigma=1.0, size_beta=1.0), "set one"),
                       (dict(min_size=0), "min_size must be >= 1")]:
        for scheme in (IID, DirichletPerClient, HsuDirichlet):
            with pytest.raises(ValueError, match=match):
                scheme(**bad)
    for scheme in (Dirichlet, DirichletPerClient, HsuDirichlet):
        with pytest.raises(ValueError, match="alpha must be >= 0"):
            scheme(-0.1)
    with pytest.raises(ValueError, match="shards_per_client must be >= 1"):
        Pathological(0)
    with pytest.raises(ValueError, match="lower partition.shards_per_client"):
        Pathological(3).split(balanced_labels(2), 10, NUM_CLASSES, np.random.default_rng(0))


def test_config_refuses_quantity_skew_on_dirichlet(compose_cfg):
    with pytest.raises(ConfigError) as info:
        validate(compose_cfg("partition.size_sigma=1.0"))
    assert any(p.startswith("partition.size_sigma: src.data.partition.Dirichlet refuses size_sigma=1.0: "
                            "partition=dirichlet draws client sizes") for p in info.value.problems)
    for group, scheme in (("iid", IID), ("dirichlet_per_client", DirichletPerClient), ("hsu", HsuDirichlet)):
        part = instantiate(compose_cfg(f"partition={group}", "partition.size_beta=0.5").partition)
        assert type(part) is scheme and part.size_beta == 0.5 and part.min_size == 10
    assert instantiate(compose_cfg("partition=pathological").partition).shards_per_client == 2


# ---------------------------------------------------------------- hsu: the old splits, bit for bit

def test_hsu_reproduces_the_splits_before_issue_11():
    # pinned with src/data/partition.py's Dirichlet as of commit 09dfe92
    labels = np.array([0, 1, 2, 0, 1, 2, 2, 2, 1, 0, 0, 0, 1, 2, 2, 1, 0, 2, 2, 1, 0, 0, 1, 2])
    clients = HsuDirichlet(0.5).split(labels, 3, 3, np.random.default_rng(5))
    assert [c.tolist() for c in clients] == [[3, 11, 9, 10, 21, 16, 20, 0], [6, 18, 23, 7, 17, 5, 2, 14],
                                             [1, 4, 12, 22, 15, 8, 19, 13]]
    clients = HsuDirichlet(0.5, size_sigma=0.7).split(labels, 3, 3, np.random.default_rng(5))
    assert [c.tolist() for c in clients] == [[21, 0, 3, 10, 9, 16, 11, 20], [6, 5, 13, 7, 2],
                                             [22, 12, 1, 4, 15, 19, 8, 17, 23, 18, 14]]
    big = np.random.default_rng(123).choice(10, size=3000, p=np.linspace(1, 3, 10) / np.linspace(1, 3, 10).sum())
    for (alpha, sigma), expected in {
        (0.5, 0.0): "3ff254b2e78c5d7ec76dc6d23e79b7a6d4ea69c10ac8d13bc23fabf50f7ff2ef",
        (0.5, 1.0): "d5ee98ef3a240d51ca19742a218dc27c4e711377815327e1718add3d63f740b4",
        (5.0, 0.0): "6ceaee89ba88f84fc4483dccf65ed50b8e98f3dc3614c0f56a3278191c360981",
        (0.0, 0.5): "07732f87a6028ab8152a2bc6f9656ddd8bacec2bb31ae08ef1ec132ad88e0708",
    }.items():
        assert digest(HsuDirichlet(alpha, size_sigma=sigma).split(big, 40, 10, np.random.default_rng(11))) == expected


# ---------------------------------------------------------------- pathological

@pytest.mark.parametrize("k,num_clients,per_class", [(2, 100, 6000), (2, 30, 60), (3, 20, 60), (5, 20, 50)])
def test_pathological_k_classes_exactly(k, num_clients, per_class):
    # balanced classes whose size is a multiple of the shard size: every shard within one class
    labels = balanced_labels(per_class)
    for seed in range(3):
        clients = Pathological(k).split(labels, num_clients, NUM_CLASSES, np.random.default_rng(seed))
        assert_exact_cover(clients, len(labels))
        hist = class_histogram(labels, clients, NUM_CLASSES)
        np.testing.assert_array_equal((hist > 0).sum(axis=1), k)
        np.testing.assert_array_equal(hist.sum(axis=1), len(labels) // num_clients)


def test_pathological_pairs_are_random_not_fixed():
    # McMahan's shards are dealt at random: many different class pairs, not a fixed pattern
    labels = balanced_labels(6000)
    hist = class_histogram(labels, Pathological(2).split(labels, 100, NUM_CLASSES, np.random.default_rng(0)),
                           NUM_CLASSES)
    pairs = {tuple(np.flatnonzero(row)) for row in hist}
    assert len(pairs) > 25  # of the 45 possible


def test_spread_classes_by_hand():
    # shards 0, 1 are class 0, shards 2, 3 class 1: a deal [[0, 1], [2, 3]] swaps one shard across
    deal = spread_classes(np.array([[0, 1], [2, 3]]), np.array([0, 0, 1, 1]), np.random.default_rng(0))
    np.testing.assert_array_equal(np.sort(np.array([0, 0, 1, 1])[deal], axis=1), [[0, 1], [0, 1]])
    np.testing.assert_array_equal(np.sort(deal.ravel()), [0, 1, 2, 3])
    # one class only: nothing to spread, the deal stays
    np.testing.assert_array_equal(spread_classes(np.array([[0, 1], [2, 3]]), np.zeros(4, dtype=np.int64),
                                                 np.random.default_rng(0)), [[0, 1], [2, 3]])


# ---------------------------------------------------------------- alpha = 0

@pytest.mark.parametrize("scheme", [Dirichlet, DirichletPerClient, HsuDirichlet])
@pytest.mark.parametrize("num_clients", [10, 25, 40])
def test_alpha0_single_class_clients(scheme, num_clients):
    labels = skewed_labels(1000)
    for seed in range(3):
        clients = scheme(0.0).split(labels, num_clients, NUM_CLASSES, np.random.default_rng(seed))
        for k, c in enumerate(clients):
            assert len(c) > 0
            # every label of client k is its class, k mod C (FedSeq's convention)
            np.testing.assert_array_equal(labels[c], np.full(len(c), k % NUM_CLASSES))


def test_alpha0_with_size_sigma_still_covers():
    labels = balanced_labels(100)
    for seed in range(3):
        clients = Dirichlet(0.0, size_sigma=1.0).split(labels, 30, NUM_CLASSES, np.random.default_rng(seed))
        assert_exact_cover(clients, len(labels))
        sizes = np.array([len(c) for c in clients])
        assert sizes.max() > 2 * sizes.min()
        for c in clients:
            assert len(np.unique(labels[c])) <= 1


def test_alpha0_needs_a_client_per_class():
    labels = balanced_labels(20)
    with pytest.raises(ValueError, match="client"):
        Dirichlet(0.0).split(labels, NUM_CLASSES - 1, NUM_CLASSES, np.random.default_rng(0))
    # exactly one client per class is enough
    clients = Dirichlet(0.0).split(labels, NUM_CLASSES, NUM_CLASSES, np.random.default_rng(0))
    assert len(clients) == NUM_CLASSES


# ---------------------------------------------------------------- seeding

@pytest.mark.parametrize("part", PARTITIONERS + [pytest.param(HsuDirichlet(0.5, size_sigma=0.8), id="hsu0.5-sigma")])
def test_same_seed_same_split_other_seed_other_split(part):
    labels = skewed_labels(500)

    def split(seed):
        return part.split(labels, 20, NUM_CLASSES, np.random.default_rng(seed))

    a, b, c = split(7), split(7), split(8)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert any(len(x) != len(z) or not np.array_equal(x, z) for x, z in zip(a, c))


# ---------------------------------------------------------------- old checkpoints

OLD_DIRICHLET = {"_target_": "src.data.partition.Dirichlet", "alpha": 0.5, "size_sigma": 0.0}


def saved_with(compose_cfg, partition: dict, *overrides) -> tuple[dict, object]:
    cfg = compose_cfg(*overrides)
    saved = OmegaConf.to_container(cfg, resolve=True)
    del saved["hydra"]
    return {**saved, "partition": partition}, cfg


def current(cfg) -> dict:
    settings = OmegaConf.to_container(cfg, resolve=True)
    del settings["hydra"]
    return settings


def test_old_checkpoint_partition_reads_as_hsu(compose_cfg):
    assert legacy_partition({"partition": OLD_DIRICHLET}) == {"partition": {
        "_target_": "src.data.partition.HsuDirichlet", "alpha": 0.5, "size_sigma": 0.0, "size_beta": None,
        "min_size": 10}}
    saved, cfg = saved_with(compose_cfg, OLD_DIRICHLET, "partition=hsu")
    assert settings_differences(saved, current(cfg)) == []
    check_resumable(saved, current(cfg), cfg)
    # the new default is another split: refused with the usual message
    cfg = compose_cfg()
    assert settings_differences(saved, current(cfg)) == [
        "partition._target_: checkpoint 'src.data.partition.HsuDirichlet', now 'src.data.partition.Dirichlet'"]
    with pytest.raises(UserError, match="written by a run with other settings"):
        check_resumable(saved, current(cfg), cfg)
    # an old IID node gains today's (unused) quantity-skew defaults
    saved, cfg = saved_with(compose_cfg, {"_target_": "src.data.partition.IID", "size_sigma": 0.5},
                            "partition=iid", "partition.size_sigma=0.5")
    assert settings_differences(saved, current(cfg)) == []


def test_new_checkpoint_partition_is_left_as_it_is(compose_cfg):
    cfg = compose_cfg()
    saved = current(cfg)
    assert legacy_partition(saved) is saved
    assert settings_differences(saved, current(compose_cfg("partition=hsu")))  # Dirichlet is not Hsu's


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


def test_apportion_by_hand():
    # 10 * [0.25, 0.35, 0.4] = [2.5, 3.5, 4] -> floors [2, 3, 4], one left: to the first of the equal .5s
    np.testing.assert_array_equal(apportion(np.array([0.25, 0.35, 0.4]), 10), [3, 3, 4])
    np.testing.assert_array_equal(apportion(np.array([1.0, 1.0, 1.0]), 0), [0, 0, 0])


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

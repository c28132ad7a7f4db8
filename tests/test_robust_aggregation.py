"""Robust aggregators (src/server/robust.py) against hand-computed numbers on a few toy updates,
their identities, Krum's and Bulyan's selections on constructed examples, the settings they
refuse, and runs as train.py builds them (Krum, FedAdam under a trimmed mean, centered clipping
resumed bit for bit)."""
import math

import pytest
import torch

from src.client.client import ClientUpdate
from src.config import validate
from src.errors import ConfigError
from src.server.fedavg import FedAvgServer
from src.server.fedopt import FedOptServer
from src.server.robust import (Bulyan, CenteredClip, CoordinateMedian, Krum, Mean, NormBound, TrimmedMean,
                               pairwise_sq_distances)
from src.utils.io import load_torch
from tests.inprocess import SMALL, build_algo, interrupted, metrics_without_times, resume


def update(w, samples=1, tracked=0, sender=None):
    return ClientUpdate({"w": torch.tensor(w, dtype=torch.float64), "tracked": torch.tensor(tracked)}, samples,
                        torch.zeros(()), samples, sender=sender)


def aggregate(aggregator, updates, start=(0.0, 0.0), server=None):
    """One round of `updates` on a FedAvg server (weighting by samples) under `aggregator`; the new w."""
    s = server or FedAvgServer("samples")
    if not s.global_state:
        s.set_global_state({"w": torch.tensor(start, dtype=torch.float64), "tracked": torch.tensor(0)})
        s.attach(["w"], num_clients=10)
    s.aggregator = aggregator
    s.aggregate(iter(updates))
    return s.global_state["w"].tolist()


# ---- coordinate-wise rules ------------------------------------------------------------------------
def test_median_odd_even_and_ties():
    odd = [update([1.0, 5.0]), update([100.0, 0.0]), update([2.0, 4.0], tracked=7)]
    s = FedAvgServer("samples")
    assert aggregate(CoordinateMedian(), odd, server=s) == [2.0, 4.0]  # the outlier 100 is ignored
    assert s.global_state["tracked"].item() == 7  # integer buffers: as the weighted mean takes them (the last)
    # even count: the mean of the two middle values (np.median); column 2 ties 0, 0 | 3, 3
    even = [update([1.0, 0.0]), update([4.0, 0.0]), update([2.0, 3.0]), update([3.0, 3.0])]
    assert aggregate(CoordinateMedian(), even, start=(1.0, 1.0)) == [2.5, 1.5]  # the same from any start


def test_trimmed_mean_by_hand():
    ups = [update([1.0, -50.0]), update([2.0, 0.0]), update([100.0, 0.0]), update([3.0, 1.0]), update([4.0, 2.0])]
    # beta 0.2 of 5: one value off each end: (2 + 3 + 4) / 3 and (0 + 0 + 1) / 3
    assert aggregate(TrimmedMean(0.2), ups) == pytest.approx([3.0, 1 / 3])
    assert aggregate(TrimmedMean(0.25), ups[:4]) == pytest.approx([2.5, 0.0])  # one of 4 off each end
    # 0.29 * 100 is 28.999999999999996 in floating point: still 29 off each end
    squares = [update([float(i * i), 0.0]) for i in range(100)]
    assert aggregate(TrimmedMean(0.29), squares)[0] == pytest.approx(sum(i * i for i in range(29, 71)) / 42)


def test_trimmed_mean_with_beta_zero_is_the_unweighted_mean():
    ups = [update([1.0, 2.0], samples=1), update([4.0, 8.0], samples=3), update([7.0, -1.0], samples=6)]
    assert aggregate(TrimmedMean(0.0), ups, start=(0.5, 0.5)) == pytest.approx([4.0, 3.0])  # not 5.5, 2.9


# ---- Krum, Multi-Krum, Bulyan -----------------------------------------------------------------------
# O = (10, 10) first, then A = (0, 0), B = (1, 0), C = (0, 1), D = (0.5, 0.5). Squared distances:
# AB = AC = 1, BC = 2, AD = BD = CD = 0.5, OA = 200, OB = OC = 181, OD = 180.5. With f = 1 each
# score sums the n - f - 2 = 2 smallest: A, B, C: 0.5 + 1 = 1.5; D: 0.5 + 0.5 = 1; O: 180.5 + 181.
KRUM_EXAMPLE = [[10.0, 10.0], [0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]


def test_krum_keeps_the_best_scored_update_never_the_outlier():
    krum = Krum(f=1)
    assert aggregate(krum, [update(w, sender=i + 20) for i, w in enumerate(KRUM_EXAMPLE)]) == [0.5, 0.5]
    assert krum.last_selected == [4]  # positions in the order the updates were accumulated
    assert krum.last_senders == [20, 21, 22, 23, 24]
    assert krum.metrics() == {"aggregator_kept": 1, "aggregator_skipped": False}


def test_multikrum_averages_the_m_best_ties_to_the_earlier():
    krum = Krum(f=1, m=3)  # D, then A and B of the tied A, B, C
    assert aggregate(krum, [update(w) for w in KRUM_EXAMPLE]) == pytest.approx([0.5, 1 / 6])
    assert krum.last_selected == [1, 2, 4]
    krum = Krum(f=1, m=None)  # n - f = 4: every honest update
    assert aggregate(krum, [update(w) for w in KRUM_EXAMPLE]) == pytest.approx([0.375, 0.375])
    assert krum.last_selected == [1, 2, 3, 4]


def test_multikrum_with_m_n_and_f_zero_is_the_unweighted_mean():
    ups = [update(w, samples=s) for w, s in zip(KRUM_EXAMPLE, [1, 2, 3, 4, 50])]
    assert aggregate(Krum(f=0, m=5), ups) == pytest.approx([2.3, 2.3])


def test_pairwise_distances_from_the_gram_matrix():
    x = torch.randn(6, 40, dtype=torch.float64)
    torch.testing.assert_close(pairwise_sq_distances(x), torch.cdist(x, x) ** 2)
    assert (pairwise_sq_distances(torch.ones(3, 5)) >= 0).all()  # rounding never makes one negative


def test_bulyan_by_hand():
    """n = 7, f = 1: theta = 5 picked by Krum among those not yet picked, beta = 3 averaged per coordinate.
    Values (positions 0..6): 0, 100, 2, 3, 5, 6, 14.
      r=7, 4 neighbours: 3 scores 1+4+9+9 = 23 (2: 30, 5: 39, 6: 62, 0: 74)        -> 3
      r=6, 3 neighbours: 2 scores 4+9+16 = 29 (5: 35, 6: 53, 0: 65)                 -> 2
      r=5, 2 neighbours: 5 scores 25+1 = 26 (6: 37, 0: 61, 14: 145)                 -> 5
      r=4, 1 neighbour:  0 and 6 tie at 36 (14: 64)                                 -> 0, the earlier
      r=3, 1 neighbour:  6 and 14 tie at 64                                         -> 6
    Kept 0, 2, 3, 5, 6 (never 100 nor 14); their median is 3 and the 3 closest to it are 3, 2, 5:
    (2 + 3 + 5) / 3 = 10/3, where their mean is 3.2. The second coordinate: all equal, kept as is."""
    values = [0.0, 100.0, 2.0, 3.0, 5.0, 6.0, 14.0]
    bulyan = Bulyan(f=1)
    assert aggregate(bulyan, [update([v, 1.0]) for v in values]) == pytest.approx([10 / 3, 1.0])
    assert bulyan.last_selected == [0, 2, 3, 4, 5]
    assert bulyan.metrics() == {"aggregator_kept": 5, "aggregator_skipped": False}


def test_too_few_updates_for_f_leave_the_round_out():
    """Krum with f = 2 needs n > 6: a round of 5 (clients dropped) keeps the global model."""
    krum = Krum(f=2)
    assert "aggregator.f" in krum.too_few(6) and "2f+2 = 6" in krum.too_few(6) and krum.too_few(7) is None
    assert "4f+3 = 7" in Bulyan(f=1).too_few(6) and Bulyan(f=1).too_few(7) is None
    assert "aggregator.m=9" in Krum(f=1, m=9).too_few(8)
    assert aggregate(krum, [update(w) for w in KRUM_EXAMPLE], start=(3.0, 4.0)) == [3.0, 4.0]
    assert krum.metrics() == {"aggregator_kept": 0, "aggregator_skipped": True} and krum.last_selected == []


# ---- clipping rules -----------------------------------------------------------------------------------
def test_norm_bound_clips_each_delta_then_takes_the_weighted_mean():
    """From (1, 1): deltas (3, 4) (norm 5, halved to 2.5) and (0, 1) with weights 1 and 3:
    (1 * (1.5, 2) + 3 * (0, 1)) / 4 = (0.375, 1.25)."""
    bound = NormBound(max_norm=2.5)
    ups = [update([4.0, 5.0], samples=1), update([1.0, 2.0], samples=3)]
    assert aggregate(bound, ups, start=(1.0, 1.0)) == pytest.approx([1.375, 2.25])
    assert bound.metrics() == {"aggregator_clipped": 1}
    assert aggregate(NormBound(1e9), ups, start=(1.0, 1.0)) == pytest.approx(aggregate(Mean(), ups, start=(1.0, 1.0)))


def test_centered_clipping_by_hand_and_its_state():
    """tau = 1, L = 2, from v = 0, deltas a = (0.5, 0), b = (0, 0.5), c = (10, 0):
    l=1: c is clipped to (1, 0): v1 = ((0.5 + 0 + 1) / 3, 0.5 / 3) = (0.5, 1/6);
    l=2: only c - v1 = (9.5, -1/6) is longer than tau, scaled by 1/N with N = ||(9.5, -1/6)||:
    v2 = v1 + ((0, -1/6) + (-0.5, 1/3) + (9.5, -1/6) / N) / 3."""
    clip = CenteredClip(tau=1.0, iterations=2)
    s = FedAvgServer("samples")
    got = aggregate(clip, [update([0.5, 0.0]), update([0.0, 0.5]), update([10.0, 0.0])], server=s)
    n = math.hypot(9.5, 1 / 6)
    v2 = [0.5 + (-0.5 + 9.5 / n) / 3, 1 / 6 + (1 / 6 - 1 / 6 / n) / 3]
    assert got == pytest.approx(v2) and clip.metrics() == {"aggregator_clipped": 1}
    assert s.state_dict()["aggregator"]["previous"].tolist() == pytest.approx(v2)  # in resume.pt with the server
    # the next round starts from v2: every delta (5, 0) is 5 - v2 away, one iteration moves tau towards it
    clip.iterations = 1
    offset = torch.tensor([5.0, 0.0], dtype=torch.float64) - torch.tensor(v2, dtype=torch.float64)
    step = torch.tensor(v2, dtype=torch.float64) + offset / offset.norm()
    start = s.global_state["w"].clone()
    got = aggregate(clip, [update((start + torch.tensor([5.0, 0.0], dtype=torch.float64)).tolist())] * 3, server=s)
    assert got == pytest.approx((start + step).tolist())
    restored = CenteredClip()
    restored.load_state_dict(clip.state_dict())
    assert torch.equal(restored.previous, clip.previous)


# ---- composition ------------------------------------------------------------------------------------
def test_fedopt_takes_its_pseudo_gradient_from_the_aggregate():
    """FedAvgM with beta1 = 0 and lr = 1 lands on its mean: under the median, on the median."""
    s = FedOptServer("momentum", lr=1.0, beta1=0.0)
    ups = [update([1.0, 5.0]), update([100.0, 0.0]), update([2.0, 4.0])]
    assert aggregate(CoordinateMedian(), ups, server=s) == [2.0, 4.0]


def test_empty_round_changes_nothing():
    clip = CenteredClip()
    assert aggregate(clip, [], start=(1.0, 2.0)) == [1.0, 2.0] and clip.previous is None and clip.metrics() == {}


# ---- settings -----------------------------------------------------------------------------------------
def problems_of(compose_cfg, *overrides) -> str:
    with pytest.raises(ConfigError) as info:
        validate(compose_cfg(*SMALL, *overrides))
    return "\n".join(info.value.problems)


@pytest.mark.parametrize("overrides, expected", [
    (["algo=scaffold", "aggregator=krum"], "ScaffoldServer also sums control_change"),
    (["algo=feddyn", "aggregator=median"], "FedDynServer also sums grad_change"),
    (["algo=fedmedian", "aggregator=krum"], "MedianServer is FedAvg under CoordinateMedian"),
    (["aggregator=median", "client.ema.decay=0.9", "client.ema.send=raw", "client.ema.evaluate=true"],
     "client.ema.evaluate scores the plain mean"),
    (["aggregator=krum", "aggregator.f=-1"], "aggregator.f: src.server.robust.Krum refuses f=-1"),
    (["aggregator=multikrum", "aggregator.m=0"], "aggregator.m: src.server.robust.Krum refuses m=0"),
    (["aggregator=trimmed_mean", "aggregator.beta=0.5"], "aggregator.beta: src.server.robust.TrimmedMean refuses"),
    (["aggregator=norm_bound", "aggregator.max_norm=0"], "aggregator.max_norm: src.server.robust.NormBound refuses"),
    (["aggregator=centered_clip", "aggregator.iterations=0"], "aggregator.iterations: src.server.robust.CenteredClip"),
])
def test_settings_that_cannot_work_are_refused(compose_cfg, overrides, expected):
    assert expected in problems_of(compose_cfg, *overrides)


def test_fedmedian_is_fedavg_under_the_median(compose_cfg):
    cfg = compose_cfg(*SMALL, "algo=fedmedian")
    validate(cfg)
    assert cfg.aggregator._target_ == "src.server.robust.CoordinateMedian"
    assert compose_cfg(*SMALL).aggregator._target_ == "src.server.robust.Mean"


def test_krum_with_too_few_clients_per_round_is_refused_when_built(compose_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"aggregator.f=1 needs more than 2f\+2 = 4 updates per round.*has 3"):
        build_algo(compose_cfg, tmp_path, *SMALL, "aggregator=krum")  # 3 clients per round
    with pytest.raises(ConfigError, match=r"aggregator.f=0 needs n >= 4f\+3 = 3 updates per round.*has 1"):
        build_algo(compose_cfg, tmp_path, *SMALL, "algo=centralized", "aggregator=bulyan", "aggregator.f=0")


def test_fedseq_counts_superclients_once_grouped(compose_cfg, tmp_path):
    algo = build_algo(compose_cfg, tmp_path, *SMALL, "algo=fedseq", "algo.representation=label_histogram",
                      "algo.min_examples=100", "aggregator=krum", "aggregator.f=0")  # 6 clients: unknown yet
    with pytest.raises(ConfigError, match=r"Krum with aggregator.f=0 needs more than 2f\+2 = 2 updates per round"):
        algo.fit()
    assert not (tmp_path / "resume.pt").exists()


# ---- runs ---------------------------------------------------------------------------------------------
def test_fedavg_under_krum_trains_and_records_what_it_kept(compose_cfg, tmp_path):
    algo = build_algo(compose_cfg, tmp_path, *SMALL, "clients.total=10", "aggregator=krum", "num_rounds=2")
    assert isinstance(algo.server.aggregator, Krum) and algo.server.aggregator.f == 1
    assert 0.0 <= algo.fit()["final_test_accuracy"] <= 1.0
    assert [(m["aggregator_kept"], m["aggregator_skipped"]) for m in algo.history] == [(1, False)] * 2
    selected = algo.server.aggregator.last_selected
    assert len(selected) == 1 and 0 <= selected[0] < 5
    assert set(algo.server.aggregator.last_senders) == set(algo.draw(1, 10))


def test_fedadam_under_trimmed_mean_trains(compose_cfg, tmp_path):
    algo = build_algo(compose_cfg, tmp_path, *SMALL, "algo=fedadam", "aggregator=trimmed_mean",
                      "aggregator.beta=0.34", "num_rounds=2")
    assert isinstance(algo.server, FedOptServer) and isinstance(algo.server.aggregator, TrimmedMean)
    before = {k: v.clone() for k, v in algo.server.global_state.items()}
    assert 0.0 <= algo.fit()["final_test_accuracy"] <= 1.0
    assert any(not torch.equal(before[k], v) for k, v in algo.server.global_state.items())
    assert all(t.abs().sum() > 0 for t in algo.server.m.values())  # Adam's moments moved


def test_centered_clipping_resumes_bit_for_bit(compose_cfg, tmp_path):
    settings = [*SMALL, "algo=fedadam", "aggregator=centered_clip", "aggregator.tau=0.05", "aggregator.iterations=2",
                "num_rounds=3", "eval_every=1"]
    straight = build_algo(compose_cfg, tmp_path / "straight", *settings)
    straight.fit()
    assert all(m["aggregator_clipped"] > 0 for m in straight.history)  # tau small enough to clip
    resumed = interrupted(compose_cfg, tmp_path / "cut", settings, 1)
    saved = load_torch(tmp_path / "cut" / "resume.pt")["server"]["aggregator"]["previous"]
    assert saved is not None and saved.abs().sum() > 0
    resume(resumed).fit()
    a, b = straight.server.state_dict(), resumed.server.state_dict()
    assert a.keys() == b.keys() and "aggregator" in a
    for part in a:
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert metrics_without_times(straight) == metrics_without_times(resumed)

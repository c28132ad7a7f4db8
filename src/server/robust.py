"""Robust aggregation: rules that take the place of the weighted mean of the round's models in
CenterServer.aggregate (the config group `aggregator`), so that every server built on that mean
runs under them: FedAvg, FedProx (FedAvg's server) and the FedOpt family, whose pseudo-gradient is
taken from the aggregate (`algo=fedadam aggregator=krum aggregator.f=2`).

A rule sees the round's n updates as one (n, d) matrix of deltas, built once per round: row i holds
every floating-point entry of update i (parameters and floating buffers such as BatchNorm
statistics, so that nothing reaches the model unfiltered), flattened in the state's order, minus
the global model the clients started from. It returns one delta; the aggregate is the global model
plus that delta. Integer buffers (num_batches_tracked) come from the weighted mean, as FedAvg takes
them. The rules are unweighted, as in their papers, except norm bounding (a clipped FedAvg, weighted
as the server weighs). Pairwise distances come from one Gram matrix on the device.

- median: coordinate-wise median (Yin et al., "Byzantine-Robust Distributed Learning: Towards
  Optimal Statistical Rates", ICML 2018, Option I); for an even n the mean of the two middle values,
  as numpy's np.median (Flower's FedMedian).
- trimmed_mean: coordinate-wise beta-trimmed mean (Yin et al. 2018, Option II): drop the
  k = floor(beta n) largest and k smallest values of each coordinate, average the other n - 2k.
- krum / multikrum (Blanchard et al., "Machine Learning with Adversaries: Byzantine Tolerant Gradient
  Descent", NeurIPS 2017): score(i) = sum of the squared distances from delta_i to its n - f - 2
  nearest other deltas; Krum keeps the lowest score, Multi-Krum averages the m lowest (m = 1: Krum).
  Needs n > 2f + 2.
- bulyan (El Mhamdi, Guerraoui, Rouault, "The Hidden Vulnerability of Distributed Learning in
  Byzantium", ICML 2018): select theta = n - 2f deltas by Krum applied repeatedly to those not yet
  selected; then, per coordinate, average the beta = theta - 2f selected values closest to their
  median. Needs n >= 4f + 3.
- norm_bound (Sun et al., "Can You Really Backdoor Federated Learning?", 2019): every delta clipped
  to norm M, delta_i / max(1, ||delta_i|| / M), then the weighted mean.
- centered_clip (Karimireddy, He, Jaggi, "Learning from History for Byzantine Robust Optimization",
  ICML 2021, centered clipping): L iterations of v <- v + 1/n sum_i (delta_i - v) min(1, tau / ||delta_i - v||),
  from v = the previous round's aggregate delta (zero before the first), which it keeps as state.

A round with fewer updates than a rule needs (clients dropped mid-run; FedBase refuses a setting
whose every round is too small before training starts) is left out: the global model and the
server's state stay as they are, a warning says so and the round's metrics record
aggregator_skipped. Per round, the selecting rules (Krum, Multi-Krum, Bulyan) record in
`last_selected` the positions, in the order the updates were accumulated, of those they kept, and
in `last_senders` who sent each update; `metrics()` is what the round adds to metrics.jsonl."""
import logging
import math
from typing import Optional

import torch
from hydra.utils import get_class
from omegaconf import DictConfig

from src.server.base import Sums

log = logging.getLogger(__name__)


def median(stacked: torch.Tensor) -> torch.Tensor:
    """The median along dimension 0 (the mean of the two middle values for an even count)."""
    ordered = stacked.sort(dim=0).values
    k = ordered.shape[0]
    return (ordered[(k - 1) // 2] + ordered[k // 2]) / 2


def pairwise_sq_distances(deltas: torch.Tensor) -> torch.Tensor:
    """||a - b||^2 for every pair of rows, as ||a||^2 + ||b||^2 - 2 a.b from one Gram matrix (one
    matmul on the device); rounding can make a tiny distance negative, hence the clamp."""
    gram = deltas @ deltas.T
    sq = gram.diagonal()
    return (sq[:, None] + sq[None, :] - 2 * gram).clamp_min_(0)


def krum_scores(dist: torch.Tensor, neighbours: int) -> torch.Tensor:
    """Blanchard et al.'s score: the sum of each row's `neighbours` smallest distances, where
    `dist` holds inf on the diagonal (and for rows or columns out of the running)."""
    if neighbours == 0:
        return torch.zeros(dist.shape[0], dtype=dist.dtype, device=dist.device)
    return dist.topk(neighbours, dim=1, largest=False).values.sum(1)


class Aggregator:
    """The weighted mean's replacement; subclasses define combine() and, if they need more than
    one update, min_updates and rule."""

    needs_all_updates = True  # the (n, d) matrix needs every update: the server keeps owned copies
    min_updates = 1
    settings = "aggregator.f"  # what sets min_updates

    def __init__(self):
        self.last_selected: Optional[list[int]] = None
        self.last_senders: list[Optional[int]] = []
        self._metrics: dict = {}

    @property
    def rule(self) -> str:
        """What min_updates is, in words, naming the settings that set it."""
        return f"{type(self).__name__} needs {self.min_updates} updates per round"

    def too_few(self, n: int) -> Optional[str]:
        """Why n updates per round are too few (None when they are enough)."""
        if n >= self.min_updates:
            return None
        return (f"{self.rule}, and a round here has {n}: lower {self.settings} or select more clients per round "
                "(clients.per_round / clients.num_per_round)")

    def __call__(self, sums: Sums, center: dict[str, torch.Tensor]) -> Optional[dict[str, torch.Tensor]]:
        """The state server_update receives as `mean`; None leaves the round out."""
        self.last_selected, self.last_senders, self._metrics = None, [], {}
        mean = sums.mean.result()
        if mean is None:
            return None
        self.last_senders = [u.sender for u in sums.updates]
        problem = self.too_few(sums.count)
        if problem:
            log.warning("%s: round left out, the global model is kept (%s)", type(self).__name__, problem)
            self._metrics = self.skipped_metrics()
            return None
        keys = [k for k, v in center.items() if v.is_floating_point()]
        start = torch.cat([center[k].reshape(-1) for k in keys])
        deltas = torch.empty(sums.count, start.numel(), dtype=start.dtype, device=start.device)
        for row, update in zip(deltas, sums.updates):
            torch.cat([update.state[k].reshape(-1) for k in keys], out=row)
        deltas -= start
        weights = torch.tensor(sums.weights, dtype=start.dtype, device=start.device)
        flat = start + self.combine(deltas, weights)
        parts = flat.split([center[k].numel() for k in keys])
        return {**mean, **{k: p.reshape(center[k].shape).to(center[k].dtype).clone() for k, p in zip(keys, parts)}}

    def combine(self, deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """One delta (d,) from the round's deltas (n, d) and the server's weights (n,)."""
        raise NotImplementedError

    def skipped_metrics(self) -> dict:
        return {"aggregator_skipped": True}

    def metrics(self) -> dict:
        """What the last round adds to its metrics."""
        return dict(self._metrics)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def check(self, cfg: DictConfig) -> list[str]:
        """Where this rule cannot compose with the run's other settings (src/config.py validate)."""
        name = f"aggregator: {type(self).__name__} ({cfg.aggregator._target_})"
        try:
            server = get_class(cfg.algo.server._target_)
        except Exception:  # the algo group reports it
            return []
        problems = []
        if server.summed_extras:
            problems.append(f"{name} replaces the weighted mean of the round's models, but {server.__name__} also "
                            f"sums {', '.join(server.summed_extras)} over the same updates (SCAFFOLD's controls, "
                            "FedDyn's gradient state), which no aggregator filters: use aggregator=mean with this "
                            "algorithm, or one whose server only averages the models (fedavg, fedprox, fedavgm, "
                            "fedadam, ...)")
        own = getattr(server, "own_aggregator", None)
        if own is not None and type(self) is not own:
            problems.append(f"{name}: {server.__name__} is FedAvg under {own.__name__} (algo=fedmedian); for another "
                            "aggregator use algo=fedavg (algo.server.weighting=uniform weighs as fedmedian does)")
        e = cfg.client.ema
        if e.decay is not None and e.evaluate and e.send == "raw":
            problems.append(f"{name}: client.ema.evaluate scores the plain mean of the clients' EMAs, which the "
                            "aggregator never sees: use client.ema.evaluate=false (or client.ema.send=ema, so that "
                            "the aggregator filters the EMAs themselves)")
        return problems


class Mean(Aggregator):
    """aggregator=mean: the server's weighted mean, streamed, as without an aggregator."""

    needs_all_updates = False

    def __call__(self, sums: Sums, center: dict[str, torch.Tensor]) -> Optional[dict[str, torch.Tensor]]:
        return sums.mean.result()

    def check(self, cfg: DictConfig) -> list[str]:
        return []


class CoordinateMedian(Aggregator):
    def combine(self, deltas, weights):
        return median(deltas)


class TrimmedMean(Aggregator):
    def __init__(self, beta: float = 0.2):
        """`beta`: the fraction trimmed from each end of every coordinate, in [0, 0.5)."""
        super().__init__()
        if not 0 <= beta < 0.5:
            raise ValueError(f"the trimmed fraction beta must be in [0, 0.5) (from each end), got {beta}")
        self.beta = beta

    def combine(self, deltas, weights):
        n = deltas.shape[0]
        k = math.floor(self.beta * n + 1e-9)  # the epsilon: beta n = 2.9999999999999996 trims 3
        return deltas.sort(dim=0).values[k:n - k].mean(0)


class Selecting(Aggregator):
    """A rule that keeps some updates whole (Krum, Multi-Krum, Bulyan): `f` assumed attackers."""

    def __init__(self, f: int = 1):
        super().__init__()
        if f < 0:
            raise ValueError(f"the number of assumed attackers f must be >= 0, got {f}")
        self.f = f

    def keep(self, kept: torch.Tensor) -> None:
        """Record the kept positions (ascending)."""
        self.last_selected = kept.tolist()
        self._metrics = {"aggregator_kept": len(self.last_selected), "aggregator_skipped": False}

    def skipped_metrics(self) -> dict:
        self.last_selected = []
        return {"aggregator_kept": 0, "aggregator_skipped": True}


class Krum(Selecting):
    settings = "aggregator.f (or aggregator.m)"

    def __init__(self, f: int = 1, m: Optional[int] = 1):
        """`m`: how many of the best-scored updates Multi-Krum averages (1: Krum; null: n - f)."""
        super().__init__(f)
        if m is not None and m < 1:
            raise ValueError(f"Multi-Krum averages m >= 1 updates, got m={m}")
        self.m = m

    @property
    def min_updates(self) -> int:
        return max(2 * self.f + 3, self.m or 1)

    @property
    def rule(self) -> str:
        rule = f"Krum with aggregator.f={self.f} needs more than 2f+2 = {2 * self.f + 2} updates per round"
        return rule + (f" and at least aggregator.m={self.m} to average" if self.m and self.m > 2 * self.f + 3 else "")

    def combine(self, deltas, weights):
        n = deltas.shape[0]
        scores = krum_scores(pairwise_sq_distances(deltas).fill_diagonal_(math.inf), n - self.f - 2)
        m = self.m or n - self.f
        kept = scores.sort(stable=True).indices[:m].sort().values  # ties: the earlier update
        self.keep(kept)
        return deltas[kept].mean(0)


class Bulyan(Selecting):
    @property
    def min_updates(self) -> int:
        return 4 * self.f + 3

    @property
    def rule(self) -> str:
        return f"Bulyan with aggregator.f={self.f} needs n >= 4f+3 = {self.min_updates} updates per round"

    def combine(self, deltas, weights):
        n, f = deltas.shape[0], self.f
        theta, beta = n - 2 * f, n - 4 * f
        dist = pairwise_sq_distances(deltas).fill_diagonal_(math.inf)
        taken = torch.zeros(n, dtype=torch.bool, device=deltas.device)
        for remaining in range(n, n - theta, -1):
            # Krum among the r updates not yet taken, with r - f - 2 neighbours (at least one:
            # the last picks have fewer than f + 3 left)
            neighbours = min(max(remaining - f - 2, 1), remaining - 1)
            scores = krum_scores(dist.masked_fill(taken[None, :], math.inf), neighbours).masked_fill_(taken, math.inf)
            taken[scores.argmin()] = True  # ties: the earlier update; indexed on the device, no host sync
        kept = taken.nonzero().squeeze(1)
        self.keep(kept)
        selected = deltas[kept]
        closest = (selected - median(selected)).abs().sort(dim=0, stable=True).indices[:beta]
        return selected.gather(0, closest).mean(0)


class NormBound(Aggregator):
    def __init__(self, max_norm: float = 1.0):
        """`max_norm`: M, the largest norm an update delta keeps."""
        super().__init__()
        if not max_norm > 0:
            raise ValueError(f"the norm bound M must be > 0, got {max_norm}")
        self.max_norm = max_norm

    def combine(self, deltas, weights):
        norms = deltas.norm(dim=1)
        scale = (self.max_norm / norms).clamp(max=1.0)  # a zero delta: inf, clamped to 1
        self._metrics = {"aggregator_clipped": int((norms > self.max_norm).sum())}
        return (weights * scale) @ deltas / weights.sum()


class CenteredClip(Aggregator):
    def __init__(self, tau: float = 1.0, iterations: int = 1):
        """`tau`: the clipping radius around the running centre; `iterations`: L."""
        super().__init__()
        if not tau > 0:
            raise ValueError(f"the clipping radius tau must be > 0, got {tau}")
        if iterations < 1:
            raise ValueError(f"centered clipping needs iterations >= 1, got {iterations}")
        self.tau, self.iterations = tau, iterations
        self.previous: Optional[torch.Tensor] = None  # the last round's aggregate delta

    def combine(self, deltas, weights):
        v = torch.zeros_like(deltas[0]) if self.previous is None else self.previous
        for _ in range(self.iterations):
            offsets = deltas - v
            norms = offsets.norm(dim=1)
            v = v + ((self.tau / norms).clamp(max=1.0)[:, None] * offsets).mean(0)
        self.previous = v
        self._metrics = {"aggregator_clipped": int((norms > self.tau).sum())}  # in the last iteration
        return v

    def state_dict(self) -> dict:
        return {"previous": self.previous}

    def load_state_dict(self, state: dict) -> None:
        self.previous = None if state["previous"] is None else state["previous"].clone()

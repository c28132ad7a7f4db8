"""Central (user-level) differential privacy, the `dp:` settings: DP-FedAvg (McMahan, Ramage, Talwar,
Zhang, "Learning Differentially Private Recurrent Language Models", ICLR 2018) with a fixed clip norm
or an adaptive one (Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private Learning with
Adaptive Clipping", NeurIPS 2021), its privacy budget from Google's dp-accounting (RDP accountant).
Off by default: a run is then bit for bit what it was without this module.

Each round, G the global model it starts from, m the clients drawn per round, N the federation:
- Client side (an update transform, the last one: it bounds what is sent): the update
  Delta_i = w_i - G over the trainable parameters (one L2 norm over all of them) is clipped to C,
  Delta_i min(1, C / ||Delta_i||), and b_i = 1[||Delta_i|| <= C] is what the client also reports.
- Server side: the aggregate is G + (sum_i clipped Delta_i + N(0, (z_Delta C)^2 I)) / m. The divisor
  is the fixed m, not the number that reported (McMahan et al.'s fixed-denominator estimator; with
  fixed-size sampling m is known): one client then moves the sum by its clipped update and nothing
  else. The server (FedAvg, FedAdam, ...) receives this noisy mean where it would the plain one.
  The weights must be uniform: a sample-weighted mean lets one client count for more than 1/m.
- Adaptive clipping: b_bar = (sum_i b_i + N(0, sigma_b^2)) / m, then C <- C exp(-eta_C (b_bar - gamma))
  (the paper's geometric update), so that C tracks the gamma-quantile of the update norms. The count
  is released too: by the paper's theorem the pair (sum, count) is one Gaussian mechanism of noise
  multiplier z = (z_Delta^-2 + (2 sigma_b)^-2)^-1/2, so the updates get z_Delta = (z^-2 - (2 sigma_b)^-2)^-1/2
  for the configured z = dp.noise_multiplier, and the budget depends on z alone, adaptive or not.
  sigma_b defaults to m / 20, the paper's choice.

Accounting. FedBase.draw takes m of the N clients uniformly without replacement, so a round is
dp_accounting's SampledWithoutReplacementDpEvent(N, m, GaussianDpEvent(.)) under the relation that
analysis (Wang, Balle, Kasiviswanathan, AISTATS 2019) is for, replace-one: N is public and one
client's data is replaced by anything. Replacing a client moves the clipped sum by up to 2C (Delta to
-Delta) and the count by up to 1 (sigma_b = 2 sigma_b / 2), so relative to the sensitivity the
Gaussian's noise multiplier is z / 2. epsilon after r rounds is the RDP accountant's for r such
events at dp.delta, reported every round (dp_epsilon in metrics.jsonl) and in results.json. The
schedule is fixed in advance, so dp.target_epsilon refuses to start a run whose num_rounds would
spend more, naming the rounds that fit. Clients that drop out (system.dropout, stragglers) still
count in m and are not credited: the decision is independent of the data, and each round is still
the accounted mechanism or one that releases less, so the reported epsilon stays an upper bound.

Noise comes from generators of (seed, round): DP_NOISE for the sum, DP_CLIP_NOISE for the count, so
a resumed run draws what the uninterrupted one did; C is the transform's state (resume.pt). Not
private, as diagnostics of the simulation: train_loss, dropped_clients and dp_clipped_fraction
(the true share clipped, for tuning C) in the metrics."""
import math
from typing import Optional

import torch
from hydra.utils import get_class
from omegaconf import DictConfig

from src.client.client import ClientUpdate
from src.errors import ConfigError
from src.server.base import Sums
from src.server.fedavg import FedAvgServer
from src.server.robust import Mean
from src.transforms import UpdateTransform
from src.utils.seeding import DP_CLIP_NOISE, DP_NOISE, numpy_rng, torch_generator

COUNT_STDDEV_SHARE = 1 / 20  # Andrew et al.'s sigma_b = m / 20


def config_problems(cfg: DictConfig) -> list[str]:
    """Where dp.enabled cannot compose with the run's other settings (src/config.py validate)."""
    problems = []
    try:
        algo, server = get_class(cfg.algo._target_), get_class(cfg.algo.server._target_)
    except Exception:  # the algo group reports it
        return []
    if not getattr(algo, "clients_are_devices", False):
        problems.append(f"dp.enabled: an update of {algo.__name__} is not one client's (FedSeq's superclients, "
                        "Centralized's pooled data), so no clip bounds one client's influence: use algo=fedavg, "
                        "fedprox or a FedOpt server (fedadam, ...)")
    elif not issubclass(server, FedAvgServer) or server.summed_extras:
        problems.append(f"dp.enabled: {server.__name__} does not aggregate a plain mean of the clients' models "
                        "(what DP-FedAvg clips and noises): use algo=fedavg, fedprox, fedavgm, fedadam, fedadagrad "
                        "or fedyogi")
    elif cfg.algo.server.get("weighting", "samples") != "uniform":
        problems.append("algo.server.weighting: DP-FedAvg bounds each client's share of the mean by 1/m, which "
                        "sample weighting breaks: set algo.server.weighting=uniform")
    if cfg.aggregator._target_ != "src.server.robust.Mean":
        problems.append(f"aggregator: DP-FedAvg adds its noise to the sum of the clipped updates, which "
                        f"{cfg.aggregator._target_} does not compute: use aggregator=mean with dp.enabled=true")
    e = cfg.client.ema
    if e.decay is not None and e.evaluate and e.send == "raw":
        problems.append("client.ema.evaluate: it scores the plain mean of the clients' EMAs, which is neither "
                        "clipped nor noised: use client.ema.evaluate=false (or client.ema.send=ema) with dp.enabled")
    return problems


class Accountant:
    """epsilon at `delta` after some rounds of m-of-N sampling without replacement and a Gaussian of
    noise multiplier z, from dp_accounting's RDP accountant (replace-one). The round's RDP curve is
    computed once (the costly part, about 0.4 s); r rounds are r times it, which is what the
    accountant's compose(event, r) adds up, converted by the library's compute_epsilon."""

    def __init__(self, population: int, per_round: int, noise_multiplier: float, delta: float):
        import dp_accounting  # here: runs without dp need not install it
        from dp_accounting.rdp import RdpAccountant

        self.population, self.per_round, self.z, self.delta = population, per_round, noise_multiplier, delta
        # replace-one moves the clipped sum by up to 2C: the multiplier relative to that is z / 2
        event = dp_accounting.SampledWithoutReplacementDpEvent(
            population, per_round, dp_accounting.GaussianDpEvent(noise_multiplier / 2))
        one = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE).compose(event)
        self.orders, self.round_rdp = one.orders, one.rdp

    def epsilon(self, rounds: int) -> float:
        from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

        return float(compute_epsilon(self.orders, rounds * self.round_rdp, self.delta)[0]) if rounds else 0.0

    def rounds_within(self, target: float, most: int) -> int:
        """The most rounds (up to `most`) whose epsilon is at most `target` (epsilon grows with the rounds)."""
        low, high = 0, most
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if self.epsilon(mid) <= target else (low, mid - 1)
        return low


class CentralDP(UpdateTransform):
    """DP-FedAvg's clip (client side) and noise (on the server's sum), C adapted or fixed."""

    def __init__(self, noise_multiplier: float, clip_norm: float, population: int, per_round: int, seed: int,
                 delta: float, adaptive: bool = False, target_quantile: float = 0.5, clip_lr: float = 0.2,
                 clip_count_stddev: Optional[float] = None):
        self.z, self.clip_norm, self.m, self.seed = noise_multiplier, clip_norm, per_round, seed
        self.adaptive, self.gamma, self.clip_lr = adaptive, target_quantile, clip_lr
        self.sigma_b = clip_count_stddev if clip_count_stddev is not None else COUNT_STDDEV_SHARE * per_round
        if adaptive and not 2 * self.sigma_b > noise_multiplier:
            default = f" (the default m / 20, m = {per_round} clients per round)" if clip_count_stddev is None else ""
            raise ConfigError([
                f"dp.clip_count_stddev: adaptive clipping spends part of the budget on the count, which needs "
                f"2 * clip_count_stddev > dp.noise_multiplier, and here 2 * {self.sigma_b:g} <= {noise_multiplier:g}"
                f"{default}: set dp.clip_count_stddev above {noise_multiplier / 2:g} (e.g. {noise_multiplier:g}), "
                "or lower dp.noise_multiplier"])
        # the updates' share of the noise (all of it with a fixed C)
        self.z_delta = (noise_multiplier ** -2 - (2 * self.sigma_b) ** -2) ** -0.5 if adaptive else noise_multiplier
        self.accountant = Accountant(population, per_round, noise_multiplier, delta)
        self.center = None  # the CenterServer (install)
        self.params: list[str] = []
        self.round = lambda: 0
        self._unclipped: dict[int, torch.Tensor] = {}  # the round's b_i, by sender, until the server has them
        self._reported: list[torch.Tensor] = []  # the b_i of the updates the server sums (admitted ones)
        self._metrics: dict = {}
        self.secure = False  # True under secure aggregation: the noise goes on the secure sum (src/secagg.py)

    def install(self, algo) -> None:
        """Called once by FedBase, after the other transforms: clipping bounds what is sent."""
        floats = [k for k, t in algo.server.global_state.items() if t.is_floating_point()
                  and k not in set(algo.setup.param_names)]
        if floats:
            raise ConfigError([f"dp.enabled: the model has floating-point buffers ({', '.join(floats[:3])}, e.g. "
                               "BatchNorm running statistics) that would reach the server neither clipped nor "
                               "noised: use a model without them (model.norm=group for resnet20)"])
        if type(algo.server.aggregator) is not Mean:
            raise ConfigError(["aggregator: dp.enabled needs aggregator=mean"])
        self.center, self.params = algo.server, list(algo.setup.param_names)
        self.round = lambda: algo.round  # while training: the round, from 0; after it: the rounds completed
        algo.server.aggregator = NoisyMean(self)
        algo.transforms.append(self)

    # ---- client side ---------------------------------------------------------------------------
    def client(self, update: ClientUpdate, client_id: int, store) -> ClientUpdate:
        g = self.center.global_state  # the round's start: unchanged until the round is aggregated
        w = [update.state[k] for k in self.params]
        norm = torch.stack(torch._foreach_norm(torch._foreach_sub(w, [g[k] for k in self.params]))).norm()
        factor = (self.clip_norm / norm).clamp(max=1.0)  # norm 0: inf, clamped to 1
        self._unclipped[client_id] = norm <= self.clip_norm
        # lerp with weight 1 returns w exactly: an update within the bound is sent as trained
        clipped = {k: torch.lerp(g[k], t, factor.to(t.dtype)) for k, t in zip(self.params, w)}
        return update._replace(state={**update.state, **clipped})

    # ---- server side ---------------------------------------------------------------------------
    def server(self, update: ClientUpdate) -> ClientUpdate:
        if not self.secure:  # under secagg the count arrives inside the secure sum
            self._reported.append(self._unclipped.pop(update.sender))
        return update

    def unclipped(self, sender: int) -> torch.Tensor:
        """b_i of `sender`'s update, for secure aggregation to sum with the update."""
        return self._unclipped.pop(sender)

    def noisy_mean(self, mean: dict[str, torch.Tensor], sums: Sums, g: dict[str, torch.Tensor]) -> dict:
        """G + (sum of the clipped deltas + N(0, (z_Delta C)^2)) / m, from the round's uniform mean.
        `sums.updates` is not kept: the sum is count * (mean - G)."""
        scaled = {k: (mean[k] - g[k]) * (sums.count / self.m) for k in self.params}
        unclipped = float(torch.stack(self._reported).sum())  # the round's one host sync
        return {**mean, **self.release(scaled, unclipped, sums.count, g)}

    def release(self, scaled_sum: dict[str, torch.Tensor], unclipped: float, count: int,
                g: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The noisy parameters G + scaled_sum + N(0, (z_Delta C)^2) / m, `scaled_sum` the sum of the
        `count` clipped deltas divided by m, `unclipped` how many of them were not clipped; then C's
        adaptive step."""
        round_idx = self.round()
        gen = torch_generator(next(iter(g.values())).device, self.seed, DP_NOISE, round_idx)
        std = self.z_delta * self.clip_norm
        noisy = {}
        for k in self.params:
            noise = torch.randn(g[k].shape, generator=gen, device=g[k].device, dtype=g[k].dtype)
            noisy[k] = g[k] + scaled_sum[k] + noise * (std / self.m)
        self._metrics = {"dp_clip_norm": self.clip_norm, "dp_noise_std": std / self.m,
                         "dp_clipped_fraction": 1 - unclipped / count}
        if self.adaptive:
            b_bar = (unclipped + numpy_rng(self.seed, DP_CLIP_NOISE, round_idx).normal(0.0, self.sigma_b)) / self.m
            self.clip_norm *= math.exp(-self.clip_lr * (b_bar - self.gamma))
            self._metrics["dp_unclipped_estimate"] = b_bar
        return noisy

    def round_metrics(self) -> dict:
        """The last round's, with epsilon after it (every round, whether it aggregated or not). FedBase
        asks once the round is counted: algo.round is then the number of rounds completed."""
        metrics = {**self._metrics, "dp_epsilon": self.accountant.epsilon(self.round())}
        self._metrics, self._unclipped, self._reported = {}, {}, []
        return metrics

    def results(self, rounds: int) -> dict:
        return {"dp_epsilon": self.accountant.epsilon(rounds), "dp_delta": self.accountant.delta,
                "dp_noise_multiplier": self.z, "dp_clip_norm": self.clip_norm}

    def state_dict(self) -> dict:
        return {"clip_norm": self.clip_norm}

    def load_state_dict(self, state: dict) -> None:
        self.clip_norm = state["clip_norm"]


class NoisyMean(Mean):
    """aggregator=mean under DP: the server's uniform mean, clipped updates summed, noise added."""

    def __init__(self, dp: CentralDP):
        super().__init__()
        self.dp = dp

    def __call__(self, sums: Sums, center: dict[str, torch.Tensor]) -> Optional[dict[str, torch.Tensor]]:
        mean = sums.mean.result()
        if mean is None or self.dp.secure:  # secure aggregation hands over one update, already noised
            return mean
        return self.dp.noisy_mean(mean, sums, center)

    def metrics(self) -> dict:
        return self.dp.round_metrics()


def install(algo, settings: DictConfig) -> Optional[CentralDP]:
    """The `dp:` settings into FedBase `algo` (None with dp.enabled=false). Refuses, before anything is
    written, a run whose num_rounds would spend more than dp.target_epsilon."""
    if not settings.enabled:
        return None
    per_round = len(algo.draw(0, len(algo.clients)))
    if not settings.delta < 1 / len(algo.clients):
        raise ConfigError([f"dp.delta: {settings.delta:g} is not below 1 / {len(algo.clients)} clients, a level at "
                           "which one client's data could be published outright: lower it (e.g. dp.delta=1e-5)"])
    dp = CentralDP(settings.noise_multiplier, settings.clip_norm, len(algo.clients), per_round, algo.cfg.seed,
                   settings.delta, settings.adaptive, settings.target_quantile, settings.clip_lr,
                   settings.clip_count_stddev)
    target, rounds = settings.target_epsilon, algo.num_rounds
    if target is not None and dp.accountant.epsilon(rounds) > target:
        fit = dp.accountant.rounds_within(target, rounds)
        raise ConfigError([
            f"dp.target_epsilon: {rounds} rounds of {per_round} of {len(algo.clients)} clients at "
            f"dp.noise_multiplier={dp.z:g} spend epsilon {dp.accountant.epsilon(rounds):.4g} at "
            f"dp.delta={dp.accountant.delta:g}, over the target {target:g}; "
            + (f"{fit} rounds fit: set num_rounds={fit}, or raise" if fit else "not even one round fits: raise")
            + " dp.noise_multiplier (or dp.target_epsilon)"])
    dp.install(algo)
    return dp

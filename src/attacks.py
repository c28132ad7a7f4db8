"""Simulated attackers (config/attack/): a fixed share of the federation is malicious and poisons
what it trains on or what it sends; `attack=none` changes nothing.

The malicious clients are `round(fraction * number of clients)` of them, drawn once from the run
seed alone (seeding stream MALICIOUS), so they are the same across resume and need no state. Every
kind attacks the trainable parameters only: buffers (BatchNorm statistics, counters) are sent as
trained. An update counts as an attacker's when its sender (update.sender: the client, a FedSeq
chain's last one) is malicious. G is the global model the round started from, w_i a client's
trained weights:
- label_flip (data poisoning): malicious clients train on the labels y -> C - 1 - y.
- sign_flip / scaled: a malicious client sends G - lambda (w_i - G) (lambda = `scale`; 1: sign flip).
- gaussian: a malicious client sends G + N(0, sigma^2), noise from a generator of (seed, round, client).
- model_replacement (Bagdasaryan et al., "How To Backdoor Federated Learning", AISTATS 2020):
  X = G + gamma (w_i - G), gamma = n / eta, n the clients drawn per round and eta the server's
  learning rate (1 for FedAvg), so that FedAvg's step replaces G by about w_i.
- alie (Baruch et al., "A Little Is Enough: Circumventing Defenses For Distributed Learning",
  NeurIPS 2019, Algorithm 3): the attackers, who see the round's honest updates, all send
  mean - z * std of them, coordinate by coordinate (sample std), with the paper's
  z_max = Phi^-1((n - s) / n), s = floor(n / 2 + 1) - f for n updates and f attackers in the round.

Per round, metrics.jsonl records `attackers_selected` (the round's trained updates sent by
attackers, admitted or dropped as non-finite) and, with an aggregator that keeps some updates
(Krum, Bulyan: `last_selected`), `attackers_kept` (how many of those it kept came from attackers)."""
import logging
from statistics import NormalDist
from typing import Optional

import torch

from src.client.client import ClientUpdate
from src.hooks import RoundHook
from src.transforms import UpdateTransform
from src.utils.seeding import ATTACK_NOISE, MALICIOUS, numpy_rng, torch_generator

log = logging.getLogger(__name__)


class NoAttack:
    """attack=none: every client is honest."""

    def check(self, cfg) -> list[str]:
        return []

    def install(self, algo) -> None:
        pass


class Attack(UpdateTransform):
    """The malicious set and what every kind shares; `arm` installs the kind's own part. It is an
    update transform of every run it attacks, so that it sees every update trained (the metrics)."""

    name = "attack"

    def __init__(self, fraction: float = 0.2):
        if not 0 <= fraction < 1:
            raise ValueError(f"fraction is the malicious share of the clients, in [0, 1), got {fraction}")
        self.fraction = fraction
        self.malicious: frozenset[int] = frozenset()

    def draw(self, seed: int, num_clients: int) -> frozenset[int]:
        """round(fraction * num_clients) clients, from the run seed alone."""
        count = round(self.fraction * num_clients)
        return frozenset(numpy_rng(seed, MALICIOUS).choice(num_clients, count, replace=False).tolist())

    def check(self, cfg) -> list[str]:
        """Problems with the run's other settings, found at start-up (src/config.py)."""
        return []

    def install(self, algo) -> None:
        """Called once by FedBase, after its clients, server, transforms and hooks exist."""
        self.malicious = self.draw(algo.cfg.seed, len(algo.clients))
        # `center`, the CenterServer (an UpdateTransform's `server` is its server-side method)
        self.seed, self.center, self.params = algo.cfg.seed, algo.server, set(algo.setup.param_names)
        self.round = lambda: algo.round  # the round being trained, from 0
        if self.malicious:
            log.info("attack %s: %d of %d clients are malicious: %s", self.name, len(self.malicious),
                     len(algo.clients), sorted(self.malicious))
        else:
            log.warning("attack %s: attack.fraction=%s of %d clients rounds to no malicious client: the run is "
                        "attack-free", self.name, self.fraction, len(algo.clients))
        self.metrics = AttackMetrics(self.malicious, algo.server)
        algo.hooks.insert(0, self.metrics)  # before the recorder writes the round's metrics
        algo.transforms.append(self)
        self.arm(algo)

    def arm(self, algo) -> None:
        """The kind's own part (a client-side one needs nothing more)."""

    def client(self, update: ClientUpdate, client_id: int, store) -> ClientUpdate:
        self.metrics.trained(client_id)
        return update

    def sent(self, update: ClientUpdate, parameters: dict[str, torch.Tensor]) -> ClientUpdate:
        """`update` with these parameters instead of the trained ones."""
        return update._replace(state={**update.state, **parameters})


class LabelFlip(Attack):
    """Malicious clients train on y -> C - 1 - y (a fixed permutation, the same for every one)."""

    name = "label_flip"

    def arm(self, algo) -> None:
        self.num_classes = algo.spec.num_classes
        for cid in self.malicious:
            algo.clients[cid].label_map = self.flip

    def flip(self, y: torch.Tensor) -> torch.Tensor:
        return self.num_classes - 1 - y


class ClientSide(Attack):
    """An attack on what a malicious client sends, right after its training."""

    def client(self, update: ClientUpdate, client_id: int, store) -> ClientUpdate:
        update = super().client(update, client_id, store)
        if client_id not in self.malicious:
            return update
        g = self.center.global_state  # the round's start: unchanged until the round is aggregated
        return self.sent(update, self.crafted(update, client_id, g))

    def crafted(self, update: ClientUpdate, client_id: int, g: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The parameters a malicious client sends instead of its trained ones."""
        raise NotImplementedError


class AroundGlobal(ClientSide):
    """A malicious client sends G + factor * (w_i - G)."""

    factor: float

    def crafted(self, update, client_id, g):
        return {k: torch.lerp(g[k], w, self.factor) for k, w in update.state.items() if k in self.params}


class Scaled(AroundGlobal):
    """G - scale * (w_i - G): scale=1 is the sign flip (sign_flip.yaml), larger ones push further."""

    name = "scaled"

    def __init__(self, fraction: float = 0.2, scale: float = 1.0):
        super().__init__(fraction)
        if not scale > 0:
            raise ValueError(f"scale is lambda in G - lambda (w - G), > 0, got {scale}")
        self.factor = -scale


class ModelReplacement(AroundGlobal):
    """Bagdasaryan et al.'s boost gamma = n / eta (or `boost`): n the clients drawn per round (a
    FedSeq round's superclients are not counted: set attack.boost), eta the server's learning rate
    (a server without one, FedAvg's, steps by 1)."""

    name = "model_replacement"

    def __init__(self, fraction: float = 0.2, boost: Optional[float] = None):
        super().__init__(fraction)
        if boost is not None and not boost > 0:
            raise ValueError(f"boost is gamma in G + gamma (w - G), > 0 (null: n / eta), got {boost}")
        self.boost = boost

    def arm(self, algo) -> None:
        n = len(algo.draw(0, len(algo.clients)))  # the count drawn is the same every round
        self.factor = self.boost if self.boost is not None else n / getattr(algo.server, "lr", 1.0)
        log.info("model_replacement: boost gamma = %s", self.factor)
        super().arm(algo)


class Gaussian(ClientSide):
    """A malicious client sends G + N(0, sigma^2), one generator per (seed, round, client)."""

    name = "gaussian"

    def __init__(self, fraction: float = 0.2, sigma: float = 1.0):
        super().__init__(fraction)
        if not sigma > 0:
            raise ValueError(f"sigma is the noise's standard deviation, > 0, got {sigma}")
        self.sigma = sigma

    def crafted(self, update, client_id, g):
        device = next(iter(g.values())).device
        gen = torch_generator(device, self.seed, ATTACK_NOISE, self.round(), client_id)
        return {k: g[k] + self.sigma * torch.randn(g[k].shape, generator=gen, device=device, dtype=g[k].dtype)
                for k in update.state if k in self.params}


def alie_z(n: int, f: int) -> float:
    """Baruch et al.'s z_max for n updates of which f are the attackers': s = floor(n/2 + 1) - f
    honest updates must be won over, z = Phi^-1((n - s) / n). With f >= floor(n/2 + 1) the paper's
    s is not positive and no finite z satisfies it: s = 1 is used there."""
    s = max(n // 2 + 1 - f, 1)
    return NormalDist().inv_cdf((n - s) / n)


class ALIE(Attack):
    """Every malicious update of a round becomes mean - z * std of the round's honest updates
    (unweighted, sample std), through the server's intercept seam: the attackers see the whole
    round before anything is summed. `z` null: alie_z(n, f) of the round."""

    name = "alie"

    def __init__(self, fraction: float = 0.2, z: Optional[float] = None):
        super().__init__(fraction)
        if z is not None and not z >= 0:
            raise ValueError(f"z is the number of standard deviations below the mean, >= 0 (null: the paper's "
                             f"z_max), got {z}")
        self.z = z

    def check(self, cfg) -> list[str]:
        c = cfg.clients
        n = c.num_per_round if c.num_per_round is not None else max(1, round(c.per_round * c.total))
        attackers = round(self.fraction * n)
        if n - attackers >= 2:
            return []
        return [f"attack: alie takes the std of a round's honest updates, so it needs at least 2 of them, but with "
                f"{n} clients per round and attack.fraction={self.fraction} a round has about {n - attackers}: raise "
                "clients.per_round (or clients.num_per_round) or lower attack.fraction"]

    def arm(self, algo) -> None:
        algo.server.intercept = self.collude

    def collude(self, updates: list[ClientUpdate]) -> list[ClientUpdate]:
        bad = [u.sender in self.malicious for u in updates]
        honest = [u for u, b in zip(updates, bad) if not b]
        if not any(bad):
            return updates
        if len(honest) < 2:
            log.warning("round %d: alie needs 2 honest updates for their std, the round has %d: its attackers send "
                        "what they trained", self.round() + 1, len(honest))
            return updates
        z = self.z if self.z is not None else alie_z(len(updates), sum(bad))
        crafted = {}
        for k in honest[0].state:
            if k in self.params:
                stacked = torch.stack([u.state[k] for u in honest])
                crafted[k] = stacked.mean(0) - z * stacked.std(0)
        return [self.sent(u, crafted) if b else u for u, b in zip(updates, bad)]


class AttackMetrics(RoundHook):
    """attackers_selected: the round's trained updates sent by attackers (whether admitted or then
    dropped as non-finite) and, with an aggregator that exposes `last_selected` (positions, in
    accumulation order, of the updates it kept), attackers_kept. The round's updates reach the
    server in the order they are admitted, which is the order this hook sees them in."""

    def __init__(self, malicious: frozenset[int], server):
        self.malicious, self.server = malicious, server
        self.on_round_start()

    def on_round_start(self) -> None:
        self.selected, self.from_attacker = 0, []

    def trained(self, sender: int) -> None:
        self.selected += sender in self.malicious

    def on_update(self, update: ClientUpdate) -> None:
        self.from_attacker.append(update.sender in self.malicious)

    def on_round_end(self, metrics: dict) -> None:
        metrics["attackers_selected"] = self.selected
        kept = getattr(getattr(self.server, "aggregator", None), "last_selected", None)
        if kept is not None and self.from_attacker:
            metrics["attackers_kept"] = sum(self.from_attacker[int(p)] for p in kept)

"""System heterogeneity (the `system:` settings): selected clients that fail to report, and clients
too slow to finish their local work by the round's deadline.

- Dropout: each selected client fails to report with probability `dropout`. It is left out before
  it trains: its result would be discarded anyway and nothing it would compute reaches the server
  or its persisted state, so skipping it gives the same round as training and discarding it, for
  none of the cost.
- Stragglers: client k has a speed s_k ~ lognormal(0, `speed_sigma`) (median 1) and the round a
  deadline of `deadline_steps` local steps of a speed-1 client, so k can do floor(deadline * s_k)
  steps. One with fewer than its full round's steps is a straggler: `stragglers=drop` leaves it out
  (FedAvg's practice as Li et al., MLSys 2020, Sec. 5 describe it: devices that do not finish their
  epochs in time are dropped), `stragglers=partial` aggregates the steps it completed (FedProx's
  setting there: "partial work" by 0%, 50% or 90% stragglers). A partial client takes the first
  steps of its full round (same batches); its LR schedule stays the one laid out for the full
  round. A client whose budget is 0 steps has nothing to send and is left out in both modes.
- `speed=fixed` (the default) draws one speed per client for the whole run: a slow device stays
  slow, so the same clients do less work round after round, the persistent imbalance that biases
  FedAvg's objective (Wang et al. 2020); `speed=round` draws them again every round (transient
  slowdowns).

Every decision is a pure function of (seed, round, client): the draws come from streams of their
own (DROPOUT, SPEED), made for the whole federation at once and indexed by client id, so they do
not depend on who else was selected, in what order the clients train, or whether the run was
resumed (nothing to checkpoint), and the selection and data streams are never touched: with the
defaults a run is bit for bit what it was without this module.

A round in which no selected client reports aggregates nothing: the global model and the
server's state stay as they were (CenterServer.aggregate), a warning says so, and the round's
metrics have reported 0 and train_loss null. Recorded per round: dropped_out, stragglers,
reported, local_steps_mean / local_steps_min over the reporting clients, and local_steps (client
id -> steps) when at most LIST_AT_MOST clients report."""
import logging
from typing import Callable, Literal, Optional

import numpy as np

from src.engine import Chain
from src.hooks import RoundHook
from src.utils.seeding import DROPOUT, SPEED, numpy_rng

log = logging.getLogger(__name__)

LIST_AT_MOST = 20  # per-client step counts in the metrics up to this many reporting clients


class SystemModel(RoundHook):
    def __init__(self, seed: int, num_clients: int, full_steps: Callable[[Chain], int], dropout: float = 0.0,
                 speed_sigma: float = 0.0, speed: Literal["fixed", "round"] = "fixed",
                 deadline_steps: Optional[int] = None, stragglers: Literal["drop", "partial"] = "drop"):
        """`full_steps(chain)`: the local steps of the chain's client in a round without a deadline."""
        self.seed, self.num_clients, self.full_steps = seed, num_clients, full_steps
        self.dropout, self.speed_sigma, self.speed = dropout, speed_sigma, speed
        self.deadline_steps, self.stragglers = deadline_steps, stragglers
        self.fixed_speeds = self.speeds(None) if speed == "fixed" else None
        self.stats: dict = {}

    @property
    def enabled(self) -> bool:
        return self.dropout > 0 or self.deadline_steps is not None

    def speeds(self, round_idx: Optional[int]) -> np.ndarray:
        """Every client's speed, drawn once for the run (speed=fixed) or for round `round_idx`."""
        keys = (self.seed, SPEED) if round_idx is None else (self.seed, SPEED, round_idx)
        return numpy_rng(*keys).lognormal(0.0, self.speed_sigma, self.num_clients)

    def plan(self, round_idx: int, chains: list[Chain]) -> list[Chain]:
        """The chains (of one client each) that report in round `round_idx`, a partial straggler's
        with its step budget; records the round's counts."""
        if not self.enabled:
            return chains
        ids = np.array([chain.sender.client_id for chain in chains], dtype=np.int64)
        failed = numpy_rng(self.seed, DROPOUT, round_idx).random(self.num_clients)[ids] < self.dropout
        full = np.array([self.full_steps(chain) for chain in chains], dtype=np.int64)
        if self.deadline_steps is None:
            budget = full
        else:
            speeds = self.fixed_speeds if self.fixed_speeds is not None else self.speeds(round_idx)
            budget = np.floor(self.deadline_steps * speeds[ids]).astype(np.int64)
        late = ~failed & (budget < full)
        steps = np.minimum(budget, full)
        reports = ~failed & (steps > 0) & (~late if self.stragglers == "drop" else True)
        kept = [chain if not late[i] else chain._replace(links=[chain.links[0]._replace(max_steps=int(steps[i]))])
                for i, chain in enumerate(chains) if reports[i]]
        done = steps[reports]
        self.stats = {"dropped_out": int(failed.sum()), "stragglers": int(late.sum()), "reported": len(kept),
                      "local_steps_mean": float(done.mean()) if len(done) else None,
                      "local_steps_min": int(done.min()) if len(done) else None}
        if len(done) <= LIST_AT_MOST:
            self.stats["local_steps"] = {str(c): int(s) for c, s in sorted(zip(ids[reports], done))}
        if chains and not kept:
            log.warning("round %d: none of the %d selected clients reports (%d dropped out, %d stragglers): the "
                        "global model and the server state stay as they are", round_idx + 1, len(chains),
                        self.stats["dropped_out"], self.stats["stragglers"])
        return kept

    def on_round_start(self) -> None:
        self.stats = {}

    def on_round_end(self, metrics: dict) -> None:
        metrics.update(self.stats)
        if self.stats.get("reported") == 0:
            metrics["train_loss"] = float("nan")  # no client trained: null in metrics.jsonl, not a loss of 0

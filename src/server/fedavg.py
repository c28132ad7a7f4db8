"""FedAvg aggregation (McMahan et al., AISTATS 2017, Algorithm 1: w <- sum_k n_k/n w_k) and
FairAvg's uniform weights (Michieli & Ozay, "Are all users treated fairly in federated learning
systems?", 2021: w <- 1/|S| sum_k w_k)."""
from typing import Iterable, Literal

import torch

from src.client.client import ClientUpdate
from src.server.base import CenterServer


class FedAvgServer(CenterServer):
    """Weighted mean of client weights, kept as a running sum. Floating-point buffers (BatchNorm
    running statistics) are averaged like parameters; integer buffers (BatchNorm's
    num_batches_tracked) are taken from the last client."""

    def __init__(self, weighting: Literal["samples", "uniform"] = "samples"):
        super().__init__()
        if weighting not in ("samples", "uniform"):
            raise ValueError(f"weighting must be 'samples' or 'uniform', got {weighting!r}")
        self.weighting = weighting

    def client_weight(self, update: ClientUpdate) -> float:
        return float(update.num_samples) if self.weighting == "samples" else 1.0

    def aggregate(self, updates: Iterable[ClientUpdate]) -> None:
        floats = [k for k, v in self.global_state.items() if v.is_floating_point()]
        acc = [torch.zeros_like(self.global_state[k]) for k in floats]
        total, last = 0.0, None
        for update in updates:
            w = self.client_weight(update)
            torch._foreach_add_(acc, [update.state[k] for k in floats], alpha=w)
            total += w
            last = update
        if last is None:
            return
        torch._foreach_div_(acc, total)
        for k, v in zip(floats, acc):
            self.global_state[k] = v
        for k in self.global_state.keys() - set(floats):
            self.global_state[k] = last.state[k].clone()

"""FedAvg aggregation (McMahan et al., AISTATS 2017, Algorithm 1: w <- sum_k n_k/n w_k) and
FairAvg's uniform weights (Michieli & Ozay, "Are all users treated fairly in federated learning
systems?", 2021: w <- 1/|S| sum_k w_k)."""
import torch

from src.server.base import CenterServer, Sums, WeightedMean

__all__ = ["FedAvgServer", "WeightedMean"]  # WeightedMean lives in base; importable from here as before


class FedAvgServer(CenterServer):
    """Weighted mean of the client weights (CenterServer's `weighting`: samples or uniform)."""

    def server_update(self, mean: dict[str, torch.Tensor], sums: Sums) -> None:
        self.global_state = {k: mean[k] for k in self.global_state}

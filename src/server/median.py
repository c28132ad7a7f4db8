"""Coordinate-wise median (Yin et al., "Byzantine-Robust Distributed Learning: Towards Optimal
Statistical Rates", ICML 2018, Option I): every floating-point entry of the next global model is
the median, coordinate by coordinate, of the client models (the mean of the two middle values for
an even number of clients). Fewer than half of the clients sending arbitrary weights cannot move
it outside the range of the honest ones. Unweighted, as in the paper; integer buffers
(num_batches_tracked) come from the last client, as FedAvg takes them."""
import torch

from src.server.base import CenterServer, Sums


def median(stacked: torch.Tensor) -> torch.Tensor:
    """The median along dimension 0."""
    ordered = stacked.sort(dim=0).values
    k = ordered.shape[0]
    return (ordered[(k - 1) // 2] + ordered[k // 2]) / 2


class MedianServer(CenterServer):
    needs_all_updates = True  # the median needs every update at once: sums.stacked() holds owned copies

    def __init__(self):
        super().__init__("uniform")

    def server_update(self, mean: dict[str, torch.Tensor], sums: Sums) -> None:
        stacked = sums.stacked()
        self.global_state = {k: median(stacked[k]) if v.is_floating_point() else mean[k]
                             for k, v in self.global_state.items()}

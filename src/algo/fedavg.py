"""FedAvg (McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
Data", AISTATS 2017, Algorithm 1). The server decides the weighting: by sample count (FedAvg) or
uniform (FairAvg), see config/algo/."""
from src.algo.fedbase import FedBase


class FedAvg(FedBase):
    def train_step(self) -> None:
        selected = self.select_clients(self.round)
        self.server.aggregate(self.client_updates(selected))

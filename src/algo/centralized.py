"""Centralized: the same trainer, switches and round loop on the union of all client data, for
measuring the FL-versus-centralized gap. A "round" is the clients' local work (client.local_epochs
or client.local_steps) done on the whole training set."""
import torch

from src.algo.fedavg import FedAvg
from src.client.client import Client


class Centralized(FedAvg):
    clients_are_devices = False  # one trainer on all the data: system.* (dropout, stragglers) is refused

    def build_clients(self, indices: list[torch.Tensor]) -> list[Client]:
        return [self.client_factory(0, torch.cat(indices), self.setup)]

    def select_clients(self, round_idx: int) -> list[Client]:
        return self.clients

from src.server.base import CenterServer
from src.server.fedavg import FedAvgServer

__all__ = ["CenterServer", "FedAvgServer"]

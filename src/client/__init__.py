from src.client.client import Client, ClientUpdate, TrainSetup

__all__ = ["Client", "ClientUpdate", "TrainSetup"]

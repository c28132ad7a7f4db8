"""Update transforms: an ordered list applied to each client's update, client side right after
local training (by the engine) and server side right before accumulation (by CenterServer.aggregate).

A transform is the place for compression, clipping, noise or secure-aggregation masks; the base
class is the identity, so a subclass overrides only the side it acts on. Its state_dict is saved
with the run's checkpoint; per-client state belongs in the client state store passed to client()."""
from src.client.client import ClientUpdate


class UpdateTransform:
    def client(self, update: ClientUpdate, client_id: int, store) -> ClientUpdate:
        return update

    def server(self, update: ClientUpdate) -> ClientUpdate:
        return update

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

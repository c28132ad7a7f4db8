"""The sequential engine: one working model, chains trained one after another, clients in order."""
from typing import Callable, Iterator, Optional, Sequence

from src.client.client import Client, ClientUpdate
from src.engine.base import Chain, Engine, join, only


class SequentialEngine(Engine):
    def train(self, chains: Sequence[Chain], round_idx: int, send: Callable[[], dict], *, transforms: Sequence = (),
              merge: Callable[[list[Optional[dict]]], Optional[dict]] = only,
              check_stop: Callable[[], None] = lambda: None) -> Iterator[tuple[Chain, ClientUpdate]]:
        for chain in chains:
            received = send()
            updates = []
            for i, (client, stream, max_steps) in enumerate(chain.links):
                check_stop()
                self.hand_over(client, received, first=i == 0)
                client.client_update(round_idx, stream=stream, max_steps=max_steps)
                updates.append(client.send_data())
            update = join(updates, chain, merge)
            for t in transforms:
                update = t.client(update, chain.sender.client_id, chain.sender.setup.store)
            yield chain, update

    def hand_over(self, client: Client, received: dict, first: bool) -> None:
        """The first client of a chain loads the global weights; the others get the same server data
        (the FedProx / FedDyn anchor) but keep training the chain's current weights."""
        if first:
            client.receive_data(received)
        else:
            client.received = received

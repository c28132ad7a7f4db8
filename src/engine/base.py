"""Engine: trains a round's chains of clients and yields one update per chain.

A chain is a list of clients trained one after another from the global model: the first loads it,
the later ones keep training the weights the previous one left (every one of them receives the
server's data, the FedProx / FedDyn anchor). A FedAvg client is a chain of one, a FedSeq superclient
a chain (one link per client and pass), Centralized one chain. A link's batches come from a
generator that depends only on (seed, round, client, stream), so an engine may train chains in any
order or at once (a batched engine) or on other processes (a distributed engine) and get the same
numbers; what it must keep is the chain's order within a chain and one update per chain."""
from abc import ABC, abstractmethod
from functools import reduce
from typing import Callable, Iterator, NamedTuple, Optional, Sequence

import torch

from src.client.client import Client, ClientUpdate, TrainSetup


class Link(NamedTuple):
    client: Client
    stream: int = 0  # > 0: a client's second training in a round draws new batches (FedSeq's passes)
    max_steps: Optional[int] = None  # a straggler's step budget (src/system.py); None: all its steps


class Chain(NamedTuple):
    links: list[Link]  # in training order
    num_samples: int  # the update's weight (a superclient's: its clients' samples)
    label: str  # names the chain in messages

    @classmethod
    def of(cls, client: Client) -> "Chain":
        return cls([Link(client)], client.num_samples, f"client {client.client_id}")

    @property
    def members(self) -> list[Client]:
        """Its distinct clients, in first-training order."""
        return list({id(link.client): link.client for link in self.links}.values())

    @property
    def sender(self) -> Client:
        """The client that sends the chain's update (its last): client transforms see its id."""
        return self.links[-1].client


def only(payloads: list[Optional[dict]]) -> Optional[dict]:
    """The payload of a chain of one."""
    (payload,) = payloads
    return payload


def join(updates: list[ClientUpdate], chain: Chain, merge: Callable) -> ClientUpdate:
    """One update from those of a chain's links: the last weights (and EMA), the summed training
    loss and samples, and `merge` of the payloads (in training order), sent by the chain's sender."""
    last = updates[-1]
    return ClientUpdate(last.state, chain.num_samples, reduce(torch.add, [u.loss_sum for u in updates]),
                        sum(u.samples_seen for u in updates), last.ema_state, merge([u.extra for u in updates]),
                        chain.sender.client_id)


class Engine(ABC):
    rank = 0  # this process among those of a distributed run (src/engine/distributed.py): 0 writes the run directory

    @abstractmethod
    def train(self, chains: Sequence[Chain], round_idx: int, send: Callable[[], dict], *, transforms: Sequence = (),
              merge: Callable[[list[Optional[dict]]], Optional[dict]] = only,
              check_stop: Callable[[], None] = lambda: None) -> Iterator[tuple[Chain, ClientUpdate]]:
        """Train `chains` in round `round_idx` and yield (chain, update) for each as it is ready.
        `send()` is what the server sends a chain; `transforms` (UpdateTransform) apply in order to
        each chain's update, client side; `merge` makes one payload from a chain's; `check_stop` is
        called before every client trains (the signal boundary). An update's tensors may be views
        of the working model, valid until the engine trains the next chain."""

    def prepare(self, setup: TrainSetup, clients: Sequence[Client]) -> None:
        """Called once the run is built, before anything is written: refuse (ConfigError) the
        settings this engine cannot train."""

    def agree_stop(self, signum: Optional[int]) -> Optional[int]:
        """The stop signal every process acts on at a round's end (one process: its own, `signum`)."""
        return signum

    def batches(self, count: int) -> range:
        """Which of `count` evaluation batches this process scores (one process: all)."""
        return range(count)

    def combine(self, rows: torch.Tensor) -> torch.Tensor:
        """`rows` summed over the processes, each row filled by the one process that scored it (exact:
        the others hold zeros)."""
        return rows

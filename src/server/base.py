"""CenterServer: holds the global model state and turns client updates into the next one.

aggregate() is one pipeline for every server: each update goes through the server-side transforms,
then accumulate() adds it to the round's Sums (the weighting, samples or uniform, is applied there
and nowhere else); reduce() combines the sums (the identity in one process); server_update(mean,
sums) turns them into the next global state. An algorithm overrides server_update, names the
payloads it sums (`summed_extras`), and sets `needs_all_updates` if it must see every update."""
from abc import ABC, abstractmethod
from typing import Callable, Iterable, Literal, Optional

import torch

from src.client.client import ClientUpdate

Weighting = Literal["samples", "uniform"]


class WeightedMean:
    """Running weighted mean of state dicts, one at a time (memory does not grow with the number
    of clients). Floating-point entries (parameters, BatchNorm running statistics) are averaged;
    integer buffers (BatchNorm's num_batches_tracked) are taken from the last state added."""

    def __init__(self, template: dict[str, torch.Tensor]):
        self.floats = [k for k, v in template.items() if v.is_floating_point()]
        self.ints = [k for k in template if k not in set(self.floats)]
        self.acc = [torch.zeros_like(template[k]) for k in self.floats]
        self.total = 0.0
        self.last: Optional[dict[str, torch.Tensor]] = None

    def add(self, state: dict[str, torch.Tensor], weight: float) -> None:
        torch._foreach_add_(self.acc, [state[k] for k in self.floats], alpha=weight)
        self.total += weight
        self.last = state

    def result(self) -> Optional[dict[str, torch.Tensor]]:
        """The mean (None if nothing was added)."""
        if self.last is None:
            return None
        torch._foreach_div_(self.acc, self.total)
        return {**dict(zip(self.floats, self.acc)), **{k: self.last[k].clone() for k in self.ints}}


def owned(value):
    """A copy of an update's tensors (nested in dicts), sharing no memory with the working model."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: owned(v) for k, v in value.items()}
    return value


def owned_update(update: ClientUpdate) -> ClientUpdate:
    """`update` with owned copies of its tensors."""
    return update._replace(state=owned(update.state), ema_state=owned(update.ema_state), extra=owned(update.extra))


class Sums:
    """What a round's updates add up to: the weighted sum of the states (`mean`, divided only once
    the sums are reduced), the plain sum of each payload in `extras` (update.extra[key], one tensor
    per parameter) and the number of updates. With `keep`, also every update, as an owned copy,
    and its weight."""

    def __init__(self, template: dict[str, torch.Tensor], param_names: list[str], extras: tuple[str, ...],
                 keep: bool):
        self.mean = WeightedMean(template)
        self.extras = {key: {n: torch.zeros_like(template[n]) for n in param_names} for key in extras}
        self.count = 0
        self.updates: Optional[list[ClientUpdate]] = [] if keep else None
        self.weights: list[float] = []

    def add(self, update: ClientUpdate, weight: float) -> None:
        if self.updates is not None:
            update = owned_update(update)
            self.updates.append(update)
            self.weights.append(weight)
        self.mean.add(update.state, weight)
        for key, acc in self.extras.items():
            torch._foreach_add_(list(acc.values()), [update.extra[key][n] for n in acc])
        self.count += 1

    def stacked(self) -> dict[str, torch.Tensor]:
        """Every kept update's state, one tensor per entry with the updates along dimension 0."""
        return {k: torch.stack([u.state[k] for u in self.updates]) for k in self.updates[0].state}


class CenterServer(ABC):
    # Attributes (dicts of tensors) that hold the server's own state besides the global model
    # (control variates, moments): attach() starts them at zero for every parameter unless they
    # are already set, and state_dict() and load_state_dict() carry them.
    extra_state: tuple[str, ...] = ()
    # Keys of update.extra that are summed over the round's updates (one tensor per parameter).
    summed_extras: tuple[str, ...] = ()
    # True: every update is kept for server_update as an owned copy (sums.updates, sums.stacked()).
    # False: updates are streamed into running sums and may be views of the working model.
    needs_all_updates: bool = False
    # What replaces the weighted mean in aggregate() (src/server/robust.py; FedBase sets the one in
    # config/aggregator/): called with the round's sums and the global model, it returns the state
    # server_update receives as `mean`, or None to leave the round out. None: the weighted mean.
    aggregator = None

    def __init__(self, weighting: Weighting = "samples"):
        if weighting not in ("samples", "uniform"):
            raise ValueError(f"weighting must be 'samples' or 'uniform', got {weighting!r}")
        self.weighting = weighting
        self.global_state: dict[str, torch.Tensor] = {}
        self.param_names: list[str] = []  # trainable entries of global_state (the rest are buffers)
        self.num_clients = 0  # clients in the federation, sampled or not
        self.transforms: list = []  # server-side UpdateTransforms (src/transforms.py), applied in order
        # Sees the whole round before anything is summed: the round's updates (owned copies) in, the
        # ones to aggregate out (src/attacks.py: colluding attackers that read the honest updates).
        self.intercept: Optional[Callable[[list[ClientUpdate]], list[ClientUpdate]]] = None

    def attach(self, param_names: list[str], num_clients: int) -> None:
        """Called once by the controller, before the first round."""
        self.param_names, self.num_clients = list(param_names), num_clients
        for name in self.extra_state:
            if not getattr(self, name):
                setattr(self, name, {n: torch.zeros_like(self.global_state[n]) for n in self.param_names})

    def set_global_state(self, state: dict[str, torch.Tensor]) -> None:
        self.global_state = {k: v.detach().clone() for k, v in state.items()}

    def send_data(self) -> dict:
        """What every selected client receives at the start of its local training."""
        return {"global_state": self.global_state}

    def client_weight(self, update: ClientUpdate) -> float:
        return float(update.num_samples) if self.weighting == "samples" else 1.0

    def aggregate(self, updates: Iterable[ClientUpdate]) -> None:
        """Consume client updates one at a time (a generator: clients train lazily, memory does not
        grow with the number of clients unless needs_all_updates) and update `global_state`. A
        round without updates changes nothing, the server's own state included."""
        keep = self.needs_all_updates or getattr(self.aggregator, "needs_all_updates", False)
        sums = Sums(self.global_state, self.param_names, self.summed_extras, keep=keep)
        if self.intercept is not None:
            updates = self.intercept([owned_update(u) for u in updates])
        for update in updates:
            for transform in self.transforms:
                update = transform.server(update)
            self.accumulate(sums, update)
        sums = self.reduce(sums)
        mean = sums.mean.result() if self.aggregator is None else self.aggregator(sums, self.global_state)
        if mean is not None:  # None: no updates, or too few for the aggregator
            self.server_update(mean, sums)

    def accumulate(self, sums: Sums, update: ClientUpdate) -> None:
        sums.add(update, self.client_weight(update))

    def reduce(self, sums: Sums) -> Sums:
        """Combine the sums of every process: the one place a torch.distributed engine all-reduces
        (the weighted sums, their total weight, the summed extras and the count), before the mean's
        single division. One process: the identity."""
        return sums

    @abstractmethod
    def server_update(self, mean: dict[str, torch.Tensor], sums: Sums) -> None:
        """Set `global_state` from the weighted mean of the round's states (floating-point entries
        averaged, integer buffers the last update's), or the aggregator's state in its place, and
        the sums; only called with updates."""

    def state_dict(self) -> dict:
        state = {"global_state": self.global_state, **{name: getattr(self, name) for name in self.extra_state}}
        aggregator = self.aggregator.state_dict() if self.aggregator is not None else {}
        return {**state, "aggregator": aggregator} if aggregator else state  # only a stateful one's

    def load_state_dict(self, state: dict) -> None:
        self.set_global_state(state["global_state"])
        if "aggregator" in state:
            self.aggregator.load_state_dict(state["aggregator"])
        for name in self.extra_state:
            setattr(self, name, {k: v.detach().clone() for k, v in state[name].items()})

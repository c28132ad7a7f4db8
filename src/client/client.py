"""Client: local training on its own index tensor, with the one working model all clients share."""
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn as nn

from src.data.device_data import DeviceDataset
from src.utils.seeding import CLIENT_DATA, torch_generator


@dataclass
class TrainSetup:
    """Everything local training needs that is the same for every client; built once per run."""

    model: nn.Module  # the single working model, reused by every client in turn
    data: DeviceDataset
    loss_fn: nn.Module
    optimizer: Callable[..., torch.optim.Optimizer]  # partial: params -> optimizer
    batch_size: int
    local_epochs: Optional[int]
    local_steps: Optional[int]
    amp_dtype: Optional[torch.dtype]  # autocast dtype on CUDA; None trains in fp32
    seed: int
    # Detached views of the working model's parameters and buffers: copying into them loads a
    # state without rebuilding the state dict per client.
    live_state: dict[str, torch.Tensor] = field(init=False)

    def __post_init__(self):
        self.live_state = dict(self.model.state_dict())

    def load(self, state: dict[str, torch.Tensor]) -> None:
        torch._foreach_copy_(list(self.live_state.values()), [state[k] for k in self.live_state])

    def num_steps(self, num_samples: int) -> int:
        if self.local_steps is not None:
            return self.local_steps
        return self.local_epochs * -(-num_samples // self.batch_size)


class ClientUpdate(NamedTuple):
    state: dict[str, torch.Tensor]  # the trained weights; views valid until the next client trains
    num_samples: int  # size of the client's dataset (the FedAvg weight)
    loss_sum: torch.Tensor  # training loss summed over the samples seen, still on the device
    samples_seen: int


class Client:
    """One federated client. It owns only its data indices (and, later, persisted state); the
    model and the training recipe live in the shared TrainSetup."""

    def __init__(self, client_id: int, indices: torch.Tensor, setup: TrainSetup):
        self.client_id = client_id
        self.indices = indices
        self.setup = setup
        self._result: Optional[ClientUpdate] = None

    @property
    def num_samples(self) -> int:
        return self.indices.shape[0]

    def receive_data(self, data: dict) -> None:
        self.setup.load(data["global_state"])

    def client_update(self, round_idx: int) -> None:
        """Local SGD on this client's data; batches and augmentation come from a generator that
        depends only on (seed, round, client), so results do not depend on client order."""
        s = self.setup
        model = s.model
        model.train()
        optimizer = s.optimizer(model.parameters())
        gen = torch_generator(self.indices.device, s.seed, CLIENT_DATA, round_idx, self.client_id)
        autocast = torch.autocast("cuda", dtype=s.amp_dtype) if s.amp_dtype is not None else nullcontext()
        loss_sum = torch.zeros((), device=self.indices.device)
        seen = 0
        for x, y in s.data.batches(self.indices, s.batch_size, s.num_steps(self.num_samples), gen):
            with autocast:
                loss = s.loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach().float() * y.shape[0]
            seen += y.shape[0]
        self._result = ClientUpdate(s.live_state, self.num_samples, loss_sum, seen)

    def send_data(self) -> ClientUpdate:
        result, self._result = self._result, None
        return result

    def state_dict(self) -> dict:
        """State that persists across this client's rounds; none for plain FedAvg clients."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

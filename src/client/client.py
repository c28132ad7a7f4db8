"""Client: local training on its own index tensor, with the one working model all clients share.

The trainer carries the tuning playbook's client-side switches, each off by default so that the
algorithms run as their papers state them: persisted optimizer state, LR schedules continuous
across rounds, EMA, gradient clipping, mixed precision (label smoothing is the loss's, TTA the
evaluation's)."""
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, NamedTuple, Optional

import torch
import torch.nn as nn
from torch.optim.lr_scheduler import LambdaLR

from src.client.ema import ClientEMA
from src.client.schedule import LRSchedule
from src.client.state_store import ClientStateStore
from src.data.device_data import DeviceDataset
from src.losses.proximal import ProximalTerm
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
    seed: int
    num_rounds: int = 1
    schedule: LRSchedule = field(default_factory=LRSchedule)
    store: Optional[ClientStateStore] = None  # required when anything persists across rounds
    persist_optimizer: bool = False
    ema: Optional[ClientEMA] = None
    grad_clip: Optional[float] = None  # max global gradient norm
    amp_dtype: Optional[torch.dtype] = None  # autocast dtype on CUDA; None trains in fp32
    scaler: Optional[torch.amp.GradScaler] = None  # fp16 loss scaling, shared by the clients
    prox: Optional[ProximalTerm] = None  # FedProx's term, anchored at the weights each client receives
    local_dp: Optional[Any] = None  # DP-SGD on every client (src/local_dp.py's LocalDP, which sets it)
    # Detached views of the working model's parameters and buffers: copying into them loads a
    # state without rebuilding the state dict per client.
    live_state: dict[str, torch.Tensor] = field(init=False)
    param_names: list[str] = field(init=False)
    params: list[torch.Tensor] = field(init=False)
    sent_state: dict[str, torch.Tensor] = field(init=False)  # what a client sends: raw or EMA weights

    def __post_init__(self):
        self.live_state = dict(self.model.state_dict())
        self.param_names = [name for name, _ in self.model.named_parameters()]
        self.params = list(self.model.parameters())
        sends_ema = self.ema is not None and self.ema.send == "ema"
        self.sent_state = self.ema.weights(self.live_state) if sends_ema else self.live_state

    def load(self, state: dict[str, torch.Tensor]) -> None:
        torch._foreach_copy_(list(self.live_state.values()), [state[k] for k in self.live_state])

    def num_steps(self, num_samples: int) -> int:
        if self.local_steps is not None:
            return self.local_steps
        return self.local_epochs * -(-num_samples // self.batch_size)

    def autocast(self):
        return torch.autocast("cuda", dtype=self.amp_dtype) if self.amp_dtype is not None else nullcontext()


class ClientUpdate(NamedTuple):
    state: dict[str, torch.Tensor]  # the trained weights; views valid until the next client trains
    num_samples: int  # size of the client's dataset (the FedAvg weight)
    loss_sum: torch.Tensor  # training loss summed over the samples seen, still on the device
    samples_seen: int
    ema_state: Optional[dict[str, torch.Tensor]] = None  # the client's EMA weights, when EMA is on
    extra: Optional[dict] = None  # algorithm-specific payload (e.g. SCAFFOLD's control change)
    sender: Optional[int] = None  # the sending client's id (a chain's last client), set by the engine


class PenaltyTerms(NamedTuple):
    """The gradient of Client.penalty() at weights w, in a form a batched engine (src/engine/vmap.py)
    applies to many clients' stacked weights at once: quadratic * (w - x) + linear, x the received
    global weights; `linear` per parameter, None for zero."""

    quadratic: float = 0.0
    linear: Optional[list[torch.Tensor]] = None

    def plus(self, quadratic: float = 0.0, linear: Optional[list[torch.Tensor]] = None) -> "PenaltyTerms":
        if self.linear is not None and linear is not None:
            linear = torch._foreach_add(self.linear, linear)
        return PenaltyTerms(self.quadratic + quadratic, self.linear if linear is None else linear)


class Client:
    """One federated client. It owns its data indices; the model and the training recipe live in
    the shared TrainSetup, and whatever persists across its rounds lives in the state store.

    Algorithms extend local training through three hooks: `begin_round` (read persisted state),
    `penalty` (a term added to the loss) and `end_round` (update persisted state, attach a
    payload for the server)."""

    def __init__(self, client_id: int, indices: torch.Tensor, setup: TrainSetup):
        self.client_id = client_id
        self.indices = indices
        self.setup = setup
        self._result: Optional[ClientUpdate] = None
        self.received: dict = {}
        self.step_lrs: list[float] = []  # the step size of each local step of the last round
        # data poisoning (src/attacks.py): the labels this client trains on, from the true ones
        self.label_map: Optional[Callable[[torch.Tensor], torch.Tensor]] = None

    @property
    def num_samples(self) -> int:
        return self.indices.shape[0]

    def receive_data(self, data: dict) -> None:
        self.setup.load(data["global_state"])
        self.received = data  # the server's tensors stay unchanged until the round is aggregated

    # ---- hooks ---------------------------------------------------------------------------------
    def begin_round(self, state: dict) -> None:
        """Called after the global weights are loaded, before the first local step."""

    def penalty(self) -> Optional[torch.Tensor]:
        """A term added to the training loss at every local step (None: nothing). Subclasses add
        theirs to this one, FedProx's proximal term when algo.prox_mu > 0."""
        s = self.setup
        if s.prox is None or s.prox.mu == 0:
            return None
        return s.prox(s.params, [self.received["global_state"][n] for n in s.param_names])

    def penalty_terms(self) -> PenaltyTerms:
        """penalty()'s gradient as PenaltyTerms; a subclass that adds to penalty() adds to this."""
        s = self.setup
        return PenaltyTerms(s.prox.mu if s.prox is not None else 0.0)

    def end_round(self, state: dict) -> Optional[dict]:
        """Called after the last local step; may add entries to `state` (persisted for the
        client's next round) and return a payload for the server. Drop the tensors kept since
        begin_round: clients that are not training hold none."""
        return None

    # ---- training ------------------------------------------------------------------------------
    @property
    def lr_sum(self) -> float:
        """The sum of the step sizes taken (SCAFFOLD's K * eta_l under any schedule)."""
        return sum(self.step_lrs)

    def client_update(self, round_idx: int, stream: int = 0, max_steps: Optional[int] = None) -> None:
        """Local training on this client's data; batches and augmentation come from a generator
        that depends only on (seed, round, client[, stream]), so results do not depend on client
        order. `stream` > 0 gives a client that trains twice in a round (FedSeq's passes) new batches.
        `max_steps` stops a straggler early (src/system.py): it takes the first steps of its full
        round, same batches, and the LR schedule is still the one laid out for all of its steps."""
        s = self.setup
        model = s.model
        model.train()
        optimizer, scheduler, steps = self.start_round(round_idx, max_steps)
        if s.local_dp is not None:  # its step clips the per-sample gradients and adds the noise
            optimizer = s.local_dp.optimizer(optimizer, self, round_idx, stream)
        loss_sum = torch.zeros((), device=self.indices.device)
        seen = 0
        self.step_lrs = []
        for x, y in self.batches(round_idx, stream, steps):
            if s.local_dp is not None:  # per-sample gradients, for the DP step to clip and noise
                optimizer.zero_grad(set_to_none=True)
                loss = s.local_dp.backward(x, y, self.penalty)
            else:
                with s.autocast():
                    loss = s.loss_fn(model(x), y)
                extra = self.penalty()
                objective = loss if extra is None else loss + extra
                optimizer.zero_grad(set_to_none=True)
                if s.scaler is not None:
                    s.scaler.scale(objective).backward()
                    s.scaler.unscale_(optimizer)
                else:
                    objective.backward()
                if s.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip, foreach=True)
            if s.scaler is not None:
                s.scaler.step(optimizer)
                s.scaler.update()
            else:
                optimizer.step()
            self.step_lrs.append(optimizer.param_groups[0]["lr"])
            if scheduler is not None:
                scheduler.step()
            if s.ema is not None:
                s.ema.update(model)
            loss_sum += loss.detach().float() * y.shape[0]
            seen += y.shape[0]
        self.finish_round(optimizer, loss_sum, seen)

    # The parts of client_update before and after its steps, shared with the batched engine
    # (src/engine/vmap.py), which takes the steps of many clients at once on the live model's behalf.
    def start_round(self, round_idx: int, max_steps: Optional[int] = None
                    ) -> tuple[torch.optim.Optimizer, Optional[LambdaLR], int]:
        """The round's optimizer (with the persisted state), its LR scheduler and the number of
        steps to take; begins the EMA and calls begin_round. The live model holds the start weights."""
        s = self.setup
        model = s.model
        saved = s.store.get(self.client_id) if s.store is not None else {}
        num_steps = s.num_steps(self.num_samples)
        optimizer = s.optimizer(model.parameters())
        if s.persist_optimizer and "optimizer" in saved:
            optimizer.load_state_dict(saved["optimizer"])
        scheduler = s.schedule.scheduler(optimizer, round_idx, num_steps, s.num_rounds)
        steps = num_steps if max_steps is None else min(num_steps, max_steps)
        if s.ema is not None:
            s.ema.begin(model, saved.get("ema") if s.ema.persist else None)
        self.begin_round(saved)
        return optimizer, scheduler, steps

    def batches(self, round_idx: int, stream: int, steps: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The round's `steps` batches, with the labels this client trains on."""
        s = self.setup
        keys = (round_idx, self.client_id) + ((stream,) if stream else ())
        gen = torch_generator(self.indices.device, s.seed, CLIENT_DATA, *keys)
        drawn = (s.data.batches(self.indices, s.batch_size, steps, gen) if s.local_dp is None
                 else s.local_dp.batches(self, steps, gen))  # DP-SGD: Poisson sampling
        for x, y in drawn:
            yield x, (y if self.label_map is None else self.label_map(y))

    def finish_round(self, optimizer: torch.optim.Optimizer, loss_sum: torch.Tensor, seen: int) -> None:
        """After the last step, the live model holding the trained weights: persist the client's
        state, call end_round and keep the update for send_data."""
        s = self.setup
        state = {}
        if s.persist_optimizer:
            state["optimizer"] = optimizer.state_dict()
        if s.ema is not None and s.ema.persist:
            state["ema"] = s.ema.state()
        payload = self.end_round(state)
        if state:
            s.store.put(self.client_id, state)
        self.received = {}  # between rounds a client holds only its indices, no model-sized tensors
        ema_state = s.ema.weights(s.live_state) if s.ema is not None else None
        self._result = ClientUpdate(s.sent_state, self.num_samples, loss_sum, seen, ema_state, payload)

    def send_data(self) -> ClientUpdate:
        result, self._result = self._result, None
        return result

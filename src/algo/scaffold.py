"""SCAFFOLD (Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning", ICML 2020, Algorithm 1): client and server control variates correct the client drift.

Client i, from the server model x and control c, with its own control c_i (zero at first):
    y <- y - eta_l (g_i(y) - c_i + c)                                  (Alg. 1, line 10)
    c_i+ = g_i(x)  (option I: a gradient pass over the local data at x), or
    c_i+ = c_i - c + (x - y) / (K eta_l)  (option II, the default)      (Alg. 1, line 12)
    sends (y - x, c_i+ - c_i)                                           (line 13)
Server, over the sampled clients S of N:
    x <- x + eta_g / |S| sum_i (y_i - x),   c <- c + 1/N sum_i (c_i+ - c_i)   (lines 16-17)
so under partial participation c moves by |S|/N of the mean control change. The correction
enters as the loss term <c - c_i, y>, whose gradient is exactly c - c_i; K eta_l is the sum of the
step sizes taken, which equals K eta_l with a constant LR (under fp16 a step the loss scaler skips
still counts). y is what the client sends (its EMA with client.ema.send=ema), so client and server
controls see the same model. Client controls live in the per-client state store.

Option II assumes plain SGD steps. Under heavy-ball momentum beta (torch.optim.SGD, Nesterov or
not) a gradient keeps moving the weights after its own step, by up to eta_l / (1 - beta) in all, so
K eta_l becomes K eta_l / (1 - beta) here. Left at K eta_l, the controls overestimate the mean
gradient by r, the true step sum over K eta_l, and c_i+ - (c_i - c) = r (mean gradient - (c_i - c))
overshoots and diverges once r > 2 (fresh buffers, beta = 0.9: from K = 4 steps on); with the
bound, r <= 1 and c - c_i still tends to the right correction, only more slowly. Measured on the
toy of tests/toy.py (4 clients, 30 rounds, beta 0.5 and 0.9, K = 2, 5, 20, with and without
client.persist_optimizer): K eta_l diverges for beta = 0.9 and K >= 5 (loss 1.3 -> 278 at K = 5,
lr 0.1), the bound converges in every case. An adaptive optimizer (Adam) has no such step, so
option II refuses it; option I holds for any optimizer."""
from typing import Literal, Optional

import torch

from src.client.client import Client, PenaltyTerms
from src.errors import ConfigError
from src.server.base import CenterServer, Sums, Weighting


class ScaffoldClient(Client):
    def __init__(self, client_id: int, indices: torch.Tensor, setup, option: Literal["I", "II"] = "II"):
        super().__init__(client_id, indices, setup)
        if option not in ("I", "II"):
            raise ValueError(f"SCAFFOLD's control update option must be 'I' or 'II', got {option!r}")
        self.option = option
        self.momentum_gain = momentum_gain(setup.optimizer) if option == "II" else 1.0
        self.c_i = self.correction = self.full_gradient = None  # per-round, from begin_round to end_round

    def begin_round(self, state: dict) -> None:
        names = self.setup.param_names
        control = self.received["control"]
        self.c_i = state.get("control") or {n: torch.zeros_like(control[n]) for n in names}
        self.correction = torch._foreach_sub([control[n] for n in names], [self.c_i[n] for n in names])
        if self.option == "I":
            self.full_gradient = self.local_gradient()

    def local_gradient(self) -> list[torch.Tensor]:
        """g_i(x): the mean gradient of the training loss over the client's data at the received
        weights (one pass, no augmentation)."""
        s = self.setup
        grads = [torch.zeros_like(p) for p in s.params]
        gen = torch.Generator(device=self.indices.device).manual_seed(0)  # order does not change the sum
        steps = -(-self.num_samples // s.batch_size)
        for x, y in s.data.batches(self.indices, s.batch_size, steps, gen, augment=False):
            loss = s.loss_fn(s.model(x), y) * (y.shape[0] / self.num_samples)  # fp32: no fp16 underflow
            torch._foreach_add_(grads, torch.autograd.grad(loss, s.params))
        s.load(self.received["global_state"])  # undo BatchNorm statistics the pass updated
        return grads

    def penalty(self) -> Optional[torch.Tensor]:
        term = sum((p * c).sum() for p, c in zip(self.setup.params, self.correction))
        base = super().penalty()
        return term if base is None else base + term

    def penalty_terms(self) -> PenaltyTerms:
        return super().penalty_terms().plus(linear=self.correction)

    def end_round(self, state: dict) -> dict:
        names = self.setup.param_names
        if self.option == "I":
            new = self.full_gradient
        else:  # c_i - c + (x - y) (1 - beta) / (K eta_l), with c - c_i = correction
            x = [self.received["global_state"][n] for n in names]
            drift = torch._foreach_sub(x, [self.setup.sent_state[n] for n in names])  # y as the server sees it
            torch._foreach_div_(drift, self.lr_sum * self.momentum_gain)
            new = torch._foreach_sub(drift, self.correction)
        state["control"] = dict(zip(names, new))
        change = dict(zip(names, torch._foreach_sub(new, [self.c_i[n] for n in names])))
        self.c_i = self.correction = self.full_gradient = None
        return {"control_change": change}


def momentum_gain(make_optimizer) -> float:
    """1 / (1 - beta): how much further than eta_l heavy-ball momentum beta carries a gradient
    (1 for plain SGD). ConfigError for an optimizer that is not SGD."""
    optimizer = make_optimizer([torch.zeros(1, requires_grad=True)])
    if not isinstance(optimizer, torch.optim.SGD):
        raise ConfigError([f"algo.client.option: SCAFFOLD's option II control update (x - y) / (K lr) needs SGD "
                           f"local steps, and {type(optimizer).__name__} is not SGD: use algo.client.option=I (a "
                           "gradient pass at the server model, right for any optimizer) or optimizer=sgd"])
    beta = optimizer.defaults["momentum"]
    if not 0 <= beta < 1:
        raise ConfigError([f"optimizer.momentum: must be in [0, 1) for SCAFFOLD's option II, got {beta}"])
    return 1.0 / (1.0 - beta)


class ScaffoldServer(CenterServer):
    extra_state = ("control",)
    summed_extras = ("control_change",)

    def __init__(self, lr: float = 1.0, weighting: Weighting = "uniform"):
        """`lr` is the global step size eta_g; the paper averages the client updates uniformly."""
        super().__init__(weighting)
        if not lr > 0:
            raise ValueError(f"SCAFFOLD's global step size lr must be > 0, got {lr}")
        self.lr = lr
        self.control: dict[str, torch.Tensor] = {}

    def send_data(self) -> dict:
        return {"global_state": self.global_state, "control": self.control}

    def server_update(self, mean: dict[str, torch.Tensor], sums: Sums) -> None:
        names = self.param_names
        x = [self.global_state[n] for n in names]
        step = torch._foreach_sub([mean[n] for n in names], x)
        # buffers: the plain mean
        self.global_state = {**mean, **dict(zip(names, torch._foreach_add(x, step, alpha=self.lr)))}
        change = sums.extras["control_change"]
        torch._foreach_add_([self.control[n] for n in names], [change[n] for n in names], alpha=1.0 / self.num_clients)

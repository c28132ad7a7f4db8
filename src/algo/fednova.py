"""FedNova (Wang, Liu, Liang, Joshi & Poor, "Tackling the Objective Inconsistency Problem in
Heterogeneous Federated Optimization", NeurIPS 2020): normalized averaging, so that clients doing
unequal local work (more samples, faster devices, partial work by stragglers) do not bias the
objective the federation minimizes.

The paper's framework (Sec. 3): client i's local change after tau_i steps from the global x is
    x_i - x = -eta G_i a_i,   G_i = [g_i(x_i^(0)), ..., g_i(x_i^(tau_i - 1))],
with a_i the local solver's weights of its gradients; its normalized gradient is
d_i = G_i a_i / ||a_i||_1 = (x - x_i) / (eta ||a_i||_1). FedNova's server (Sec. 4) moves by
    x <- x - tau_eff sum_i p_i eta d_i,   tau_eff = sum_i p_i ||a_i||_1,
p_i the clients' sample shares (`weighting=samples`; `uniform` gives 1/m). The paper's a_i:
    plain SGD                a_i = [1, ..., 1]                              ||a_i||_1 = tau_i
    heavy-ball momentum rho  a_i = [1-rho^tau_i, ..., 1-rho] / (1-rho)
                                      ||a_i||_1 = [tau_i - rho (1-rho^tau_i) / (1-rho)] / (1-rho)
    proximal term mu         a_i = [(1-eta mu)^(tau_i-1), ..., 1-eta mu, 1]
                                      ||a_i||_1 = [1 - (1-eta mu)^tau_i] / (eta mu)
With the step sizes folded in, eta ||a_i||_1 is the sum over the local steps j of the coefficient
with which g_j enters x - x_i. The client finds it by running its solver's update rule on a unit
gradient (every g_j = 1, starting from 0): the rule is linear in the gradients, so it moves by
exactly that sum. This gives the closed forms above for a constant LR (tests/test_fednova.py
checks them) and extends them to what the paper leaves out: the actual step size of every step
(LR schedules within the round, from Client.step_lrs, so a straggler's partial round counts what
it took), Nesterov momentum, dampening, and momentum with the proximal term together. With plain
SGD and equal tau_i, tau_eff d = x - mean(x_i): FedNova is FedAvg (up to float rounding).

The client sends its trained weights, as in FedAvg, and eta ||a_i||_1 (`step_sum`) in
update.extra; the server forms d_i from the weights it receives, so update transforms and
attacks that change the weights (src/transforms.py, src/attacks.py) change d_i with them.
FedNova refuses what a_i cannot describe: an optimizer that is not SGD (Adam's per-coordinate steps
are no weighted sum of gradients), momentum carried over from the client's previous round
(client.persist_optimizer with momentum: the carried buffer moves the weights by earlier rounds'
gradients), and sending the EMA instead of the trained weights. BatchNorm statistics are averaged."""
from typing import Optional

import torch

from src.client.client import Client, ClientUpdate
from src.errors import ConfigError
from src.server.base import CenterServer, Sums, Weighting


def step_sum(step_lrs: list[float], momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False,
             mu: float = 0.0) -> float:
    """eta ||a_i||_1: how far torch.optim.SGD (with FedProx's term mu/2 ||w - x||^2 in the loss)
    moves along a unit gradient in steps of sizes `step_lrs`, from a fresh momentum buffer."""
    offset, buf = 0.0, None  # the weights' distance from x, the momentum buffer
    for lr in step_lrs:
        grad = 1.0 + mu * offset  # the unit gradient plus the proximal term's
        if momentum:
            buf = grad if buf is None else momentum * buf + (1.0 - dampening) * grad
            grad = grad + momentum * buf if nesterov else buf
        offset -= lr * grad
    return -offset


class FedNovaClient(Client):
    def __init__(self, client_id: int, indices: torch.Tensor, setup):
        super().__init__(client_id, indices, setup)
        optimizer = setup.optimizer([torch.zeros(1, requires_grad=True)])
        if not isinstance(optimizer, torch.optim.SGD):
            raise ConfigError([f"optimizer: FedNova normalizes each client's change by its local solver's a_i (Wang et "
                               f"al. 2020, Sec. 3), known for SGD (momentum, Nesterov, FedProx's term) and not for "
                               f"{type(optimizer).__name__}: use optimizer=sgd"])
        d = optimizer.defaults
        self.momentum, self.dampening, self.nesterov = d["momentum"], d["dampening"], d["nesterov"]
        if self.momentum and setup.persist_optimizer:
            raise ConfigError(["client.persist_optimizer: with momentum, a client's carried-over buffer moves its "
                               "weights by earlier rounds' gradients, which FedNova's a_i does not count: use "
                               "client.persist_optimizer=false or optimizer.momentum=0"])
        if setup.ema is not None and setup.ema.send == "ema":
            raise ConfigError(["client.ema.send: FedNova normalizes the change of the trained weights, not of their "
                               "EMA: use client.ema.send=raw"])

    def end_round(self, state: dict) -> dict:
        mu = self.setup.prox.mu if self.setup.prox is not None else 0.0
        return {"step_sum": step_sum(self.step_lrs, self.momentum, self.dampening, self.nesterov, mu)}


class FedNovaServer(CenterServer):
    def __init__(self, weighting: Weighting = "samples"):
        """`weighting`: p_i, the sample shares (the paper's) or uniform."""
        super().__init__(weighting)
        self._direction: Optional[list[torch.Tensor]] = None  # this round's sum_i w_i d_i, per parameter
        self._work = 0.0  # this round's sum_i w_i eta ||a_i||_1

    def aggregate(self, updates) -> None:
        self._direction = [torch.zeros_like(self.global_state[n]) for n in self.param_names]
        self._work = 0.0
        super().aggregate(updates)
        self._direction = None

    def accumulate(self, sums: Sums, update: ClientUpdate) -> None:
        super().accumulate(sums, update)  # the weighted mean: BatchNorm statistics, and the total weight
        weight, work = self.client_weight(update), update.extra["step_sum"]
        if work > 0:  # a client that took no step has no direction (and sends its received weights)
            names = self.param_names
            change = torch._foreach_sub([self.global_state[n] for n in names], [update.state[n] for n in names])
            torch._foreach_add_(self._direction, change, alpha=weight / work)
            self._work += weight * work

    def server_update(self, mean: dict[str, torch.Tensor], sums: Sums) -> None:
        # x - tau_eff sum_i p_i d_i, with p_i = w_i / W: tau_eff = work / W and sum_i p_i d_i = direction / W
        names, total = self.param_names, sums.mean.total
        x = torch._foreach_add([self.global_state[n] for n in names], self._direction,
                               alpha=-self._work / (total * total))
        self.global_state = {**mean, **dict(zip(names, x))}

"""FedDyn (Acar et al., "Federated Learning Based on Dynamic Regularization", ICLR 2021,
Algorithm 1).

Client k, from the server model theta^{t-1}, with its gradient state g_k = grad L_k(theta_k^{t-1})
(zero at first), minimises
    L_k(theta) - <g_k, theta> + alpha/2 ||theta - theta^{t-1}||^2              (Alg. 1, line 6)
and then updates its state once:  g_k <- g_k - alpha (theta_k^t - theta^{t-1})   (line 7).
Server, over the participants P_t of m clients:
    h^t = h^{t-1} - alpha/m sum_{k in P_t} (theta_k^t - theta^{t-1})             (line 9)
    theta^t = 1/|P_t| sum_{k in P_t} theta_k^t - h^t / alpha                     (line 10)
Unlike the FedSeq reference code, the linear term is built from the live parameters (so it has a
gradient, -g_k) and g_k changes only at the end of the round. alpha is the server's setting and
reaches the clients with the model; g_k lives in the per-client state store.

Each client sends the change of its g_k, and line 9 is h^t = h^{t-1} + 1/m sum_k (change of g_k),
so h stays the mean of all m clients' g_k, on which line 10's fixed point rests. Under FedSeq a
superclient sends the sum of its clients' changes and m counts clients, not superclients; each
client's anchor is the global model its superclient received."""
from typing import Optional

import torch

from src.client.client import Client, PenaltyTerms
from src.server.base import CenterServer, Sums


class FedDynClient(Client):
    anchor = grad_state = None  # per-round, from begin_round to end_round
    payload_adds_up = True  # a change of the client's own g_k: FedSeq sums those of a superclient

    def begin_round(self, state: dict) -> None:
        names = self.setup.param_names
        self.alpha = self.received["alpha"]
        self.anchor = [self.received["global_state"][n] for n in names]
        saved = state.get("grad_state")
        self.grad_state = [saved[n] for n in names] if saved else [torch.zeros_like(a) for a in self.anchor]

    def penalty(self) -> Optional[torch.Tensor]:
        params = self.setup.params
        linear = sum((p * g).sum() for p, g in zip(params, self.grad_state))
        prox = sum((p - a).pow(2).sum() for p, a in zip(params, self.anchor))
        term = 0.5 * self.alpha * prox - linear
        base = super().penalty()
        return term if base is None else base + term

    def penalty_terms(self) -> PenaltyTerms:
        return super().penalty_terms().plus(self.alpha, torch._foreach_neg(self.grad_state))

    def end_round(self, state: dict) -> dict:
        names = self.setup.param_names
        # theta_k as the server sees it (the EMA with client.ema.send=ema)
        change = torch._foreach_sub([self.setup.sent_state[n] for n in names], self.anchor)
        torch._foreach_mul_(change, -self.alpha)
        torch._foreach_add_(self.grad_state, change)
        state["grad_state"] = dict(zip(names, self.grad_state))
        self.anchor = self.grad_state = None
        return {"grad_change": dict(zip(names, change))}


class FedDynServer(CenterServer):
    extra_state = ("h",)
    summed_extras = ("grad_change",)

    def __init__(self, alpha: float = 0.01):
        super().__init__("uniform")  # line 10: the plain mean over the participants
        if not alpha > 0:
            raise ValueError(f"FedDyn's alpha must be > 0, got {alpha}")
        self.alpha = alpha
        self.h: dict[str, torch.Tensor] = {}

    def send_data(self) -> dict:
        return {"global_state": self.global_state, "alpha": self.alpha}

    def server_update(self, mean: dict[str, torch.Tensor], sums: Sums) -> None:
        names = self.param_names
        h = [self.h[n] for n in names]
        change = sums.extras["grad_change"]  # -alpha sum_k (theta_k - theta^{t-1})
        torch._foreach_add_(h, [change[n] for n in names], alpha=1.0 / self.num_clients)
        theta = torch._foreach_add([mean[n] for n in names], h, alpha=-1.0 / self.alpha)
        self.global_state = {**mean, **dict(zip(names, theta))}  # buffers: the plain mean

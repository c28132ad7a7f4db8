"""Server optimizers on the FedAvg pseudo-gradient: FedAdagrad, FedAdam and FedYogi (Reddi et al.,
"Adaptive Federated Optimization", ICLR 2021, Algorithm 2) and FedAvgM, server momentum (Hsu et al.,
"Measuring the Effects of Non-Identical Data Distribution for Federated Visual Classification", 2019;
Reddi et al., Algorithm 1 with ServerOpt = SGD with momentum)."""
import logging
from typing import Literal

import torch

from src.server.base import Sums, Weighting
from src.server.fedavg import FedAvgServer

log = logging.getLogger(__name__)

ServerOpt = Literal["adagrad", "adam", "yogi", "momentum"]


def second_moment(opt: ServerOpt, v: torch.Tensor, d2: torch.Tensor, beta2: float) -> torch.Tensor:
    """v_t from v_{t-1} and Delta_t^2: the FedAdagrad, FedYogi and FedAdam lines of Reddi et al., Algorithm 2."""
    if opt == "adagrad":
        return v + d2
    if opt == "yogi":
        return v - (1 - beta2) * d2 * torch.sign(v - d2)
    return beta2 * v + (1 - beta2) * d2


class FedOptServer(FedAvgServer):
    """x_{t+1} = x_t + lr * step_t on the pseudo-gradient Delta_t = mean_t - x_t, where mean_t is
    FedAvgServer's weighted mean of the client weights (Algorithm 2 writes a plain mean over the
    sampled clients: weighting=uniform).

    adagrad / adam / yogi (Reddi et al., Algorithm 2), with m_{-1} = 0, v_{-1} = tau^2 (the paper's
    experiments) and no bias correction:
        m_t = beta1 m_{t-1} + (1 - beta1) Delta_t,   v_t = second_moment(...),
        step_t = m_t / (sqrt(v_t) + tau).
    momentum (FedAvgM): heavy-ball SGD on the server, Hsu et al.'s v <- beta v + Delta w, w <- w - v
    (their Delta w is x_t - mean_t) with Reddi et al.'s server lr:
        m_t = beta1 m_{t-1} + Delta_t,   step_t = m_t   (beta1 is the momentum; beta2 and tau are unused)
    so beta1 = 0, lr = 1 is FedAvg, bit for bit.

    Only the model's parameters (attach()'s param_names) are optimized; buffers are averaged, or
    taken from the last client, as FedAvgServer does.
    """

    extra_state = ("m", "v")

    def __init__(self, optimizer: ServerOpt, lr: float, beta1: float = 0.9, beta2: float = 0.99,
                 tau: float = 1e-3, weighting: Weighting = "samples"):
        super().__init__(weighting)
        if optimizer not in ("adagrad", "adam", "yogi", "momentum"):
            raise ValueError(f"optimizer must be 'adagrad', 'adam', 'yogi' or 'momentum', got {optimizer!r}")
        if not lr > 0:
            raise ValueError(f"server lr must be > 0, got {lr}")
        if not 0 <= beta1 < 1:
            raise ValueError(f"beta1 must be in [0, 1), got {beta1}")
        if not 0 <= beta2 < 1:
            raise ValueError(f"beta2 must be in [0, 1), got {beta2}")
        if not tau > 0:
            raise ValueError(f"tau must be > 0 (it bounds the adaptive step), got {tau}")
        self.optimizer, self.lr, self.beta1, self.beta2, self.tau = optimizer, lr, beta1, beta2, tau
        self.m: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}

    @property
    def adaptive(self) -> bool:
        return self.optimizer != "momentum"

    def attach(self, param_names: list[str], num_clients: int) -> None:
        """The optimizer moves the parameters, from m_{-1} = 0 and v_{-1} = tau^2; the other
        floating-point entries (BatchNorm statistics) are averaged as FedAvg averages them."""
        super().attach(param_names, num_clients)  # m starts at zero
        buffers = [k for k, t in self.global_state.items() if t.is_floating_point() and k not in set(param_names)]
        if buffers:
            log.warning("%s: the model has floating-point buffers (%s, e.g. BatchNorm running statistics); the "
                        "server optimizer cannot move them, so they are only averaged. Prefer GroupNorm "
                        "(model.norm=group for resnet20).", type(self).__name__, ", ".join(buffers[:3]))
        self.v = {k: torch.full_like(self.global_state[k], self.tau ** 2) for k in self.param_names} if self.adaptive else {}

    def server_update(self, mean: dict[str, torch.Tensor], sums: Sums) -> None:
        x = self.global_state
        super().server_update(mean, sums)  # buffers: the mean, as FedAvg
        for k in self.param_names:
            delta = mean[k] - x[k]
            if self.adaptive:
                self.m[k] = self.beta1 * self.m[k] + (1 - self.beta1) * delta
                self.v[k] = second_moment(self.optimizer, self.v[k], delta * delta, self.beta2)
                step = self.m[k] / (self.v[k].sqrt() + self.tau)
            else:
                self.m[k] = self.beta1 * self.m[k] + delta
                step = self.m[k]
            # x_t + lr*step, written from the mean so that a step equal to Delta_t lands on it exactly
            self.global_state[k] = mean[k] + (self.lr * step - delta)

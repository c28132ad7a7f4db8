"""Exponential moving average of a client's weights during local training, on
torch.optim.swa_utils.AveragedModel: one averaged copy per run, shared by the clients in turn.

The playbook's arithmetic: an EMA restarted at the round-start weights keeps decay**steps of its
mass there (0.999**148 ≈ 0.862), so sending it to the server wastes most of the round's progress.
The fixes it names are a lower decay or an EMA that persists across the client's rounds."""
from typing import Literal, Optional

import torch
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class ClientEMA:
    def __init__(self, model: nn.Module, decay: float, persist: bool, send: Literal["raw", "ema"]):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"client.ema.decay must be in (0, 1), got {decay}")
        self.decay, self.persist, self.send = decay, persist, send
        # Parameters only: BatchNorm statistics are already running averages, and an EMA of the
        # integer num_batches_tracked would be meaningless. They are taken from the live model.
        device = next(model.parameters()).device  # keeps the step counter there too: no per-step copy
        self.averaged = AveragedModel(model, device=device, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False)
        self.params = dict(self.averaged.module.named_parameters())

    def begin(self, model: nn.Module, saved: Optional[dict]) -> None:
        """Start the round from the client's persisted EMA, or at the round-start weights."""
        with torch.no_grad():
            if saved is not None:
                torch._foreach_copy_([p.detach() for p in self.params.values()], [saved[k] for k in self.params])
                self.averaged.n_averaged.copy_(saved["n_averaged"])
            else:
                self.averaged.n_averaged.zero_()
                self.averaged.update_parameters(model)  # n_averaged == 0: copies the weights

    def update(self, model: nn.Module) -> None:
        self.averaged.update_parameters(model)

    def state(self) -> dict:
        """What persists to the client's next round."""
        state = {k: p.detach().clone() for k, p in self.params.items()}
        state["n_averaged"] = self.averaged.n_averaged.clone()
        return state

    def weights(self, live_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A full state dict: EMA parameters, the live model's buffers."""
        return {k: self.params[k].detach() if k in self.params else v for k, v in live_state.items()}

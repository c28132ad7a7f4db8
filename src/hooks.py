"""Round hooks: what happens around FedBase's round loop without being the loop. A hook sees every
round start, every admitted update and every round's final metrics; one with a `key` is a part of
the resume checkpoint (src/checkpoint.py) under that key.

FedBase runs, in order: EMAEvaluation (with client.ema.evaluate), MetricsRecorder, CheckpointCadence."""
import json
import logging
import math
from pathlib import Path
from typing import Callable, Optional

import torch

from src.checkpoint import mismatches
from src.client.client import ClientUpdate
from src.server.fedavg import WeightedMean
from src.utils.io import save_text

log = logging.getLogger(__name__)


class RoundHook:
    key: Optional[str] = None  # its checkpoint part's key (None: nothing to save)

    def on_round_start(self) -> None: ...

    def on_update(self, update: ClientUpdate) -> None:
        """An update admitted to the round, before the server consumes it."""

    def on_round_end(self, metrics: dict) -> None:
        """The round is complete: the global model updated, `metrics` final."""

    def state_dict(self):
        return None

    def check_state(self, saved) -> list[str]:
        """Where `saved` does not fit this run (as 'path: problem')."""
        return []

    def load_state_dict(self, saved) -> None: ...


class EMAEvaluation(RoundHook):
    """The sample-weighted mean of the round's client EMAs: what client.ema.evaluate scores."""

    key = "ema_eval_state"

    def __init__(self, global_state: Callable[[], dict]):
        self.global_state = global_state
        self._mean: Optional[WeightedMean] = None
        self._state: Optional[dict[str, torch.Tensor]] = None

    def on_round_start(self) -> None:
        self._mean = WeightedMean(self.global_state())

    def on_update(self, update: ClientUpdate) -> None:
        self._mean.add(update.ema_state, float(update.num_samples))

    @property
    def state(self) -> Optional[dict[str, torch.Tensor]]:
        """The mean, once the round's updates are in (the last round's if none was admitted)."""
        if self._mean is not None:
            self._state = self._mean.result() or self._state
            self._mean = None
        return self._state

    def on_round_end(self, metrics: dict) -> None:
        self.state  # noqa: B018  (a round that was not evaluated still ends with its mean)

    def state_dict(self):
        return self._state  # a checkpoint taken mid-round holds the last complete round's

    def check_state(self, saved) -> list[str]:
        return [] if saved is None else mismatches(saved, self.global_state(), self.key)

    def load_state_dict(self, saved) -> None:
        device = next(iter(self.global_state().values())).device
        self._state = None if saved is None else {k: v.to(device) for k, v in saved.items()}


class MetricsRecorder(RoundHook):
    """The history of per-round metrics: metrics.jsonl (strict JSON), the logger, the log line."""

    key = "history"

    def __init__(self, run_dir: Path, logger, num_rounds: int):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.logger, self.num_rounds = logger, num_rounds
        self.history: list[dict] = []

    def reset(self) -> None:
        save_text("", self.path)

    def on_round_end(self, metrics: dict) -> None:
        strict = strict_metrics(metrics)
        self.history.append(strict)
        with open(self.path, "a") as f:
            f.write(json.dumps(strict, allow_nan=False) + "\n")
        self.logger.log(metrics, step=metrics["round"])
        line = f"round {metrics['round']}/{self.num_rounds}  train_loss {metrics['train_loss']:.4f}"
        if "test_accuracy" in metrics:
            line += f"  test_loss {metrics['test_loss']:.4f}  test_acc {100 * metrics['test_accuracy']:.2f}%"
        if metrics.get("dropped_clients"):
            line += f"  dropped {metrics['dropped_clients']} non-finite"
        log.info("%s  (%.2f s)", line, metrics["round_time_s"])

    def state_dict(self):
        return self.history

    def check_state(self, saved) -> list[str]:
        ok = isinstance(saved, list) and all(isinstance(m, dict) for m in saved)
        return [] if ok else ["history: not a list of per-round metrics"]

    def load_state_dict(self, saved) -> None:
        self.history = [strict_metrics(m) for m in saved]  # older checkpoints may hold NaN
        # metrics.jsonl may hold rounds after the checkpoint: rewrite it from the checkpoint
        save_text("".join(json.dumps(m, allow_nan=False) + "\n" for m in self.history), self.path)


class CheckpointCadence(RoundHook):
    """A resume checkpoint every `every` rounds and after the last."""

    def __init__(self, every: int, num_rounds: int, save: Callable[[], None]):
        self.every, self.num_rounds, self.save = every, num_rounds, save

    def on_round_end(self, metrics: dict) -> None:
        if metrics["round"] % self.every == 0 or metrics["round"] == self.num_rounds:
            self.save()


def strict_metrics(metrics: dict) -> dict:
    """`metrics` for strict JSON: a non-finite number (e.g. a float32 loss sum that overflowed) becomes None."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}

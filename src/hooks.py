"""Round hooks: what happens around FedBase's round loop without being the loop. A hook sees every
round start, every admitted update and every round's final metrics; one with a `key` is a part of
the resume checkpoint (src/checkpoint.py) under that key.

FedBase runs, in order: EMAEvaluation (with client.ema.evaluate), ModelSelection (with a validation
split), MetricsRecorder, CheckpointCadence."""
import json
import logging
import math
from pathlib import Path
from typing import Callable, Optional

import torch

from src.checkpoint import mismatches
from src.client.client import ClientUpdate
from src.server.fedavg import WeightedMean
from src.utils.io import save_text, save_torch

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


class ModelSelection(RoundHook):
    """Model selection on the validation split, never on test: the best round by `metric`
    (val_accuracy: highest, val_loss: lowest; the earliest on ties), its evaluated model in
    BEST_MODEL.pt, and early stopping once `patience` rounds have passed without a better value.
    Everything it knows is in the metrics history, so it has no checkpoint part of its own; it runs
    before the recorder, so the history holds the earlier rounds."""

    FILE = "BEST_MODEL.pt"

    def __init__(self, run_dir: Path, history: Callable[[], list[dict]], evaluated_state: Callable[[], dict],
                 metric: str, patience: Optional[int]):
        self.path = Path(run_dir) / self.FILE
        self.history, self.evaluated_state = history, evaluated_state
        self.metric, self.patience = metric, patience
        self.sign = -1.0 if metric.endswith("loss") else 1.0
        self.stop = False  # set at the round after which training stops early

    def best(self, history: list[dict]) -> Optional[dict]:
        """The metrics of the best round in `history` (None before the first validation)."""
        scored = [m for m in history if m.get(self.metric) is not None]
        return max(scored, key=lambda m: (self.sign * m[self.metric], -m["round"]), default=None)

    def on_round_end(self, metrics: dict) -> None:
        if metrics.get(self.metric) is None:
            return
        best = self.best(self.history())
        if best is None or self.sign * metrics[self.metric] > self.sign * best[self.metric]:
            save_torch(self.evaluated_state(), self.path)
            best = metrics
        self.stop = self.patience is not None and metrics["round"] - best["round"] >= self.patience


class CheckpointCadence(RoundHook):
    """A resume checkpoint every `every` rounds and after the last."""

    def __init__(self, every: int, num_rounds: int, save: Callable[[], None]):
        self.every, self.num_rounds, self.save = every, num_rounds, save

    def on_round_end(self, metrics: dict) -> None:
        if metrics["round"] % self.every == 0 or metrics["round"] == self.num_rounds:
            self.save()


class JsonlTable:
    """A JSON-lines file of per-round rows (client_metrics.jsonl), one row per evaluated round."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def append(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(strict_metrics(row), allow_nan=False) + "\n")

    def keep_rounds(self, last_round: int) -> None:
        """Drop the rows after `last_round` (those a resumed run trains again); 0 empties the file."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines(keepends=True)
                if last_round and _round_of(line) <= last_round]
        save_text("".join(kept), self.path)


def _round_of(line: str) -> float:
    """The round of a JSON-lines row; a row cut short by a crash counts as after every round."""
    try:
        return json.loads(line)["round"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def strict_metrics(metrics: dict) -> dict:
    """`metrics` for strict JSON: a non-finite number (e.g. a float32 loss sum that overflowed) becomes None."""
    return {k: _strict(v) for k, v in metrics.items()}


def _strict(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return [_strict(v) for v in value] if isinstance(value, list) else value

"""Algo: the interface train.py drives. fit() wraps _fit(): it saves a resume checkpoint whenever
training stops early (exception, SIGTERM, SIGINT) and the results when it completes; a run that
diverged saves results marked `diverged` and no checkpoint."""
import logging
import signal
import threading
from abc import ABC, abstractmethod
from pathlib import Path

from src.sweep.protocol import RESULTS_FILE, RESUME_FILE
from src.utils.io import load_torch, save_json, save_torch

log = logging.getLogger(__name__)


class TrainingInterrupted(Exception):
    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


class TrainingDiverged(Exception):
    """Training produced non-finite numbers in round `round` (1-based, as in metrics.jsonl)."""

    def __init__(self, round_idx: int, message: str):
        self.round = round_idx
        super().__init__(message)


class Algo(ABC):
    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self._stop_signal: int | None = None
        self.diverged_round: int | None = None

    def fit(self) -> dict:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        handlers = self._install_signal_handlers()
        try:
            self._fit()
        except TrainingDiverged as e:
            # no checkpoint of the diverged state: the last good resume.pt stays
            self.diverged_round = e.round
            self.save_result()
            raise
        except BaseException:
            self.save_checkpoint()
            log.warning("training stopped early; resume checkpoint saved to %s", self.checkpoint_path)
            self._pass_on_signal(handlers)
            raise
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        return self.save_result()

    @abstractmethod
    def _fit(self) -> None: ...

    @abstractmethod
    def train_step(self) -> None:
        """One unit of training (a round for federated algorithms)."""

    @abstractmethod
    def state_dict(self) -> dict:
        """Everything that changes during training, as tensors and plain containers."""

    @abstractmethod
    def load_state_dict(self, state: dict) -> None: ...

    @abstractmethod
    def results(self) -> dict: ...

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / RESUME_FILE

    def save_checkpoint(self) -> None:
        save_torch(self.state_dict(), self.checkpoint_path)

    def load_from_checkpoint(self, path: Path) -> None:
        self.load_state_dict(load_torch(path))

    def save_result(self) -> dict:
        results = self.results()
        save_json(results, self.run_dir / RESULTS_FILE)
        return results

    # Signals only set a flag; the training loop stops at the next client or round boundary, so
    # the checkpoint always holds a consistent state. A second SIGINT stops at once. SIGUSR2 is
    # handled too when a handler is already installed for it (submitit's time-out warning under
    # hydra-submitit-launcher): that handler, which requeues the job and exits, runs after the checkpoint.
    def _install_signal_handlers(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}
        signals = [signal.SIGTERM, signal.SIGINT]
        if callable(signal.getsignal(signal.SIGUSR2)):
            signals.append(signal.SIGUSR2)
        return {sig: signal.signal(sig, self._on_signal) for sig in signals}

    def _pass_on_signal(self, handlers: dict) -> None:
        if self._stop_signal == signal.SIGUSR2 and callable(handlers.get(signal.SIGUSR2)):
            handlers[signal.SIGUSR2](signal.SIGUSR2, None)

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT and self._stop_signal is not None:
            raise KeyboardInterrupt
        log.warning("received %s: stopping at the next client boundary", signal.Signals(signum).name)
        self._stop_signal = signum

    def check_stop(self) -> None:
        if self._stop_signal is not None:
            raise TrainingInterrupted(self._stop_signal)

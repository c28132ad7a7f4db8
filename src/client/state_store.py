"""Per-client state that persists across a client's rounds (optimizer state, EMA, control
variates): kept on the training device, in host memory, or on disk in one directory per client
(the platform's STATE_DIR).

Writes during a round are staged and become visible at `commit()`, which the controller calls once
the round is aggregated: a checkpoint taken mid-round (SIGTERM) then holds the state from the
start of the round, matching the global model it is saved with."""
import shutil
from pathlib import Path
from typing import Any, Literal

import torch

from src.utils.io import load_torch, save_torch

Where = Literal["device", "host", "disk"]


def copy_to(obj: Any, device: torch.device | str) -> Any:
    """A copy of a nested structure of tensors with every tensor on `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to(device, copy=True)
    if isinstance(obj, dict):
        return {k: copy_to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(copy_to(v, device) for v in obj)
    return obj


class ClientStateStore:
    STATE_FILE = "state.pt"

    def __init__(self, where: Where, device: torch.device, directory: Path):
        if where not in ("device", "host", "disk"):
            raise ValueError(f"client state store must be device, host or disk, got {where!r}")
        self.where, self.device, self.directory = where, device, Path(directory)
        self._committed: dict[int, dict] = {}  # device and host stores
        self._pending: dict[int, dict] = {}

    def reset(self) -> None:
        """Start empty. The disk store removes leftovers of an earlier attempt (the resume checkpoint
        is the truth): called only once the run is accepted, never by a refused start."""
        self._pending.clear()
        self._committed.clear()
        if self.where == "disk":
            shutil.rmtree(self.directory, ignore_errors=True)

    def _file(self, client_id: int, pending: bool = False) -> Path:
        return self.directory / str(client_id) / (self.STATE_FILE + (".pending" if pending else ""))

    def get(self, client_id: int) -> dict:
        """The client's committed state, copied onto the training device ({} before its first round)."""
        if self.where == "disk":
            path = self._file(client_id)
            return load_torch(path, map_location=self.device) if path.exists() else {}
        return copy_to(self._committed.get(client_id, {}), self.device)

    def put(self, client_id: int, state: dict) -> None:
        if self.where == "disk":
            save_torch(state, self._file(client_id, pending=True))
            self._pending[client_id] = {}
        else:
            self._pending[client_id] = copy_to(state, self.device if self.where == "device" else "cpu")

    def update(self, client_id: int, entries: dict) -> None:
        """Stage `entries` beside what the client staged this round (its committed state if it
        staged nothing), where put() would replace it: for state kept next to the client's own, such
        as an update transform's. A client that stages its state replaces all of it, so stage such
        entries again every round."""
        if client_id not in self._pending:
            staged = self.get(client_id)
        elif self.where == "disk":
            staged = load_torch(self._file(client_id, pending=True), map_location=self.device)
        else:
            staged = self._pending[client_id]
        self.put(client_id, {**staged, **entries})

    def discard(self, client_id: int) -> None:
        """Forget what the client staged this round (a dropped client's round does not count)."""
        if self._pending.pop(client_id, None) is not None and self.where == "disk":
            self._file(client_id, pending=True).unlink(missing_ok=True)

    def commit(self) -> None:
        for client_id, state in self._pending.items():
            if self.where == "disk":
                self._file(client_id, pending=True).replace(self._file(client_id))
            else:
                self._committed[client_id] = state
        self._pending.clear()

    def client_ids(self) -> list[int]:
        if self.where == "disk":
            return sorted(int(p.parent.name) for p in self.directory.glob(f"*/{self.STATE_FILE}"))
        return sorted(self._committed)

    def state_dict(self) -> dict:
        """Every client's committed state on the host (read back from disk for the disk store)."""
        return {str(i): copy_to(self.get(i), "cpu") for i in self.client_ids()}

    def load_state_dict(self, state: dict) -> None:
        self.reset()
        for client_id, client_state in state.items():
            self.put(int(client_id), client_state)
        self.commit()

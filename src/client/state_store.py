"""Per-client state that persists across a client's rounds (optimizer state, EMA, control
variates): kept on the training device, in host memory, or on disk in one directory per client
(the platform's STATE_DIR).

Writes during a round are staged and become visible at `commit()`, which the controller calls once
the round is aggregated: a checkpoint taken mid-round (SIGTERM) then holds the state from the
start of the round, matching the global model it is saved with.

The disk store's checkpoint references its files instead of holding their contents, so writing
resume.pt costs the same for 10 clients as for 10,000. That needs files that never change once a
checkpoint may reference them: a commit makes each staged state a new version,
<client>/state.<n>.pt (n counts the store's commits), and a version the last resume.pt references is
deleted only once a newer resume.pt has been written (`prune()`). Versions rather than hard-linked
snapshots: no link per client and checkpoint, and they work on file systems without hard links."""
import re
import shutil
from pathlib import Path
from typing import Any, Literal, Optional

import torch

from src.errors import UserError
from src.utils.io import link_or_copy, load_torch, save_torch

Where = Literal["device", "host", "disk"]
VERSION = re.compile(r"state\.(\d+)\.pt")  # a committed version's file name
REFERENCE_FIX = ("resume.pt references its clients' state files in the client_state folder beside it rather than "
                 "holding copies. Restore that folder from a copy of the run directory, or start afresh in a new "
                 "directory (hydra.run.dir=NEW_DIR). Nothing was changed.")


def copy_to(obj: Any, device: torch.device | str) -> Any:
    """A copy of a nested structure of tensors with every tensor on `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to(device, copy=True)
    if isinstance(obj, dict):
        return {k: copy_to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(copy_to(v, device) for v in obj)
    return obj


def is_reference(entry: Any) -> bool:
    """Whether a checkpoint's entry for a client is the disk store's [file name, bytes] (else its state)."""
    return (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
            and VERSION.fullmatch(entry[0]) is not None and type(entry[1]) is int)


class ClientStateStore:
    PENDING = "state.pt.pending"

    def __init__(self, where: Where, device: torch.device, directory: Path):
        if where not in ("device", "host", "disk"):
            raise ValueError(f"client state store must be device, host or disk, got {where!r}")
        self.where, self.device, self.directory = where, device, Path(directory)
        self._committed: dict[int, dict] = {}  # device and host stores
        self._pending: dict[int, dict] = {}
        self._files: dict[int, tuple[str, int]] = {}  # disk store: each client's committed version, its bytes
        self._superseded: dict[int, str] = {}  # disk store: versions the last checkpoint may reference, replaced since
        self._commits = 0

    def reset(self) -> None:
        """Start empty. The disk store removes leftovers of an earlier attempt (the resume checkpoint
        is the truth): called only once the run is accepted, never by a refused start."""
        self._forget()
        if self.where == "disk":
            shutil.rmtree(self.directory, ignore_errors=True)

    def _forget(self) -> None:
        self._pending.clear()
        self._committed.clear()
        self._files.clear()
        self._superseded.clear()
        self._commits = 0

    def _file(self, client_id: int, name: str, directory: Optional[Path] = None) -> Path:
        return (directory or self.directory) / str(client_id) / name

    def get(self, client_id: int) -> dict:
        """The client's committed state, copied onto the training device ({} before its first round)."""
        if self.where == "disk":
            version = self._files.get(client_id)
            return load_torch(self._file(client_id, version[0]), map_location=self.device) if version else {}
        return copy_to(self._committed.get(client_id, {}), self.device)

    def put(self, client_id: int, state: dict) -> None:
        if self.where == "disk":
            save_torch(state, self._file(client_id, self.PENDING))
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
            staged = load_torch(self._file(client_id, self.PENDING), map_location=self.device)
        else:
            staged = self._pending[client_id]
        self.put(client_id, {**staged, **entries})

    def staged(self, client_id: int) -> Optional[dict]:
        """What the client staged this round, None if nothing (device and host stores): the distributed
        engine sends it to the processes that did not train the client."""
        return self._pending.get(client_id)

    def discard(self, client_id: int) -> None:
        """Forget what the client staged this round (a dropped client's round does not count)."""
        if self._pending.pop(client_id, None) is not None and self.where == "disk":
            self._file(client_id, self.PENDING).unlink(missing_ok=True)

    def commit(self) -> None:
        for client_id, state in self._pending.items():
            if self.where == "disk":
                self._commit_file(client_id)
            else:
                self._committed[client_id] = state
        self._pending.clear()
        self._commits += 1

    def _commit_file(self, client_id: int) -> None:
        name = f"state.{self._commits}.pt"
        path = self._file(client_id, name)
        self._file(client_id, self.PENDING).replace(path)
        old = self._files.get(client_id)
        self._files[client_id] = (name, path.stat().st_size)
        if old is None:
            return
        if client_id in self._superseded:  # committed since the last checkpoint: none references it
            self._file(client_id, old[0]).unlink()
        else:
            self._superseded[client_id] = old[0]

    def prune(self) -> None:
        """Delete the disk store's versions that only older checkpoints reference: call once a
        resume.pt holding this store's state_dict() has been written."""
        for client_id, name in self._superseded.items():
            self._file(client_id, name).unlink(missing_ok=True)
        self._superseded.clear()

    def client_ids(self) -> list[int]:
        return sorted(self._files if self.where == "disk" else self._committed)

    def state_dict(self) -> dict:
        """Every client's committed state on the host; the disk store's as references,
        {client: [file name, bytes]}, to files in its directory."""
        if self.where == "disk":
            return {str(i): list(self._files[i]) for i in self.client_ids()}
        return {str(i): copy_to(self.get(i), "cpu") for i in self.client_ids()}

    def referenced_file(self, client_id: int, entry: list, source: Optional[Path] = None) -> Path:
        """The file a reference names, in `source` (default: this store's directory), refused
        with one message if it is missing or not of the size the checkpoint recorded."""
        path = self._file(client_id, entry[0], source)
        size = path.stat().st_size if path.is_file() else None
        if size is None:
            raise UserError(f"the resume checkpoint's client state file {path} is missing. {REFERENCE_FIX}")
        if size != entry[1]:
            raise UserError(f"the resume checkpoint's client state file {path} has {size} bytes where the checkpoint "
                            f"recorded {entry[1]}: it was changed after the checkpoint was written. {REFERENCE_FIX}")
        return path

    @staticmethod
    def read_referenced(path: Path) -> dict:
        """A referenced file's state, memory-mapped (its tensors are read only when used): checking
        every client's file never holds them all in memory."""
        try:
            return load_torch(path, mmap=True)
        except UserError:
            raise UserError(f"the resume checkpoint's client state file {path} cannot be read: it is corrupt. "
                            f"{REFERENCE_FIX}") from None

    def load_state_dict(self, state: dict, source: Optional[Path] = None) -> None:
        """Load what state_dict() wrote. The disk store's references name files in `source`
        (default: its own directory, whose other files go); files elsewhere are linked or copied in."""
        if not (self.where == "disk" and state and all(is_reference(e) for e in state.values())):
            self.reset()
            for client_id, client_state in state.items():
                self.put(int(client_id), client_state)
            self.commit()
            return
        files = {int(c): (name, size) for c, (name, size) in state.items()}
        source = Path(source or self.directory)
        if source.resolve() == self.directory.resolve():
            # the rounds after the checkpoint are trained again: their versions and staged states go
            keep = {self._file(c, name) for c, (name, _) in files.items()}
            self._forget()
            for path in self.directory.glob("*/*"):
                if path not in keep and path.is_file():
                    path.unlink()
        else:
            self.reset()
            for c, (name, _) in files.items():
                link_or_copy(self._file(c, name, source), self._file(c, name))
        self._files = files
        self._commits = 1 + max(int(VERSION.fullmatch(name)[1]) for name, _ in files.values())

"""The run directory's protocol, before anything is written there: one process at a time (a lock),
writable, and a start that cannot mix two runs' files."""
import fcntl
import logging
import os
import socket
from pathlib import Path

from omegaconf import OmegaConf

from src.errors import UserError
from src.sweep.protocol import METRICS_FILE, RESULTS_FILE

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
# Files only a run that completed rounds writes: a fresh start never writes over them.
RUN_OUTPUTS = (METRICS_FILE, RESULTS_FILE, "FINAL_MODEL.pt", "GLOBAL_MODEL.pt")
# Files that are appended to rather than replaced: they must be writable themselves.
APPENDED = (METRICS_FILE, "train.log")


class RunDirLock:
    """An exclusive flock on <run dir>/.lock for as long as the run uses the directory.

    The kernel releases a flock when its process ends, however it ends (kill -9 included), so a
    crashed run never leaves a stale lock: the file stays, but nobody holds it. The pid and host
    written into it only name the holder in the message. (On NFS, flock needs a server with lock
    support, as Linux's NFS client emulates it with byte-range locks.)"""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd = None

    def __enter__(self) -> "RunDirLock":
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"cannot write to the run directory {self.path.parent} ({e.strerror}): fix its "
                            "permissions (chmod u+w) or choose another one with hydra.run.dir=DIR") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(f"run directory {self.path.parent} is in use by another run ({holder}): wait for "
                            "it to end, or start this one elsewhere with hydra.run.dir=DIR") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        os.close(self._fd)  # releases the lock; the file stays (unlinking it would race a waiting run)


def check_writable(run_dir: Path) -> None:
    """Everything the run will write: the directory (files are replaced by rename), the files it
    appends to, and the per-client state folders."""
    paths = [run_dir, *(run_dir / name for name in APPENDED if (run_dir / name).exists())]
    client_state = run_dir / "client_state"
    if client_state.is_dir():
        paths += [client_state, *(p for p in client_state.iterdir() if p.is_dir())]
    blocked = [str(p) for p in paths if not os.access(p, os.W_OK)]
    if blocked:
        raise UserError(f"cannot write to {', '.join(blocked[:5])}: the run needs to write there. Fix the "
                        "permissions (chmod u+w) or start the run elsewhere with hydra.run.dir=DIR; nothing was changed")


def remove_temporaries(run_dir: Path) -> None:
    """Temporary files of atomic writes cut short by a kill (`.NAME.*.tmp`, src/utils/io.py)."""
    for tmp in [*run_dir.glob(".*.tmp"), *run_dir.glob("client_state/*/.*.tmp")]:
        tmp.unlink(missing_ok=True)
        log.info("removed %s, left by an interrupted write", tmp)


def saved_config(run_dir: Path) -> dict | None:
    """The settings of the run that wrote this directory (its config.yaml), if readable."""
    path = run_dir / "config.yaml"
    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=True) if path.is_file() else None
    except Exception:  # a damaged config.yaml says nothing about whose files these are
        return None

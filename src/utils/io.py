"""Atomic writes and safe loads for everything the run directory holds."""
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from src.errors import UserError


_UMASK = os.umask(0)
os.umask(_UMASK)


def _atomic_write(path: Path, write) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`:
    a crash leaves either the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)   # mkstemp makes it owner-only; results are shared as usual files
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_torch(obj: Any, path: Path) -> None:
    _atomic_write(path, lambda f: torch.save(obj, f))


def save_json(obj: Any, path: Path) -> None:
    _atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def save_text(text: str, path: Path) -> None:
    _atomic_write(path, lambda f: f.write(text.encode()))


def load_torch(path: Path, map_location: Any = "cpu") -> Any:
    """Load a checkpoint with torch's safe unpickler (tensors and plain containers only)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist: check the path given to resume=")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise UserError(
            f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            "It is corrupt or not a checkpoint of this framework: move it away to start afresh, "
            "or pass resume=PATH with a good checkpoint. The file was left untouched."
        ) from None

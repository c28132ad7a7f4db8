"""Atomic writes and safe loads for everything the run directory holds."""
import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any

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
    import torch   # here, not above: the sweep writes json and text through this module without torch
    _atomic_write(path, lambda f: torch.save(obj, f))


def link_or_copy(src: Path, dst: Path) -> None:
    """`dst` with the bytes of `src`: a hard link where the file system allows one (no bytes copied,
    so only for files that are never written in place), else an atomic copy."""
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        with open(src, "rb") as f:
            _atomic_write(dst, lambda out: shutil.copyfileobj(f, out))


def save_json(obj: Any, path: Path) -> None:
    """Strict JSON: a NaN or infinity is an error here, never a file other readers reject."""
    text = json.dumps(obj, indent=2, allow_nan=False) + "\n"
    _atomic_write(path, lambda f: f.write(text.encode()))


def save_text(text: str, path: Path) -> None:
    _atomic_write(path, lambda f: f.write(text.encode()))


def load_torch(path: Path, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """Load a checkpoint with torch's safe unpickler (tensors and plain containers only); with
    `mmap` its tensors are memory-mapped, read from the file only when used."""
    import torch
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist: check the path given to resume=")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "GLOBAL" not in str(e):   # not a refused class: a damaged or foreign file
            raise UserError(_unreadable(path, e)) from None
        raise UserError(
            f"checkpoint {path} is refused: it holds Python objects that only a full unpickling could rebuild, "
            "and loading it that way could execute code hidden in the file. Only checkpoints written by this "
            "framework (tensors and plain containers) are loaded. The file was left untouched.") from None
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise UserError(_unreadable(path, e)) from None


def _unreadable(path: Path, e: Exception) -> str:
    # torch's own advice (weights_only=False, filing an issue) is left out: it would run the file's code
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    detail = next((line for line in lines if not any(
        w in line for w in ("weights_only", "Please file", "Check the documentation"))), "")[:200]
    size = path.stat().st_size
    return (f"checkpoint {path} cannot be read ({type(e).__name__}{': ' + detail if detail else ''}"
            f"{'; the file is empty' if size == 0 else ''}). It is corrupt or not a checkpoint of this framework: "
            "move it away to start afresh, or pass resume=PATH with a good checkpoint. The file was left untouched.")

"""What train.py needs from Hydra before the task runs (no torch here: it keeps --help fast).

- `${pid:}` makes the default run folder unique: two runs started in the same second on one host
  never share a folder (the run-directory lock in src/run.py catches every other sharing).
- RunDirCallback checks hydra.run.dir / hydra.sweep.dir before Hydra creates them, so a path that is
  a file or cannot be created is one message (exit 2), and remembers whether the run directory is
  new: a refused start removes a directory it created and leaves an existing one as it was."""
import os
import sys
from pathlib import Path
from typing import Any, Optional

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

if not OmegaConf.has_resolver("pid"):
    OmegaConf.register_new_resolver("pid", os.getpid)

# The run directory this process created itself (None: it existed before the run started), and
# the parent folders created with it, innermost first.
created_run_dir: Optional[Path] = None
created_parents: list[Path] = []


def _refuse(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def make_dir(path: Path, key: str) -> list[Path]:
    """Create `path` (and its parents); the folders created, innermost first. Refuses a path that
    is, or lies below, a file."""
    missing = []
    try:
        for folder in (path, *path.parents):
            if folder.is_dir():
                break
            if folder.exists() or folder.is_symlink():
                _refuse(f"{key}={path}: {folder} is a file, not a directory: give a directory path ({key}=DIR)")
            missing.append(folder)
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _refuse(f"{key}={path} cannot be created ({e.strerror}): give a directory you can write ({key}=DIR)")
    return missing


class RunDirCallback(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        global created_run_dir, created_parents
        run_dir = Path(str(config.hydra.run.dir)).absolute()
        created = make_dir(run_dir, "hydra.run.dir")
        created_run_dir, created_parents = (run_dir, created[1:]) if created else (None, [])

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # The launcher resolves hydra.sweep.dir (${name} -> ${hydra:runtime.choices...}) before any
        # job has set HydraConfig: set it here so the default sweep folder resolves.
        HydraConfig.instance().set_config(config)
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if sweep_dir.exists() and not sweep_dir.is_dir():
            _refuse(f"hydra.sweep.dir={sweep_dir} is a file, not a directory: give a directory path")

"""Weights & Biases logging of the config and per-round metrics, chosen in config/logger/."""
import logging
import os
import uuid
from pathlib import Path
from typing import Literal, Optional, Sequence

log = logging.getLogger(__name__)


class WandbLogger:
    """mode: online, offline (files under the run dir, `wandb sync` later) or disabled. A resumed
    run continues the same wandb run (its id is kept in the run directory)."""

    def __init__(self, mode: Literal["online", "offline", "disabled"] = "disabled", project: str = "fedsim",
                 entity: Optional[str] = None, tags: Sequence[str] = ()):
        if mode not in ("online", "offline", "disabled"):
            raise ValueError(f"mode must be online, offline or disabled, got {mode!r}")
        self.mode, self.project, self.entity, self.tags = mode, project, entity, list(tags)
        self._run = None

    def start(self, run_dir: Path, config: dict) -> None:
        if self.mode == "disabled":
            return
        import wandb  # imported only when used: it is slow to import

        id_file = Path(run_dir) / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        os.environ.setdefault("WANDB_SILENT", "true")
        self._run = wandb.init(project=self.project, entity=self.entity, tags=self.tags, config=config,
                               dir=str(run_dir), mode=self.mode, id=run_id, resume="allow",
                               name=Path(run_dir).name)

    def log(self, metrics: dict, step: int) -> None:
        if self._run is not None:
            self._run.log(metrics, step=step)

    def finish(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None

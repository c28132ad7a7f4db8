"""Weights & Biases logging of the config and per-round metrics, chosen in config/logger/."""
import logging
import os
import uuid
from pathlib import Path
from typing import Optional, Sequence

log = logging.getLogger(__name__)

WANDB_ALIASES = {"dryrun": "offline", "run": "online"}


class WandbLogger:
    """mode: online, offline (files under the run dir, `wandb sync` later) or disabled. A resumed
    run continues the same wandb run (its id is kept in the run directory). `name` defaults to the
    run directory's name; `group` gathers runs (a sweep groups the seeds of each of its runs)."""

    def __init__(self, mode: str = "disabled", project: str = "fedsim",
                 entity: Optional[str] = None, tags: Sequence[str] = (), name: Optional[str] = None,
                 group: Optional[str] = None, job_type: Optional[str] = "train"):
        mode = WANDB_ALIASES.get(mode, mode)   # the mode may come from WANDB_MODE, in wandb's own spelling
        if mode not in ("online", "offline", "disabled"):
            raise ValueError(f"mode must be online, offline or disabled, got {mode!r} (logger.mode, or the "
                             "WANDB_MODE environment variable when logger.mode is not given)")
        self.mode, self.project, self.entity, self.tags = mode, project, entity, list(tags)
        self.name, self.group, self.job_type = name, group, job_type
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
                               name=self.name or Path(run_dir).name, group=self.group, job_type=self.job_type)

    def log(self, metrics: dict, step: int) -> None:
        if self._run is not None:
            self._run.log(metrics, step=step)

    def finish(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None

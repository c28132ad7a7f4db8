"""What train.py does once Hydra has composed the config: validate, find a checkpoint to resume,
build the algorithm, fit."""
import json
import logging
import sys
from pathlib import Path

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from src.algo.base import RESULTS_FILE, RESUME_FILE, TrainingInterrupted
from src.config import validate
from src.errors import UserError
from src.utils.io import load_torch, save_text

log = logging.getLogger(__name__)


def find_checkpoint(cfg: DictConfig, run_dir: Path) -> Path | None:
    """resume=PATH (a resume.pt or the run directory holding one) wins; otherwise a resume.pt
    already in this run directory (a requeued job) is continued."""
    if cfg.resume is not None:
        path = Path(cfg.resume)
        return path / RESUME_FILE if path.is_dir() else path
    own = run_dir / RESUME_FILE
    return own if own.exists() else None


def run(cfg: DictConfig, run_dir: Path) -> dict:
    validate(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = find_checkpoint(cfg, run_dir)
    state = load_torch(checkpoint) if checkpoint else None
    if state is not None and state["round"] >= cfg.num_rounds and (run_dir / RESULTS_FILE).exists():
        log.info("run in %s already finished its %d rounds: nothing to do", run_dir, cfg.num_rounds)
        return json.loads((run_dir / RESULTS_FILE).read_text())
    # called directly, not through instantiate(), so that a UserError reaches the user unwrapped
    algo_class = get_class(cfg.algo._target_)
    algo = algo_class(cfg=cfg, run_dir=run_dir, **{k: v for k, v in cfg.algo.items() if not k.startswith("_")})
    if state is not None:
        algo.load_state_dict(state)
        log.info("continuing from %s (round %d)", checkpoint, state["round"])
    save_text(OmegaConf.to_yaml(cfg, resolve=True), run_dir / "config.yaml")
    results = algo.fit()
    log.info("final test accuracy %.2f%% after %d rounds; results in %s",
             100 * (results["final_test_accuracy"] or 0.0), results["rounds"], run_dir / RESULTS_FILE)
    return results


def main(cfg: DictConfig, run_dir: Path) -> dict:
    """run() with the user's errors printed as one message and turned into exit codes."""
    try:
        return run(cfg, run_dir)
    except UserError as e:
        log.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingInterrupted as e:
        log.warning("%s; run `python train.py ... hydra.run.dir=%s` again to continue", e, run_dir)
        sys.exit(128 + e.signum)

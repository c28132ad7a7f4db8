"""What train.py does once Hydra has composed the config: validate, lock and check the run directory,
find a checkpoint to resume and check it completely, and only then write anything and fit.

Until the run is accepted nothing in the run directory changes: a refused start leaves every file
byte-identical (and removes the directory if this process created it)."""
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from src import hydra_hooks
from src.algo.base import TrainingDiverged, TrainingInterrupted
from src.checkpoint import check_resumable, settings_differences
from src.config import validate
from src.engine import distributed
from src.errors import UserError
from src.run_dir import LOCK_FILE, RUN_OUTPUTS, RunDirLock, check_writable, remove_temporaries, saved_config
from src.sweep.protocol import RESULTS_FILE, RESUME_FILE
from src.utils.io import load_torch, save_text

log = logging.getLogger(__name__)
LOG_FILE = "train.log"
_log_file: Optional[logging.Handler] = None


def find_checkpoint(cfg: DictConfig, run_dir: Path) -> Path | None:
    """resume=PATH (a resume.pt or the run directory holding one), or else a resume.pt already in
    this run directory (a requeued job) is continued. Both at once is refused: the user says which wins."""
    own = run_dir / RESUME_FILE
    if cfg.resume is None:
        return own if own.exists() else None
    path = Path(cfg.resume)
    path = path / RESUME_FILE if path.is_dir() else path
    if own.exists() and not (path.exists() and path.samefile(own)):
        raise UserError(
            f"resume={cfg.resume} was given, but this run directory ({run_dir}) holds its own resume.pt "
            f"(round {read_checkpoint(own)['round']}). Say which one wins: drop resume= to continue this "
            f"directory's own run, or start from {path} in a new directory (hydra.run.dir=NEW_DIR).")
    return path


def read_checkpoint(path: Path) -> dict:
    """A resume checkpoint's contents, refused unless it is one (not a model file, list, ...)."""
    state = load_torch(path)
    if isinstance(state, dict) and isinstance(state.get("round"), int) and isinstance(state.get("config"), dict):
        return state
    if isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
        held = "a model's weights (FINAL_MODEL.pt and GLOBAL_MODEL.pt hold only those)"
    else:
        held = f"a {type(state).__name__} without a run's round and settings"
    raise UserError(f"{path} is not a resume checkpoint: it holds {held}. Pass resume= a run directory or "
                    "its resume.pt. The file was left untouched.")


def read_results(run_dir: Path) -> dict:
    path = run_dir / RESULTS_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} cannot be read ({type(e).__name__}): the run is finished but its results file is "
                        "damaged. Move it away and run the same command again to rewrite it from resume.pt.") from None


def stopped_early(run_dir: Path) -> bool:
    """Whether the run's results say it stopped early (early_stopping.patience): then it is finished."""
    try:
        return bool(json.loads((run_dir / RESULTS_FILE).read_text()).get("stopped_early"))
    except (OSError, ValueError, AttributeError):
        return False


def check_fresh_start(run_dir: Path, current: dict) -> None:
    """No checkpoint to continue: refuse to write over another run's outputs. An earlier attempt
    at this very run (same settings) that stopped before its first checkpoint starts afresh."""
    present = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if not present:
        return
    saved = saved_config(run_dir)
    same_run = saved is not None and not settings_differences(saved, current)
    if same_run and not (run_dir / RESULTS_FILE).exists():
        log.warning("%s holds rounds of an earlier attempt at this run that stopped before its first "
                    "checkpoint: starting it afresh (metrics.jsonl restarts at round 1)", run_dir)
        return
    raise UserError(
        f"run directory {run_dir} holds the outputs of {'this' if same_run else 'another'} run "
        f"({', '.join(present)}) but no resume.pt to continue from: start in a new directory "
        "(hydra.run.dir=NEW_DIR), or move those files away. Nothing was changed.")


def build(cfg: DictConfig, run_dir: Path):
    # called directly, not through instantiate(), so that a UserError reaches the user unwrapped
    algo_class = get_class(cfg.algo._target_)
    return algo_class(cfg=cfg, run_dir=run_dir, **{k: v for k, v in cfg.algo.items() if not k.startswith("_")})


def write_run_config(cfg: DictConfig, hydra_cfg: Optional[DictConfig], run_dir: Path) -> None:
    """config.yaml (resolved) and Hydra's own copies in .hydra/, once the run is accepted."""
    save_text(OmegaConf.to_yaml(cfg, resolve=True), run_dir / "config.yaml")
    if hydra_cfg is not None:
        hydra_dir = run_dir / ".hydra"
        save_text(OmegaConf.to_yaml(cfg), hydra_dir / "config.yaml")
        save_text(OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra_cfg})), hydra_dir / "hydra.yaml")
        save_text(OmegaConf.to_yaml(hydra_cfg.overrides.task), hydra_dir / "overrides.yaml")


def attach_log_file(run_dir: Path) -> None:
    global _log_file
    _log_file = logging.FileHandler(run_dir / LOG_FILE)
    _log_file.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logging.getLogger().addHandler(_log_file)


def run(cfg: DictConfig, run_dir: Path, hydra_cfg: Optional[DictConfig] = None) -> dict:
    validate(cfg)
    world = distributed.join(cfg)  # engine=distributed: this process's rank; otherwise rank 0 of 1
    if world.rank:
        results = follow(cfg, run_dir, world)
    else:
        with world.leading() as started:
            results = lead(cfg, run_dir, hydra_cfg, started)
    world.leave()
    return results


def lead(cfg: DictConfig, run_dir: Path, hydra_cfg: Optional[DictConfig], started=lambda state: None) -> dict:
    """The run, in its only process or in rank 0 of a distributed one; `started(state)` once accepted."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with RunDirLock(run_dir):
        check_writable(run_dir)
        checkpoint = find_checkpoint(cfg, run_dir)
        state = read_checkpoint(checkpoint) if checkpoint else None
        current = OmegaConf.to_container(cfg, resolve=True)
        if state is not None:
            check_resumable(state["config"], current, cfg)
            if (run_dir / RESULTS_FILE).exists() and (state["round"] >= cfg.num_rounds or stopped_early(run_dir)):
                results = read_results(run_dir)
                log.info("run in %s already finished (%d rounds%s): nothing to do", run_dir, state["round"],
                         ", stopped early" if results.get("stopped_early") else "")
                return results
        else:
            check_fresh_start(run_dir, current)
        algo = build(cfg, run_dir)
        if state is not None:
            algo.resume_from = checkpoint  # the disk client store's files lie beside it
            algo.check_state(state)
        # accepted: from here on the run directory is written
        remove_temporaries(run_dir)
        write_run_config(cfg, hydra_cfg, run_dir)
        attach_log_file(run_dir)
        if hydra_cfg is not None:
            algo.overrides = list(hydra_cfg.overrides.task)
        algo.start(state)
        if state is not None:
            log.info("continuing from %s (round %d)", checkpoint, state["round"])
        started((run_dir, state))
        results = algo.fit()
        log.info("final test accuracy %.2f%% after %d rounds; results in %s",
                 100 * (results["final_test_accuracy"] or 0.0), results["rounds"], run_dir / RESULTS_FILE)
        return results


def follow(cfg: DictConfig, run_dir: Path, world) -> dict:
    """A distributed run's process of rank > 0: once rank 0 has accepted the run, the same replica
    from the same state, in a scratch folder of its own (rank 0 alone writes the run directory),
    logging only errors. It exits with rank 0's code when rank 0 does not start the run."""
    logging.getLogger().setLevel(logging.ERROR)
    code, started = world.share(None)
    if code or started == distributed.FINISHED:
        remove_created_run_dir(run_dir)
        if code:
            sys.exit(code)
        return {}
    leader_dir, state = started
    if run_dir.absolute() != Path(leader_dir).absolute():  # the default run folder names each process's pid
        remove_created_run_dir(run_dir)
    with tempfile.TemporaryDirectory(prefix=f"fedsim-rank{world.rank}-") as scratch:
        algo = build(cfg, Path(scratch))
        algo.start(state)
        return algo.fit()


def report(message: str) -> None:
    """One message on stderr; the run's log file (if it has one yet) keeps a copy."""
    print(f"error: {message}", file=sys.stderr)
    if _log_file is not None:
        _log_file.emit(logging.LogRecord(__name__, logging.ERROR, __file__, 0, message, None, None))


def remove_created_run_dir(run_dir: Path) -> None:
    """A refused start in a directory this process created leaves no folder behind."""
    created = hydra_hooks.created_run_dir
    if created is None or created != run_dir.absolute():
        return
    leftovers = [p.name for p in run_dir.iterdir()] if run_dir.is_dir() else []
    if set(leftovers) <= {LOCK_FILE}:
        shutil.rmtree(run_dir, ignore_errors=True)
        for parent in hydra_hooks.created_parents:
            try:
                parent.rmdir()   # only while empty: another run may have started there meanwhile
            except OSError:
                break


def main(cfg: DictConfig, run_dir: Path, hydra_cfg: Optional[DictConfig] = None) -> dict:
    """run() with the user's errors printed as one message and turned into exit codes."""
    global _log_file
    try:
        return run(cfg, run_dir, hydra_cfg)
    except UserError as e:
        report(str(e))
        remove_created_run_dir(run_dir)
        sys.exit(2)
    except TrainingInterrupted as e:
        log.warning("%s; run `python train.py ... hydra.run.dir=%s` again to continue", e, run_dir)
        sys.exit(128 + e.signum)
    except TrainingDiverged as e:  # not the input's fault: exit 3, distinct from bad input's 2
        report(str(e))
        sys.exit(3)
    finally:
        if _log_file is not None:
            logging.getLogger().removeHandler(_log_file)
            _log_file.close()
            _log_file = None

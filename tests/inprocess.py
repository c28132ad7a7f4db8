"""Algorithms built and run in-process as src/run.py builds them, and the interrupt-then-resume
sequence the resume tests share."""
import signal
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class
from omegaconf import DictConfig, open_dict

import src.hydra_hooks  # noqa: F401  (registers the ${pid:} resolver, as train.py does)
from src.algo.base import TrainingInterrupted
from src.config import validate
from src.utils.io import load_torch

# A federation small enough for a few rounds in about a second.
SMALL = ["dataset=synthetic", "model=mlp", "clients.total=6", "dataset.max_device_size=60",
         "clients.per_round=0.5", "optimizer.lr=0.05", "num_rounds=4", "eval_every=2", "device=cpu",
         "client.batch_size=50", "client.local_epochs=1"]


CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "config")


def compose_config(*overrides: str) -> DictConfig:
    """The project's config with overrides, as train.py composes it (without running it)."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # so that ${hydra:...} interpolations resolve
    return cfg


def as_shared(overrides: list[str]) -> dict:
    """Command-line overrides as a sweep's `shared:` mapping, values typed as yaml types them."""
    return {key: yaml.safe_load(value) for key, value in (o.split("=", 1) for o in overrides)}


SMALL_SHARED = as_shared(SMALL)


def build_algo(compose_cfg, run_dir: Path, *overrides):
    """What src/run.py does, in-process."""
    cfg = compose_cfg(*overrides)
    validate(cfg)
    with open_dict(cfg):
        del cfg["hydra"]  # train.py's cfg has no hydra node (its ${hydra:} values still resolve)
    kwargs = {k: v for k, v in cfg.algo.items() if not k.startswith("_")}
    return get_class(cfg.algo._target_)(cfg=cfg, run_dir=run_dir, **kwargs)


def stop_after_round(algo, stop_round: int):
    """Make `algo` receive SIGTERM's stop flag once `stop_round` is recorded."""
    record = algo.record

    def record_then_stop(metrics):
        record(metrics)
        if algo.round == stop_round:
            algo._stop_signal = signal.SIGTERM
    algo.record = record_then_stop


def interrupted(compose_cfg, run_dir: Path, settings, stop_round: int):
    """Train until `stop_round` and stop as on SIGTERM; return a fresh instance for run_dir (its
    checkpoint not loaded yet: call resume())."""
    cut = build_algo(compose_cfg, run_dir, *settings)
    stop_after_round(cut, stop_round)
    with pytest.raises(TrainingInterrupted):
        cut.fit()
    return build_algo(compose_cfg, run_dir, *settings)


def resume(algo):
    algo.load_state_dict(load_torch(algo.run_dir / "resume.pt"))
    return algo


def metrics_without_times(algo) -> list[dict]:
    return [{k: v for k, v in m.items() if k != "round_time_s"} for m in algo.history]

"""What the benchmark scripts share."""
import time
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"


def build_fedavg(overrides: list[str], run_dir: Path):
    """A FedAvg run built as train.py builds it from `overrides`, without starting it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from src.algo import FedAvg
    from src.config import validate

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    validate(cfg)
    return FedAvg(cfg=cfg, run_dir=run_dir, server=cfg.algo.server)


def timed(fn, device: torch.device) -> float:
    """Seconds `fn()` takes, the device's queued work included."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start

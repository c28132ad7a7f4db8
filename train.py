"""Simulate federated learning: `python train.py algo=fedavg dataset=cifar10 ...` (Hydra overrides)."""
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="config", config_name="config")
def main(cfg: DictConfig) -> None:
    from src.run import main as run_main  # imported late: keeps --help and --cfg fast

    run_main(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()

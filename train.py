"""Simulate federated learning: `python train.py algo=fedavg dataset=cifar10 ...` (Hydra overrides)."""
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import src.hydra_hooks  # noqa: F401  (the ${pid:} resolver of the default run folder)


@hydra.main(version_base="1.3", config_path="config", config_name="config")
def main(cfg: DictConfig) -> None:
    from src.run import main as run_main  # imported late: keeps --help and --cfg fast

    hydra_cfg = HydraConfig.get()
    run_main(cfg, Path(hydra_cfg.runtime.output_dir), hydra_cfg)


if __name__ == "__main__":
    from src.cli import check_command_line

    check_command_line()  # a misspelt key: one message with the closest known keys, before Hydra's
    main()

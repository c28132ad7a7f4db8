import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

import src.hydra_hooks  # noqa: F401  (registers the ${pid:} resolver, as train.py does)

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = str(ROOT / "config")
# logger.mode follows WANDB_MODE: tests never log to W&B (nor pay its start-up), whatever the shell sets
os.environ["WANDB_MODE"] = "disabled"


@pytest.fixture
def compose_cfg():
    """Compose the project's config with overrides, as train.py would (without running it)."""
    def _compose(*overrides: str):
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)  # so that ${hydra:...} interpolations resolve
        return cfg
    return _compose


@pytest.fixture(scope="session")
def fmnist_root(tmp_path_factory):
    """One dataset root for the session: Fashion-MNIST is unpacked there once (from the Debian package)."""
    return tmp_path_factory.mktemp("data")


def run_train(run_dir: Path, *overrides: str, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python train.py ...` as a user types it, in its own process, writing into run_dir."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "train.py", f"hydra.run.dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc

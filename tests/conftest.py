import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.inprocess import CONFIG_DIR, compose_config  # noqa: F401  (CONFIG_DIR: for the tests)

ROOT = Path(__file__).resolve().parents[1]
# logger.mode follows WANDB_MODE: tests never log to W&B (nor pay its start-up), whatever the shell sets
os.environ["WANDB_MODE"] = "disabled"


@pytest.fixture
def compose_cfg():
    """Compose the project's config with overrides, as train.py would (without running it)."""
    return compose_config


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

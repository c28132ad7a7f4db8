"""A run's model, rebuilt from its run directory, and its test accuracy and loss:

    python -m src.evaluate RUN_DIR [--device auto|cpu|cuda]

`load_model(run_dir)` builds the model of the run's config.yaml for the input shape and class count
in its model.json and loads FINAL_MODEL.pt, or GLOBAL_MODEL.pt (its last checkpoint) when the run
has not finished or diverged. The test split is the run's dataset's, as configured; the global model is
evaluated (also where the run evaluated the clients' mean EMA, client.ema.evaluate)."""
import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from src.algo.fedbase import resolve_device
from src.evaluation import pooled_scores
from src.errors import UserError
from src.utils.io import load_torch

log = logging.getLogger(__name__)

FINAL_MODEL, LAST_MODEL, MODEL_INFO, CONFIG = "FINAL_MODEL.pt", "GLOBAL_MODEL.pt", "model.json", "config.yaml"


def model_file(run_dir: Path) -> Path:
    """FINAL_MODEL.pt of a finished run, else the GLOBAL_MODEL.pt of its last checkpoint."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist: give the folder train.py wrote (its hydra.run.dir)")
    for name in (FINAL_MODEL, LAST_MODEL):
        if (run_dir / name).is_file():
            return run_dir / name
    raise UserError(f"{run_dir} holds neither {FINAL_MODEL} nor {LAST_MODEL}: it is not a run directory, or its "
                    "run stopped before the first checkpoint")


def run_config(run_dir: Path) -> DictConfig:
    path = Path(run_dir) / CONFIG
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:   # missing, unreadable or not yaml: OmegaConf raises several types
        raise UserError(f"{path} cannot be read ({type(e).__name__}): the run's config is needed to rebuild "
                        "its model") from None
    if not isinstance(cfg, DictConfig) or "model" not in cfg or "dataset" not in cfg:
        raise UserError(f"{path} is not the config.yaml of a run (no model or dataset)")
    return cfg


def load_model(run_dir: Path, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The run's model with its final (or last checkpointed) weights, on `device`, in eval mode."""
    run_dir = Path(run_dir)
    path = model_file(run_dir)
    if path.name == LAST_MODEL:
        log.warning("%s has no %s (the run has not finished, or diverged): loading %s, the global model of its "
                    "last checkpoint", run_dir, FINAL_MODEL, LAST_MODEL)
    else:
        log.info("loading %s", path)
    cfg = run_config(run_dir)
    try:
        info = json.loads((run_dir / MODEL_INFO).read_text())
        shape = {"in_shape": list(info["in_shape"]), "num_classes": int(info["num_classes"])}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{run_dir / MODEL_INFO} cannot be read ({type(e).__name__}: {e}): runs write it with "
                        'every checkpoint; for a run older than that, write {"in_shape": [C, H, W], "num_classes": '
                        "N} of its dataset there (e.g. [1, 28, 28] and 10 for Fashion-MNIST)") from None
    model = build(cfg.model, run_dir, **shape)
    try:
        model.load_state_dict(load_torch(path))
    except RuntimeError as e:   # other layers or shapes
        raise UserError(f"{path} does not fit the model of {run_dir / CONFIG}: {str(e).splitlines()[0]}") from None
    return model.to(device).eval()


def build(node: DictConfig, run_dir: Path, **kwargs):
    """instantiate(node) with its failure (a class renamed since the run, a dataset not found) as one message."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        raise UserError(f"{node._target_} of {run_dir / CONFIG} cannot be built: {str(e).strip()}") from None


def evaluate(model: torch.nn.Module, test, batch_size: int, tta: str = "none") -> dict:
    """Hard-label cross-entropy and accuracy on `test` (x, y on the model's device), as FedBase evaluates."""
    loss, acc = pooled_scores(model, test, batch_size, tta)
    return {"test_loss": loss, "test_accuracy": acc}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m src.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run directory written by train.py")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        device = resolve_device(args.device)
        model = load_model(args.run_dir, device)
        cfg = run_config(args.run_dir)
        test = build(cfg.dataset, args.run_dir).load(device).test
        metrics = evaluate(model, test, cfg.eval_batch_size, cfg.tta)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"test accuracy {100 * metrics['test_accuracy']:.2f}%  test loss {metrics['test_loss']:.4f}  "
          f"({len(test)} test samples)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

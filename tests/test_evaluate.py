"""src/evaluate.py: a run's model rebuilt from its run directory alone, and evaluated on its test split."""
import json
import logging
import shutil
import subprocess
import sys

import pytest
import torch
from hydra.utils import instantiate

from src.evaluate import load_model, main, run_config, evaluate
from src.utils.io import load_torch
from tests.conftest import ROOT, run_train
from tests.inprocess import SMALL


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("evaluate") / "run"
    run_train(run_dir, *SMALL)
    return run_dir


def test_the_final_model_is_rebuilt_and_scores_as_the_run_reported(finished_run):
    assert json.loads((finished_run / "model.json").read_text()) == {"in_shape": [60], "num_classes": 10}
    results = json.loads((finished_run / "results.json").read_text())
    model = load_model(finished_run)
    cfg = run_config(finished_run)
    metrics = evaluate(model, instantiate(cfg.dataset).load(torch.device("cpu")).test, cfg.eval_batch_size)
    assert metrics["test_accuracy"] == pytest.approx(results["final_test_accuracy"], abs=1e-6)
    assert metrics["test_loss"] == pytest.approx(results["final_test_loss"], rel=1e-5)

    proc = subprocess.run([sys.executable, "-m", "src.evaluate", str(finished_run), "--device", "cpu"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"test accuracy {100 * results['final_test_accuracy']:.2f}%" in proc.stdout
    assert "FINAL_MODEL.pt" in proc.stderr


def test_an_unfinished_run_loads_its_last_checkpoint_and_says_so(finished_run, tmp_path, caplog):
    run_dir = tmp_path / "unfinished"
    shutil.copytree(finished_run, run_dir)
    (run_dir / "FINAL_MODEL.pt").unlink()
    with caplog.at_level(logging.WARNING, logger="src.evaluate"):
        model = load_model(run_dir)
    assert "has not finished, or diverged): loading GLOBAL_MODEL.pt" in caplog.text
    saved = load_torch(run_dir / "GLOBAL_MODEL.pt")
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("damage, fragment", [
    ("missing", "does not exist: give the folder train.py wrote"),
    ("no model", "holds neither FINAL_MODEL.pt nor GLOBAL_MODEL.pt"),
    ("no model.json", "model.json cannot be read"),
    ("bad config", "config.yaml cannot be read"),
    ("other model", "FINAL_MODEL.pt does not fit the model of"),
])
def test_bad_run_directories_are_one_message(finished_run, tmp_path, capsys, damage, fragment):
    run_dir = tmp_path / "run"
    if damage != "missing":
        shutil.copytree(finished_run, run_dir)
    if damage == "no model":
        for name in ("FINAL_MODEL.pt", "GLOBAL_MODEL.pt"):
            (run_dir / name).unlink()
    elif damage == "no model.json":
        (run_dir / "model.json").unlink()
    elif damage == "bad config":
        (run_dir / "config.yaml").write_text("model: [unclosed")
    elif damage == "other model":
        (run_dir / "model.json").write_text(json.dumps({"in_shape": [61], "num_classes": 10}))
    assert main([str(run_dir), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and fragment in err and "Traceback" not in err

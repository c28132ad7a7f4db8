"""train.py's command line as a user types it: a misspelt key is one message naming the closest known
keys (exit 2, before Hydra starts), while everything Hydra accepts keeps working."""
import pytest

from src.cli import check_command_line
from src.data.datasets import CIFAR10, FashionMNIST
from src.errors import UserError
from src.sweep.experiment import Experiment, check_runs

from conftest import run_train
from inprocess import SMALL

HINT = "(check its spelling: `python train.py --cfg job` lists every key)"


@pytest.mark.parametrize("override,closest", [
    ("optimizer.lrr=0.1", "optimizer.lr"), ("num_round=3", "num_rounds"),
    ("clients.batch_size=10", "client.batch_size"),
    ("algo.client.optin=I", "algo.client.option"),   # a key of the chosen group (algo=scaffold below)
])
def test_a_misspelt_key_names_the_closest_known_key(capsys, override, closest):
    with pytest.raises(SystemExit) as e:
        check_command_line(["algo=scaffold", override, "--cfg", "job"])
    assert e.value.code == 2
    key = override.split("=")[0]
    assert capsys.readouterr().err == f"error: unknown key '{key}': did you mean {closest}? {HINT}\n"


def test_train_py_reports_every_misspelt_key_once_and_starts_nothing(tmp_path):
    proc = run_train(tmp_path / "run", "optimizer.lrr=0.1", "seed=0,1", "nosuch=1", "-m", check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == ("error: unknown keys 'optimizer.lrr' (did you mean optimizer.lr?), 'nosuch': check their "
                           "spelling (`python train.py --cfg job` lists every key)\n")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, message", [
    ("logger=none", "there is no config/logger/none.yaml: the options of logger are wandb"),
    ("compression=topk", "there is no config/compression/topk.yaml: the options of compression are none, qsgd, "
                         "random_k, sign, top_k"),
])
def test_an_option_a_group_lacks_gets_one_message_and_exit_2(capsys, override, message):
    with pytest.raises(SystemExit) as e:
        check_command_line([override, "--cfg", "job"])
    assert e.value.code == 2 and capsys.readouterr().err == f"error: {message}\n"


def test_what_hydra_accepts_still_works(tmp_path):
    proc = run_train(tmp_path / "run", "algo=scaffold", "algo.client.option=I", "+optimizer.extra=1", "++seed=3",
                     "~algo.server.weighting", "hydra.job.name=x", "hydra/launcher=basic", "algo.prox_mu=0.1",
                     "experiment=playbook/literal", "--cfg", "job")
    assert "extra: 1" in proc.stdout and "seed: 3" in proc.stdout and "weighting" not in proc.stdout
    assert "prox_mu: 0.1" in proc.stdout
    assert "Configuration groups" in run_train(tmp_path / "run", "--help").stdout


def test_multirun_still_runs(tmp_path):
    sweep = tmp_path / "sweep"
    run_train(tmp_path / "run", *SMALL, "num_rounds=1", "seed=0,1", f"hydra.sweep.dir={sweep}",
              "hydra.sweep.subdir=seed${seed}", "-m")
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["seed0", "seed1"]


def test_the_sweep_runner_names_the_closest_known_key(tmp_path):
    exp = Experiment(name="typo", grid={"clients.batch_size": [10]}, shared={"num_rounds": 1})
    with pytest.raises(UserError) as e:
        check_runs(exp.runs(tmp_path))
    assert f"run typo/batch_size-10: unknown key 'clients.batch_size': did you mean client.batch_size? {HINT}" \
        in str(e.value)


def test_a_dataset_root_that_is_a_file_is_refused_with_the_right_advice(tmp_path):
    file = tmp_path / "data"
    file.write_text("")
    proc = run_train(tmp_path / "run", f"dataset.root={file}", "device=cpu", "num_rounds=1", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"error: dataset.root={file}: {file} is a file, not a directory. Point dataset.root at a directory" \
        in proc.stderr and "delete" not in proc.stderr
    for dataset in (FashionMNIST(root=str(file / "below"), download=False), CIFAR10(root=str(file), download=False)):
        with pytest.raises(UserError, match=f"{file} is a file, not a directory. Point dataset.root at a directory"):
            dataset.load("cpu")

"""Sweeps without a cluster: declarations -> runs, up-front validation, sbatch scripts (dry run),
collect on fabricated run folders, and the local backend end to end."""
import json
import os
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml
from hydra.utils import instantiate

from src.algo.base import RESULTS_FILE
from src.sweep.backends import EXIT_FILE, LOG_FILE, load_slurm_options, slurm_minutes, submitit_parameters
from src.sweep.collect import RunRecord, accuracy_figure, collect, mean_std, summarize
from src.sweep.experiment import Experiment, SweepError, hydra_value, load_experiment, run_name, save_declaration
from src.sweep.runner import launch
from tests.conftest import ROOT
from src.utils.io import load_torch
from tests.inprocess import SMALL, SMALL_SHARED, build_algo



def test_grids_times_seeds_give_the_runs(tmp_path):
    exp = Experiment(name="e", grid=[{"algo": ["fedavg", "fedprox"], "optimizer.lr": [0.1, 0.01]},
                                     {"algo": ["scaffold"]}],
                     shared={"num_rounds": 3, "dataset": "synthetic"}, seeds=[0, 1])
    runs = exp.runs(tmp_path)
    names = ["algo-fedavg_lr-0.1", "algo-fedavg_lr-0.01", "algo-fedprox_lr-0.1", "algo-fedprox_lr-0.01", "scaffold"]
    assert [r.key for r in runs] == [f"{n}/seed{s}" for n in names for s in (0, 1)]
    first = runs[0]
    assert first.run_dir == tmp_path.resolve() / "e" / "algo-fedavg_lr-0.1" / "seed0"
    assert first.train_args() == ["logger.name=algo-fedavg_lr-0.1/seed0", "logger.group=e/algo-fedavg_lr-0.1",
                                  "num_rounds=3", "dataset=synthetic", "algo=fedavg", "optimizer.lr=0.1",
                                  "seed=0", f"hydra.run.dir={first.run_dir}"]
    assert runs[-1].overrides == ("num_rounds=3", "dataset=synthetic", "algo=scaffold")


def test_one_key_grids_are_named_by_their_values_and_values_are_spelt_for_hydra(tmp_path):
    exp = Experiment(name="p", grid={"experiment": ["playbook/literal", "playbook/tta"]})
    assert [r.name for r in exp.runs(tmp_path)] == ["literal", "tta"]
    assert [hydra_value(v) for v in (None, True, 3, 0.5, [1, 2], "a b", "x/y")] == \
        ["null", "true", "3", "0.5", "[1,2]", "'a b'", "x/y"]
    # strings Hydra would read as another type stay strings
    assert [hydra_value(v) for v in ("null", "true", "1", "it's")] == ["'null'", "'true'", "'1'", "'it\\'s'"]
    assert [r.name for r in Experiment(name="m", grid={"resume": [None, "/a/b.pt"], }).runs(tmp_path)] == \
        ["resume-null", "resume-b.pt"]
    assert run_name(["x"], ("..",), True) == "empty" and run_name(["x"], ("../up",), True) == "up"


@pytest.mark.parametrize("data, fragment", [
    ({"name": "e", "grid": {"seed": [0, 1]}}, "list the seeds under `seeds:`"),
    ({"name": "e", "grid": {"algo": "fedavg"}}, "give a non-empty list of values"),
    ({"name": "e", "seeds": []}, "non-empty list of integers"),
    ({"name": "a b"}, "it names a folder"),
    ({"name": "e", "gird": {}}, "unknown key(s) ['gird']"),
    ({"name": "e", "grid": {"x": ["a/b", "c/b"]}}, "both named 'b'"),
    ({"grid": {"algo": ["fedavg"]}}, "at least a name and a grid"),
    ({"name": "..", "grid": {"algo": ["fedavg"]}}, "not first '.'"),
    ({"name": "e", "grid": {"algo": ["fedavg"]}, "seeds": 5}, "non-empty list of integers"),
    ({"name": "e", "grid": {"algo": ["fedavg"]}, "seeds": [1, 1]}, "a seed is listed twice"),
    ({"name": "e"}, "give a non-empty mapping"),
    ({"name": "e", "grid": []}, "give at least one mapping"),
    ({"name": "e", "grid": {"algo": ["fedavg"]}, "shared": {"algo": "fedprox"}}, "both in the grid and in shared"),
    ({"name": "e", "grid": {"algo": ["fedavg"]}, "target_accuracy": 70}, "a fraction in (0, 1]"),
    ({"name": "e", "grid": {"algo": ["fedavg"]}, "baseline": "fedprox"}, "['fedprox'], which are not runs"),
])
def test_bad_declarations_are_refused(data, fragment):
    with pytest.raises(SweepError) as e:
        Experiment.from_dict(data, "test.yaml").variants()
    assert fragment in str(e.value)


def test_seeds_given_on_the_command_line_are_checked_too(tmp_path, capsys):
    from experiment_runner import main
    assert main(["run", "smoke", "--seeds", "5", "5", "--root", str(tmp_path)]) == 2
    assert "a seed is listed twice" in capsys.readouterr().err
    assert not (tmp_path / "smoke").exists()


def test_a_bad_shared_override_is_reported_once_for_all_runs(tmp_path):
    exp = Experiment(name="sh", grid={"algo": ["fedavg", "fedprox"]}, shared={**SMALL_SHARED, "optimizer.lrr": 0.1})
    with pytest.raises(SweepError) as e:
        launch(exp, "local", tmp_path, log=lambda *_: None)
    assert str(e.value).count("optimizer.lrr") == 1 and "runs sh/fedavg, sh/fedprox (2 runs)" in str(e.value)
    assert "check its spelling" in str(e.value) and "+optimizer.lrr" not in str(e.value)


def test_sweep_runs_are_named_and_grouped_in_wandb(compose_cfg, tmp_path, monkeypatch):
    """A sweep's run is <run>/seed<S> in the group <experiment>/<run>; a plain run keeps its folder's
    name. wandb.init is replaced: nothing goes to the network."""
    calls = []
    fake_run = types.SimpleNamespace(log=lambda *a, **k: None, finish=lambda: None)
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: calls.append(kw) or fake_run))
    run = Experiment(name="exp", grid={"optimizer.lr": [0.1]}, seeds=[3]).runs(tmp_path)[0]
    run.run_dir.mkdir(parents=True)
    instantiate(compose_cfg(*run.train_args(), "logger.mode=offline").logger).start(run.run_dir, {})
    instantiate(compose_cfg("logger.mode=offline").logger).start(tmp_path, {})
    assert [{k: c[k] for k in ("name", "group", "job_type", "mode")} for c in calls] == [
        {"name": "lr-0.1/seed3", "group": "exp/lr-0.1", "job_type": "train", "mode": "offline"},
        {"name": tmp_path.name, "group": None, "job_type": "train", "mode": "offline"}]


@pytest.mark.parametrize("env, overrides, mode", [
    (None, [], "disabled"), ("offline", [], "offline"), ("online", ["logger.mode=disabled"], "disabled"),
    ("dryrun", [], "offline")])   # wandb's own spelling of offline
def test_wandb_mode_follows_WANDB_MODE_unless_set_on_the_command_line(compose_cfg, monkeypatch, env, overrides, mode):
    if env is None:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    else:
        monkeypatch.setenv("WANDB_MODE", env)
    assert instantiate(compose_cfg(*overrides).logger).mode == mode


def test_a_results_folder_that_is_a_file_is_one_message(tmp_path, capsys):
    from experiment_runner import main
    (tmp_path / "file").write_text("")
    for root in (tmp_path / "file", tmp_path / "file" / "sub"):
        assert main(["run", "smoke", "--root", str(root)]) == 2
        assert f"{tmp_path / 'file'} is a file, not a folder" in capsys.readouterr().err


def test_unknown_experiment_lists_the_known_ones():
    with pytest.raises(SweepError, match="playbook"):
        load_experiment("no_such_experiment")


def test_every_run_is_composed_before_anything_runs(tmp_path):
    """A misspelt key and a wrong type, in different runs, are reported together, naming run and key;
    the good run is not started."""
    exp = Experiment(name="bad", grid={"optimizer.lrr": [0.1]}, shared=SMALL_SHARED)
    with pytest.raises(SweepError) as e:
        launch(exp, "local", tmp_path, log=lambda *_: None)
    assert "run bad/lrr-0.1" in str(e.value) and "optimizer.lrr" in str(e.value)

    exp = Experiment(name="bad", grid=[{"num_rounds": ["many"]}, {"optimizer.lrr": [0.1]}, {"algo": ["fedavg"]}],
                     shared={k: v for k, v in SMALL_SHARED.items() if k != "num_rounds"})
    with pytest.raises(SweepError) as e:
        launch(exp, "local", tmp_path, log=lambda *_: None)
    message = str(e.value)
    assert "run bad/many" in message and "num_rounds: expected int, got str 'many'" in message
    assert "run bad/lrr-0.1" in message and "optimizer.lrr" in message
    assert "run bad/fedavg" not in message
    assert not (tmp_path / "bad").exists()


def slurm_lines(script: str) -> list[str]:
    return [line for line in script.splitlines() if line.startswith("#SBATCH")]


def test_dry_run_scripts_hold_the_overrides_and_only_the_configured_options(tmp_path):
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(yaml.safe_dump({"partition": "gpu", "time": "01:00:00", "setup": ["module load cuda/12"]}))
    exp = Experiment(name="dry", grid={"algo": ["fedavg", "fedprox"]}, shared=SMALL_SHARED, seeds=[3],
                     slurm={"mem": "8G"})
    outcome = launch(exp, "slurm", tmp_path, cluster_file=cluster, slurm_set=("gres=gpu:1",), dry_run=True,
                     log=lambda *_: None)
    assert outcome["job_ids"] == []
    script_dir = tmp_path / "dry" / "slurm"
    assert sorted(p.name for p in script_dir.iterdir()) == ["collect.sbatch", "fedavg.seed3.sbatch",
                                                            "fedprox.seed3.sbatch"]
    run_dir = tmp_path.resolve() / "dry" / "fedprox" / "seed3"
    script = (script_dir / "fedprox.seed3.sbatch").read_text()
    assert slurm_lines(script) == [
        "#SBATCH --job-name=dry.fedprox.seed3", f"#SBATCH --output={run_dir}/{LOG_FILE}", "#SBATCH --open-mode=append",
        "#SBATCH --requeue", "#SBATCH --partition=gpu", "#SBATCH --time=01:00:00", "#SBATCH --mem=8G",
        "#SBATCH --gres=gpu:1"]
    assert "module load cuda/12" in script.splitlines()
    assert script.index("cd ") < script.index("module load")   # setup lines run in the repository
    assert 'trap \'kill -TERM "$pid" 2>/dev/null\' TERM' in script   # train.py gets time to save
    train = next(line for line in script.splitlines() if " train.py " in line)
    assert train == (f"{sys.executable} train.py logger.name=fedprox/seed3 logger.group=dry/fedprox {' '.join(SMALL)} "
                     f"algo=fedprox seed=3 hydra.run.dir={run_dir} &")
    # nothing about a cluster that the config did not give
    for absent in ("--account", "--qos", "--cpus-per-task", "--constraint", "module load cuda/12\nmodule"):
        assert absent not in script
    collect_script = (script_dir / "collect.sbatch").read_text()
    assert f"experiment_runner.py collect {tmp_path.resolve() / 'dry'}" in collect_script
    assert not (run_dir / LOG_FILE).exists()   # nothing ran


def test_without_options_the_scripts_name_no_cluster_settings(tmp_path):
    exp = Experiment(name="bare", grid={"algo": ["fedavg"]}, shared=SMALL_SHARED)
    launch(exp, "slurm", tmp_path, dry_run=True, log=lambda *_: None)
    script = (tmp_path / "bare" / "slurm" / "fedavg.seed0.sbatch").read_text()
    assert [line.split("=")[0] for line in slurm_lines(script)] == [
        "#SBATCH --job-name", "#SBATCH --output", "#SBATCH --open-mode", "#SBATCH --requeue"]


def test_missing_sbatch_suggests_the_local_backend(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    exp = Experiment(name="nosb", grid={"algo": ["fedavg"]}, shared=SMALL_SHARED)
    for backend in ("slurm", "submitit"):
        with pytest.raises(SweepError, match="sbatch not found.*--backend local"):
            launch(exp, backend, tmp_path, slurm_set=("time=10",), log=lambda *_: None)


@pytest.mark.parametrize("dotlist, fragment", [
    (["partion=gpu"], "partion"),
    (["cpus_per_task=many"], "cpus_per_task"),
    (["time=soon"], "time='soon'"),
    (["partition"], "--set partition: write KEY=VALUE"),
    (["extra=[--mail-type FAIL]"], "one --key=value item"),
])
def test_bad_slurm_options_are_refused(dotlist, fragment):
    with pytest.raises(SweepError) as e:
        load_slurm_options(None, {}, dotlist)
    assert fragment in str(e.value)


def test_unquoted_time_in_a_cluster_file_is_refused(tmp_path):
    cluster = tmp_path / "c.yaml"
    cluster.write_text("time: 12:00:00\n")
    with pytest.raises(SweepError, match="time=43200 is a number: quote it"):
        load_slurm_options(cluster, {}, [])
    cluster.write_text('time: "12:00:00"\n')
    assert load_slurm_options(cluster, {}, []).time == "12:00:00"
    assert load_slurm_options(cluster, {}, ["time=1:30:00"]).time == "1:30:00"   # --set keeps it as typed


@pytest.mark.parametrize("limit", ["UNLIMITED", "infinite", "0"])
def test_unlimited_time_is_for_sbatch_only(limit):
    options = load_slurm_options(None, {}, [f"time={limit}"])
    assert options.time == limit
    with pytest.raises(SweepError, match="finite time limit"):
        submitit_parameters(options, "x")


def test_dry_run_is_for_the_slurm_backend_only(tmp_path):
    exp = Experiment(name="d", grid={"algo": ["fedavg"]}, shared=SMALL_SHARED)
    with pytest.raises(SweepError, match="dry run writes sbatch scripts"):
        launch(exp, "submitit", tmp_path, slurm_set=("time=10",), dry_run=True, log=lambda *_: None)


def test_missing_cluster_file_is_named(tmp_path):
    with pytest.raises(SweepError, match="cluster file .*nope.yaml does not exist"):
        load_slurm_options(tmp_path / "nope.yaml", {}, [])


@pytest.mark.parametrize("limit, minutes", [
    ("90", 90), ("10:30", 11), ("04:00:00", 240), ("1-00:00:00", 1440), ("2-3", 2 * 1440 + 180), ("0-0:0:1", 1)])
def test_slurm_time_limits_in_minutes(limit, minutes):
    assert slurm_minutes(limit) == minutes


def test_mean_and_sample_std():
    assert mean_std([]) == (None, None)
    assert mean_std([2.0]) == (2.0, None)
    mean, std = mean_std([0.70, 0.72, 0.74])
    assert mean == pytest.approx(0.72) and std == pytest.approx(0.02)


def fabricate(run_dir: Path, accuracies: list[float], train_time: float) -> None:
    """A finished run as train.py leaves it: metrics.jsonl (accuracy every round) and results.json."""
    run_dir.mkdir(parents=True)
    metrics = [{"round": r + 1, "train_loss": 1.0, "test_accuracy": a, "test_loss": 1 - a, "round_time_s": 1.0}
               for r, a in enumerate(accuracies)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    (run_dir / RESULTS_FILE).write_text(json.dumps({
        "final_test_accuracy": accuracies[-1], "final_test_loss": 1 - accuracies[-1],
        "best_test_accuracy": max(accuracies), "train_time_s": train_time}))
    (run_dir / EXIT_FILE).write_text("0\n")


def test_collect_on_fabricated_runs(tmp_path):
    exp = Experiment(name="fab", grid={"algo": ["fedavg", "fedprox", "centralized"]}, seeds=[0, 1, 2],
                     target_accuracy=0.6, baseline="fedavg", reference="centralized", parents={"fedprox": "fedavg"})
    save_declaration(exp, tmp_path)
    base = tmp_path / "fab"
    for seed, (avg, cen, t) in enumerate([(0.50, 0.70, 10), (0.52, 0.72, 20), (0.54, 0.74, 30)]):
        fabricate(base / "fedavg" / f"seed{seed}", [0.40, avg], t)
        fabricate(base / "centralized" / f"seed{seed}", [0.65, cen], t)
    fabricate(base / "fedprox" / "seed0", [0.55, 0.60, 0.58], 12)
    failed = base / "fedprox" / "seed1"
    failed.mkdir()
    (failed / LOG_FILE).write_text("".join(f"line {i}\n" for i in range(30)) + "error: out of memory\n")
    (failed / EXIT_FILE).write_text("1\n")
    (failed / "metrics.jsonl").write_text(json.dumps({"round": 1, "test_accuracy": 0.3}) + "\n")
    # fedprox/seed2 was never launched
    fabricate(base / "centralized" / "seed3", [0.5], 1)          # a seed outside the declaration: ignored

    report = collect(str(base))[0].read_text()
    lines = report.splitlines()
    row = {line.split(" | ")[0].lstrip("| "): line for line in lines if line.startswith("| ")}
    # fedavg: mean 52, sample std 2; never reaches 60%; gap closed 0
    assert row["fedavg"] == "| fedavg | 3/3 | 52.00 ± 2.00 | 52.00 ± 2.00 | 0.480 ± 0.020 | — (0/3 reached) | 20.0 ± 10.0 | +0% | — |"
    # fedprox: one finished seed, best 60 (round 2), final 58: (58-52)/(72-52) = 30% of the gap
    assert row["fedprox"] == "| fedprox | 1/3 | 58.00 | 60.00 | 0.420 | 2.0 | 12.0 | +30% | +30% (vs fedavg) |"
    assert row["centralized"] == "| centralized | 3/3 | 72.00 ± 2.00 | 72.00 ± 2.00 | 0.280 ± 0.020 | 1.0 ± 0.0 | 20.0 ± 10.0 | +100% | — |"
    assert "rounds to 60%" in report and "gap closed (fedavg → centralized)" in report
    assert "7 of 9 runs finished" in report
    assert "- **fedprox/seed1**: failed (exit 1) after round 1" in report and "error: out of memory" in report
    assert "line 16\n" in report and "line 15\n" not in report   # the last 15 lines of its log
    assert "- **fedprox/seed2**: missing" in report

    summary = (base / "summary.csv").read_text().splitlines()
    assert summary[0].startswith("run,seeds_done,seeds_total,final_accuracy_mean,final_accuracy_std")
    fedprox = summary[2].split(",")
    assert fedprox[:5] == ["fedprox", "1", "3", "0.58", ""] and fedprox[-3] == "1"
    assert float(fedprox[-2]) == pytest.approx(0.3) and float(fedprox[-1]) == pytest.approx(0.3)
    runs = (base / "runs.csv").read_text().splitlines()
    assert len(runs) == 10 and [r.split(",")[2] for r in runs[4:7]] == ["done", "failed (exit 1)", "missing"]
    for image in ("accuracy.png", "final_accuracy.png"):
        assert (base / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_collect_shows_validation_and_fairness_columns_when_runs_report_them(tmp_path):
    exp = Experiment(name="fair", grid={"algo": ["fedavg", "fedprox"]}, seeds=[0, 1])
    save_declaration(exp, tmp_path)
    for algo, numbers in {"fedavg": [(0.60, 0.40, 0.9), (0.62, 0.44, 0.92)], "fedprox": [(0.70, 0.50, 0.95), None]}.items():
        for seed, values in enumerate(numbers):
            run_dir = tmp_path / "fair" / algo / f"seed{seed}"
            fabricate(run_dir, [0.5, 0.6], 10)
            if values is None:
                continue   # an older run without a validation split or per-client evaluation
            results = json.loads((run_dir / RESULTS_FILE).read_text())
            del results["best_test_accuracy"]   # selected on validation instead
            results.update({"best_val_test_accuracy": 0.55, "final_client_acc_mean": values[0],
                            "final_client_acc_worst10": values[1], "final_client_acc_jain": values[2]})
            (run_dir / RESULTS_FILE).write_text(json.dumps(results))
    report = collect(str(tmp_path / "fair"))[0].read_text()
    assert "| val-selected acc (%) | client acc (%) | worst-10% acc (%) | Jain index |" in report
    row = {line.split(" | ")[0].lstrip("| "): line for line in report.splitlines() if line.startswith("| ")}
    assert row["fedavg"].endswith("| 55.00 ± 0.00 | 61.00 ± 1.41 | 42.00 ± 2.83 | 0.910 ± 0.014 |")
    assert row["fedprox"].endswith("| 55.00 | 70.00 | 50.00 | 0.950 |")
    header = (tmp_path / "fair" / "runs.csv").read_text().splitlines()[0]
    assert "val_selected_accuracy,client_accuracy,worst10_accuracy,jain_index" in header


def test_collect_survives_damaged_and_stopped_runs(tmp_path):
    exp = Experiment(name="dmg", grid={"algo": ["fedavg"]}, seeds=[0, 1, 2, 3])
    save_declaration(exp, tmp_path)
    base = tmp_path / "dmg" / "fedavg"
    fabricate(base / "seed0", [0.5, 0.6], 1)
    with open(base / "seed0" / "metrics.jsonl", "a") as f:
        f.write('{"round": 3, "test_acc')                          # a line being written
    fabricate(base / "seed1", [0.5], 1)
    (base / "seed1" / RESULTS_FILE).write_text("{not json")
    (base / "seed2").mkdir()
    (base / "seed2" / EXIT_FILE).write_text("143\n")
    (base / "seed2" / LOG_FILE).write_text("received SIGTERM\n")
    fabricate(base / "seed3", [0.7], 1)
    path, records = collect(str(tmp_path / "dmg"))
    assert [r.status for r in records] == ["done", "unreadable", "stopped by signal 15", "done"]
    assert records[0].curve == [(1, 0.5), (2, 0.6)]
    report = path.read_text()
    assert "| fedavg | 2/4 | 65.00 ± 7.07 |" in report
    assert "- **fedavg/seed1**: unreadable" in report and "JSONDecodeError" in report
    assert "- **fedavg/seed2**: stopped by signal 15" in report and "received SIGTERM" in report


def test_collect_marks_diverged_runs(tmp_path):
    """A diverged run (results marked diverged, null accuracies, exit 3) and one of before that mark (a
    bare NaN loss) are listed as diverged, not counted as done nor in the mean."""
    exp = Experiment(name="div", grid={"algo": ["fedavg"]}, seeds=[0, 1, 2])
    save_declaration(exp, tmp_path)
    base = tmp_path / "div" / "fedavg"
    fabricate(base / "seed0", [0.5, 0.6], 1)
    fabricate(base / "seed1", [0.4, 0.5], 1)
    with open(base / "seed1" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"round": 3, "train_loss": None, "test_accuracy": None, "test_loss": None}) + "\n")
    (base / "seed1" / RESULTS_FILE).write_text(json.dumps({
        "rounds": 3, "diverged": True, "diverged_round": 3, "final_test_accuracy": None, "final_test_loss": None,
        "best_test_accuracy": None, "train_time_s": 1.0}))
    (base / "seed1" / EXIT_FILE).write_text("3\n")
    fabricate(base / "seed2", [0.1437], 1)
    (base / "seed2" / RESULTS_FILE).write_text('{"final_test_accuracy": 0.1437, "final_test_loss": NaN, '
                                               '"best_test_accuracy": 0.1437, "train_time_s": 1.0}')
    path, records = collect(str(tmp_path / "div"))
    assert [r.status for r in records] == ["done", "diverged in round 3", "diverged"]
    assert records[1].curve == [(1, 0.4), (2, 0.5)]
    report = path.read_text()
    assert "| fedavg | 1/3 | 60.00 |" in report and "1 of 3 runs finished" in report
    assert "- **fedavg/seed1**: diverged in round 3 (" in report and "- **fedavg/seed2**: diverged (" in report


def adhoc_run(run_dir: Path, accuracies: list[float], seed: int, lr: float = 0.05, algo: str = "fedavg") -> None:
    """A run as `python train.py` leaves it in outputs/ or multirun/: its resolved config.yaml beside the results."""
    fabricate(run_dir, accuracies, 1.0)
    (run_dir / EXIT_FILE).unlink()   # train.py alone writes no exit_status
    server = ({"_target_": "src.server.FedAvgServer", "weighting": "samples"} if algo == "fedavg" else
              {"_target_": "src.algo.scaffold.ScaffoldServer", "lr": 1.0, "weighting": "uniform"})
    client = {} if algo == "fedavg" else {"client": {"_target_": "src.algo.scaffold.ScaffoldClient", "_partial_": True}}
    cfg = {"name": f"{algo}_synthetic", "seed": seed, "device": "cpu", "num_rounds": len(accuracies),
           "algo": {"_target_": "src.algo.FedAvg", **client, "server": server},
           "optimizer": {"_target_": "torch.optim.SGD", "_partial_": True, "lr": lr},
           "logger": {"name": None}, "checkpoint": {"every": seed + 1}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))   # Hydra's copy: not another run


def test_collect_compares_a_folder_of_ad_hoc_runs(tmp_path, capsys):
    """`collect outputs/NAME` or `collect multirun/NAME`: runs whose configs differ only in seed (or
    name, device, logger, checkpoint) are seeds of one variant, named by the settings that differ."""
    from experiment_runner import main
    multirun = tmp_path / "multirun" / "fedavg_synthetic"
    adhoc_run(multirun / "seed=0", [0.5, 0.6], 0)
    adhoc_run(multirun / "seed=1", [0.5, 0.7], 1)
    adhoc_run(multirun / "optimizer.lr=0.5,seed=0", [0.2, 0.3], 0, lr=0.5)
    adhoc_run(multirun / "algo=scaffold,seed=0", [0.6, 0.8], 0, algo="scaffold")
    (multirun / "broken").mkdir()
    (multirun / "broken" / "config.yaml").write_text("seed: [unclosed")
    (multirun / "multirun.yaml").write_text("hydra: {}\n")

    assert main(["collect", str(multirun)]) == 0
    out = capsys.readouterr().out
    row = {line.split(" | ")[0].lstrip("| "): line for line in out.splitlines() if line.startswith("| ")}
    # the scaffold run's lr and weighting follow from its server class: they are not named
    assert list(row)[1:] == ["algo.client=ScaffoldClient algo.server=ScaffoldServer optimizer.lr=0.05",
                             "algo.client=unset algo.server=FedAvgServer optimizer.lr=0.5",
                             "algo.client=unset algo.server=FedAvgServer optimizer.lr=0.05", "broken"]
    assert [line.split(" | ")[1:3] for line in list(row.values())[1:]] == [
        ["1/1", "80.00"], ["1/1", "30.00"], ["2/2", "65.00 ± 7.07"], ["0/1", "—"]]
    assert "4 of 5 runs finished (seeds [0, 1])" in out
    assert "- **broken**: unreadable" in out and "ParserError" in out
    assert (multirun / "report.md").is_file() and (multirun / "accuracy.png").is_file()

    # an outputs/ folder of one variant (two seeds), found two levels down, is named after the folder
    outputs = tmp_path / "outputs"
    adhoc_run(outputs / "fedavg_synthetic" / "2025-01-01_10-00-00", [0.5], 0)
    adhoc_run(outputs / "fedavg_synthetic" / "2025-01-01_11-00-00", [0.7], 1)
    assert "| outputs | 2/2 | 60.00 ± 14.14 |" in collect(str(outputs))[0].read_text()

    (tmp_path / "empty").mkdir()
    with pytest.raises(SweepError, match="holds no run directory"):
        collect(str(tmp_path / "empty"))


def test_accuracy_plot_tells_overlapping_runs_apart_and_keeps_the_legend_off_the_data(tmp_path):
    exp = Experiment(name="p", grid={"algo": [f"a{i}" for i in range(12)]})
    records = [RunRecord(run, "done", curve=[(1, 0.5), (2, 0.6), (3, 0.7)]) for run in exp.runs(tmp_path)]
    fig = accuracy_figure(exp, summarize(exp, records))   # twelve identical curves
    ax = fig.axes[0]
    styles = [(line.get_color(), line.get_linestyle(), line.get_marker()) for line in ax.lines]
    assert len(styles) == 12 and len(set(styles)) == 12
    assert all(a[1] != b[1] and a[2] != b[2] for a, b in zip(styles, styles[1:]))
    fig.canvas.draw()
    legend, axes = ax.get_legend().get_window_extent(), ax.get_window_extent()
    assert legend.x0 >= axes.x1   # beside the axes, not over the curves


def test_collect_of_an_experiment_never_launched_says_so(tmp_path):
    with pytest.raises(SweepError, match="has not been launched"):
        collect("smoke", root=tmp_path)


def test_local_backend_end_to_end(tmp_path):
    """`python experiment_runner.py run FILE` as a user types it: a failing run does not stop the
    others, the report lists it with its log, and a second launch skips what finished."""
    declaration = tmp_path / "two.yaml"
    declaration.write_text(yaml.safe_dump({
        "name": "two", "grid": {"resume": [None, "/no/such/resume.pt"]}, "shared": SMALL_SHARED, "seeds": [0]}))
    def runner(*args):
        return subprocess.run([sys.executable, "experiment_runner.py", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
    proc = runner("run", str(declaration), "--root", str(tmp_path / "out"), "--parallel", "2")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "[2/2]" in proc.stdout and "FAILED (exit 2" in proc.stdout
    assert "| resume-null | 1/1 |" in proc.stdout and "| resume-resume.pt | 0/1 |" in proc.stdout
    assert "- **resume-resume.pt/seed0**: failed (exit 2)" in proc.stdout
    assert "checkpoint /no/such/resume.pt does not exist" in proc.stdout
    done = tmp_path / "out" / "two" / "resume-null" / "seed0"
    assert json.loads((done / RESULTS_FILE).read_text())["rounds"] == 4
    umask = os.umask(0)
    os.umask(umask)
    assert (done / RESULTS_FILE).stat().st_mode & 0o777 == 0o666 & ~umask   # not owner-only: results are shared

    again = runner("run", str(declaration), "--root", str(tmp_path / "out"))
    assert "1 already finished" in again.stdout and "[1/1] two/resume-resume.pt/seed0: FAILED" in again.stdout


def test_submitit_time_out_handler_runs_after_a_round_checkpoint(compose_cfg, tmp_path):
    """Under `train.py -m hydra/launcher=slurm`, submitit's SIGUSR2 handler requeues the job and exits.
    train.py takes the signal first and lets that handler run once the round's checkpoint is saved."""
    seen = []

    def submitit_like(signum, frame):
        seen.append(load_torch(tmp_path / "resume.pt")["round"])
        raise SystemExit(-1)

    previous = signal.signal(signal.SIGUSR2, submitit_like)
    try:
        algo = build_algo(compose_cfg, tmp_path, *SMALL)
        record = algo.record

        def record_then_signal(metrics):
            record(metrics)
            if algo.round == 1:
                os.kill(os.getpid(), signal.SIGUSR2)
        algo.record = record_then_signal
        with pytest.raises(SystemExit):
            algo.fit()
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert seen == [1]

"""Sweeps without a cluster: declarations -> runs, up-front validation, sbatch scripts (dry run),
collect on fabricated run folders, and the local backend end to end."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from src.algo.base import RESULTS_FILE
from src.sweep.backends import EXIT_FILE, LOG_FILE, load_slurm_options, slurm_minutes, submitit_parameters
from src.sweep.collect import collect, mean_std
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
    assert first.train_args() == ["num_rounds=3", "dataset=synthetic", "algo=fedavg", "optimizer.lr=0.1",
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
    assert train == f"{sys.executable} train.py {' '.join(SMALL)} algo=fedprox seed=3 hydra.run.dir={run_dir} &"
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


def test_collect_of_an_experiment_never_launched_says_so(tmp_path):
    with pytest.raises(SweepError, match="has not been launched"):
        collect("smoke", root=tmp_path)


def test_local_backend_end_to_end(tmp_path):
    """`python experiment_runner.py run FILE` as a user types it: a failing run does not stop the
    others, the report lists it with its log, and a second launch skips what finished."""
    declaration = tmp_path / "two.yaml"
    declaration.write_text(yaml.safe_dump({
        "name": "two", "grid": {"resume": [None, "/no/such/resume.pt"]}, "shared": SMALL_SHARED, "seeds": [0]}))
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}

    def runner(*args):
        return subprocess.run([sys.executable, "experiment_runner.py", *args], cwd=ROOT, env=env,
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

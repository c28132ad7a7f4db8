"""train.py run as a user types it: outputs, resume bit for bit, and bad input."""
import json
import signal
import subprocess
import sys
import time

import torch

from conftest import ROOT, run_train

# Small but real: Fashion-MNIST (the Debian package's files, unpacked once per session), MLP.
FMNIST = ["model=mlp", "partition=iid", "clients.total=10", "clients.per_round=0.3", "eval_every=1",
          "client.batch_size=50", "client.local_epochs=1"]
SYNTH = ["dataset=synthetic", "model=mlp", "clients.total=8", "dataset.max_device_size=200",
         "clients.per_round=0.5", "optimizer.lr=0.05", "client.batch_size=50", "client.local_epochs=1"]


def load(path):
    return torch.load(path, weights_only=True)


def test_fashion_mnist_run_writes_every_output(tmp_path, fmnist_root):
    run_dir = tmp_path / "run"
    proc = run_train(run_dir, f"dataset.root={fmnist_root}", "num_rounds=2", "checkpoint.keep_round_models=true",
                     *FMNIST)
    assert "round 1/2" in proc.stdout and "round 2/2" in proc.stdout and "final test accuracy" in proc.stdout
    for name in ("config.yaml", "metrics.jsonl", "results.json", "GLOBAL_MODEL.pt", "GLOBAL_MODEL_round_1.pt",
                 "GLOBAL_MODEL_round_2.pt", "FINAL_MODEL.pt", "resume.pt", "client_class_histogram.csv", "train.log"):
        assert (run_dir / name).is_file(), name
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [1, 2]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["rounds"] == 2 and results["final_test_accuracy"] == metrics[-1]["test_accuracy"]
    assert results["final_test_accuracy"] > 0.5  # two rounds of FedAvg already learn Fashion-MNIST
    histogram = (run_dir / "client_class_histogram.csv").read_text().splitlines()
    assert len(histogram) == 11 and sum(sum(map(int, r.split(",")[1:])) for r in histogram[1:]) == 60000
    final = load(run_dir / "FINAL_MODEL.pt")
    assert all(torch.equal(final[k], v) for k, v in load(run_dir / "GLOBAL_MODEL_round_2.pt").items())
    assert "round 2/2" in (run_dir / "train.log").read_text()


def test_synthetic_fairavg_and_centralized_runs(tmp_path):
    for algo in ("fairavg", "centralized"):
        run_train(tmp_path / algo, f"algo={algo}", "num_rounds=3", *SYNTH)
        results = json.loads((tmp_path / algo / "results.json").read_text())
        assert results["rounds"] == 3 and 0.0 <= results["final_test_accuracy"] <= 1.0
    assert json.loads((tmp_path / "centralized" / "results.json").read_text())["algo"] == "Centralized"


def test_wandb_offline_logs_config_and_metrics(tmp_path):
    run_train(tmp_path / "run", "logger.mode=offline", "num_rounds=2", *SYNTH)
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def finals_equal(a, b) -> bool:
    fa, fb = load(a / "FINAL_MODEL.pt"), load(b / "FINAL_MODEL.pt")
    return fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)


def history(run_dir):
    return [{k: v for k, v in json.loads(line).items() if k != "round_time_s"}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_interrupted_run_resumes_bit_for_bit(tmp_path, fmnist_root):
    args = [f"dataset.root={fmnist_root}", "num_rounds=12", "eval_every=4", "model=mlp", "clients.total=40",
            "clients.per_round=0.1", "optimizer.momentum=0.9"]
    run_train(tmp_path / "straight", *args)

    # the same command, stopped by SIGTERM (as SLURM does) once a few rounds are done
    cmd = [sys.executable, "train.py", f"hydra.run.dir={tmp_path / 'cut'}", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out
    stopped_at = load(tmp_path / "cut" / "resume.pt")["round"]
    assert 3 <= stopped_at < 12 and not (tmp_path / "cut" / "results.json").exists()

    resumed = run_train(tmp_path / "cut", *args)  # a requeued job: same command, same run directory
    assert f"resuming after round {stopped_at}" in resumed.stdout
    assert finals_equal(tmp_path / "straight", tmp_path / "cut")
    assert history(tmp_path / "straight") == history(tmp_path / "cut")


def test_resume_from_explicit_path_into_a_new_directory(tmp_path):
    run_train(tmp_path / "straight", "num_rounds=4", *SYNTH)
    run_train(tmp_path / "first", "num_rounds=2", *SYNTH)
    run_train(tmp_path / "second", "num_rounds=4", f"resume={tmp_path / 'first'}", *SYNTH)
    assert finals_equal(tmp_path / "straight", tmp_path / "second")
    assert len(history(tmp_path / "second")) == 4


def snapshot(run_dir):
    return {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.suffix in (".pt", ".json")}


def test_changed_settings_do_not_resume_or_overwrite(tmp_path):
    run_train(tmp_path / "run", "num_rounds=2", *SYNTH)
    before = snapshot(tmp_path / "run")
    proc = run_train(tmp_path / "run", "num_rounds=3", "optimizer.lr=0.5", *[s for s in SYNTH if "lr" not in s],
                     check=False)
    assert proc.returncode == 2
    assert "optimizer.lr: checkpoint 0.05, now 0.5" in proc.stderr and "new run directory" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert snapshot(tmp_path / "run") == before


def test_finished_run_is_not_redone(tmp_path):
    run_train(tmp_path / "run", "num_rounds=2", *SYNTH)
    before = snapshot(tmp_path / "run")
    proc = run_train(tmp_path / "run", "num_rounds=2", *SYNTH)
    assert "already finished" in proc.stdout and snapshot(tmp_path / "run") == before


def test_corrupt_checkpoint_gives_one_clear_error_and_is_kept(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "resume.pt").write_bytes(b"not a checkpoint")
    proc = run_train(run_dir, "num_rounds=2", *SYNTH, check=False)
    assert proc.returncode == 2 and "cannot be read" in proc.stderr and "Traceback" not in proc.stderr
    assert (run_dir / "resume.pt").read_bytes() == b"not a checkpoint"


def test_bad_values_are_listed_together(tmp_path):
    proc = run_train(tmp_path / "run", "clients.per_round=0", "optimizer.lr=-1", "partition.alpha=-0.5",
                     check=False)
    assert proc.returncode == 2 and "invalid configuration (3 problem(s))" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_key_is_refused_by_name(tmp_path):
    proc = run_train(tmp_path / "run", "clients.totl=5", check=False)
    assert proc.returncode != 0 and "clients.totl" in proc.stderr


def test_missing_dataset_names_the_fix(tmp_path):
    proc = run_train(tmp_path / "run", "dataset=cifar10", f"dataset.root={tmp_path / 'empty'}",
                     "dataset.download=false", check=False)
    assert proc.returncode == 2 and "CIFAR10 could not be read" in proc.stderr and "dataset.download=true" in proc.stderr


def test_help_and_cfg_behave_as_in_hydra():
    env_run = lambda *a: subprocess.run([sys.executable, "train.py", *a], cwd=ROOT, capture_output=True, text=True)
    help_text = env_run("--help").stdout
    algo_line = next(line for line in help_text.splitlines() if line.startswith("algo: "))
    assert {"centralized", "fairavg", "fedavg"} <= set(algo_line[6:].split(", ")) and "dataset:" in help_text
    cfg = env_run("--cfg", "job", "algo=fairavg", "seed=3").stdout
    assert "weighting: uniform" in cfg and "seed: 3" in cfg

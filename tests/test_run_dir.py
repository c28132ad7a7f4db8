"""The run directory is never lost or mixed: refused starts change nothing, checkpoints are checked
completely before anything is written, one process at a time, and every failure is one message."""
import fcntl
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import open_dict

from conftest import ROOT, run_train
from src.run import main as run_main

SYNTH = ["dataset=synthetic", "model=mlp", "clients.total=6", "dataset.max_device_size=60", "clients.per_round=0.5",
         "optimizer.lr=0.05", "device=cpu", "logger.mode=disabled", "client.batch_size=50", "client.local_epochs=1"]


@pytest.fixture
def train(compose_cfg, capsys, caplog):
    """src/run.py's main() in-process, as train.py calls it once Hydra has composed the config
    (train.py's own start-up is tested by the subprocess runs below): (exit code, log, stderr)."""
    def _train(run_dir, *overrides):
        cfg = compose_cfg(*overrides)
        hydra_cfg = cfg.hydra
        with open_dict(cfg):
            del cfg["hydra"]
        capsys.readouterr()
        caplog.clear()
        try:
            run_main(cfg, run_dir, hydra_cfg)
            code = 0
        except SystemExit as e:
            code = e.code
        return SimpleNamespace(returncode=code, stdout=caplog.text, stderr=capsys.readouterr().err)
    caplog.set_level(logging.INFO)
    return _train


def snapshot(run_dir):
    """Every file below run_dir (Hydra's copies and client state included) with its bytes; the lock
    file is the only one a refused start may create."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def refused(proc, *phrases):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    for phrase in phrases:
        assert phrase in proc.stderr, proc.stderr
    return proc


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-round run with disk client state (persisted optimizer): the run others attack."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    run_train(run_dir, "num_rounds=2", "client.state_store=disk", "client.persist_optimizer=true", *SYNTH)
    return run_dir


def copy_run(src, dst):
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
    return dst


def test_refused_settings_leave_every_file_identical(train, finished, tmp_path):
    run_dir = copy_run(finished, tmp_path / "run")
    assert list(run_dir.glob("client_state/*/state.*.pt")) and (run_dir / ".hydra" / "overrides.yaml").is_file()
    before = snapshot(run_dir)
    refused(train(run_dir, "num_rounds=2", "seed=1", "client.state_store=disk", "client.persist_optimizer=true",
                      *SYNTH), "seed: checkpoint 0, now 1")
    assert snapshot(run_dir) == before   # histogram, client_state/*/state.*.pt, .hydra/*.yaml untouched


def test_finished_run_with_new_settings_is_refused(train, finished, tmp_path):
    run_dir = copy_run(finished, tmp_path / "run")
    before = snapshot(run_dir)
    proc = train(run_dir, "num_rounds=2", "client.state_store=disk", "client.persist_optimizer=true",
                     *SYNTH[:-3], "optimizer.lr=0.5", "device=cpu", "logger.mode=disabled")
    refused(proc, "optimizer.lr: checkpoint 0.05, now 0.5")
    assert "already finished" not in proc.stdout and snapshot(run_dir) == before


def foreign_checkpoint(finished, tmp_path):
    """The finished run's checkpoint with the weights of a model whose layers have other names."""
    state = torch.load(finished / "resume.pt", weights_only=True)
    state["server"]["global_state"] = {k.replace("net.", "body."): v for k, v in state["server"]["global_state"].items()}
    path = tmp_path / "other" / "resume.pt"
    path.parent.mkdir()
    torch.save(state, path)
    return path


def test_foreign_weights_are_refused_before_anything_is_written(train, finished, tmp_path):
    other = foreign_checkpoint(finished, tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine")
    before = snapshot(run_dir)
    refused(train(run_dir, "num_rounds=3", f"resume={other}", "client.state_store=disk",
                      "client.persist_optimizer=true", *SYNTH),
            "does not fit this run's model", "server.global_state")
    assert snapshot(run_dir) == before


def test_given_checkpoint_and_own_checkpoint_need_a_decision(train, finished, tmp_path):
    run_dir = copy_run(finished, tmp_path / "run")
    other = copy_run(finished, tmp_path / "other")
    before = snapshot(run_dir)
    refused(train(run_dir, "num_rounds=3", f"resume={other}", "client.state_store=disk",
                      "client.persist_optimizer=true", *SYNTH),
            "holds its own resume.pt (round 2)", "drop resume=")
    assert snapshot(run_dir) == before
    # the same directory given explicitly is no conflict
    train(run_dir, "num_rounds=3", f"resume={run_dir}", "client.state_store=disk",
              "client.persist_optimizer=true", *SYNTH)


def test_fresh_start_never_appends_to_another_runs_metrics(train, finished, tmp_path):
    run_dir = copy_run(finished, tmp_path / "run")
    (run_dir / "resume.pt").unlink()
    before = snapshot(run_dir)
    refused(train(run_dir, "num_rounds=2", "seed=3", *SYNTH), "no resume.pt to continue from")
    assert snapshot(run_dir) == before


def test_same_run_without_checkpoint_starts_its_metrics_afresh(train, tmp_path):
    run_dir = tmp_path / "run"
    assert train(run_dir, "num_rounds=2", "checkpoint.every=5", *SYNTH).returncode == 0
    for name in ("resume.pt", "results.json", "FINAL_MODEL.pt"):   # as if killed before its first checkpoint
        (run_dir / name).unlink()
    proc = train(run_dir, "num_rounds=2", "checkpoint.every=5", *SYNTH)
    assert proc.returncode == 0 and "starting it afresh" in proc.stdout
    rounds = [json.loads(line)["round"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [1, 2]


def test_leftover_temporary_files_are_removed(train, finished, tmp_path):
    run_dir = copy_run(finished, tmp_path / "run")
    leftovers = [run_dir / ".resume.pt.abc123.tmp", next(run_dir.glob("client_state/*")) / ".state.pt.pending.x.tmp"]
    for path in leftovers:
        path.write_bytes(b"half a checkpoint")
    assert train(run_dir, "num_rounds=3", "client.state_store=disk", "client.persist_optimizer=true",
                 *SYNTH).returncode == 0
    assert not any(path.exists() for path in leftovers)


def test_a_run_directory_in_use_is_refused_and_a_dead_holder_is_not(train, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with open(run_dir / ".lock", "w") as held:
        held.write("pid 4242 on somehost\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX)
        refused(train(run_dir, "num_rounds=1", *SYNTH), "in use by another run (pid 4242 on somehost)")
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]
    # the lock file of a process that died is no lock: the kernel released it with the process
    assert train(run_dir, "num_rounds=1", *SYNTH).returncode == 0


def test_default_run_folder_holds_the_process_id(compose_cfg):
    cfg = compose_cfg()
    assert str(cfg.hydra.run.dir).endswith(f"_{os.getpid()}")


@pytest.mark.parametrize("content", [b"", "model", "list", "dict"])
def test_checkpoints_that_are_not_one_give_one_message(train, finished, tmp_path, content):
    path = tmp_path / "resume.pt"
    if content == "model":
        path.write_bytes((finished / "FINAL_MODEL.pt").read_bytes())
    elif content == "list":
        torch.save([1, 2], path)
    elif content == "dict":
        torch.save({"config": {}}, path)
    else:
        path.write_bytes(content)
    proc = refused(train(tmp_path / "run", "num_rounds=2", f"resume={path}", *SYNTH))
    assert ("the file is empty" if content == b"" else "is not a resume checkpoint") in proc.stderr
    if content == "model":
        assert "a model's weights" in proc.stderr


def test_malicious_checkpoint_is_refused_plainly(train, tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))
    path = tmp_path / "resume.pt"
    torch.save({"round": Payload()}, path)
    proc = refused(train(tmp_path / "run", f"resume={path}", *SYNTH), "could execute code")
    assert "weights_only" not in proc.stderr and not (tmp_path / "pwned").exists()


def test_corrupt_results_of_a_finished_run(train, finished, tmp_path):
    run_dir = copy_run(finished, tmp_path / "run")
    (run_dir / "results.json").write_text('{"rounds": 2, ')
    refused(train(run_dir, "num_rounds=2", "client.state_store=disk", "client.persist_optimizer=true",
                      *SYNTH), "results.json cannot be read", "Move it away")


def test_run_dir_that_is_a_file(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("keep me")
    refused(run_train(path, *SYNTH, check=False), "is a file, not a directory")
    refused(run_train(path / "below", *SYNTH, check=False), "is a file, not a directory")
    assert path.read_text() == "keep me"


def test_refused_config_leaves_no_folder_and_prints_once(tmp_path):
    proc = refused(run_train(tmp_path / "new" / "run", *SYNTH, "optimizer.lr=-1", check=False), "optimizer.lr")
    assert not (tmp_path / "new").exists()
    assert proc.stderr.count("optimizer.lr") == 1 and "optimizer.lr" not in proc.stdout


def as_nobody(cmd):
    """Permission bits bind everyone but root: run as `nobody` when the tests run as root."""
    return (["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []) + cmd


@pytest.mark.parametrize("what", ["directory", "metrics.jsonl"])
def test_read_only_run_directory_gives_one_message(finished, tmp_path, what):
    if os.geteuid() == 0 and subprocess.run(["setpriv", "--help"], capture_output=True).returncode != 0:
        pytest.skip("running as root without setpriv: permissions cannot be tested")
    shared = Path(tempfile.mkdtemp(dir="/tmp"))   # pytest's own folders are root-only
    shared.chmod(0o755)
    run_dir = copy_run(finished, shared / "run")
    for p in [run_dir, *run_dir.rglob("*")]:
        p.chmod(0o777 if p.is_dir() else 0o666)
    (run_dir if what == "directory" else run_dir / what).chmod(0o555 if what == "directory" else 0o444)
    before = snapshot(run_dir)
    env = {**os.environ, "WANDB_MODE": "disabled", "HOME": str(shared)}
    proc = subprocess.run(as_nobody([sys.executable, "train.py", f"hydra.run.dir={run_dir}", "num_rounds=3",
                                     "client.state_store=disk", "client.persist_optimizer=true", *SYNTH]),
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    refused(proc, "cannot write to", "chmod u+w")
    assert snapshot(run_dir) == before
    subprocess.run(["rm", "-rf", str(shared)], check=True)


def test_multirun_with_the_default_sweep_folder(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "-m", "num_rounds=1", "seed=0,1", *SYNTH],
                          cwd=tmp_path, env={**os.environ, "WANDB_MODE": "disabled"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = sorted(p.parent.name for p in (tmp_path / "multirun").rglob("results.json"))
    assert len(runs) == 2 and all(f"seed={s}" in r for s, r in zip((0, 1), runs))

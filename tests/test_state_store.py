"""The disk client store's checkpoint references its files (client_state/<client>/state.<n>.pt by
name and size) instead of holding their contents: resume.pt stays small whatever the per-client
state, a kill at any moment leaves the last resume.pt and the files it references intact, a resumed
run (in its own directory or a new one) continues bit for bit, and a missing or damaged file is
refused with one message before anything is written."""
import io
import os
import shutil

import pytest
import torch
from omegaconf import open_dict

import src.algo.base
import src.run
from conftest import run_train
from src.client.state_store import ClientStateStore
from src.utils.io import load_torch
from tests.inprocess import SMALL, build_algo, metrics_without_times, resume
from test_run_dir import SYNTH, copy_run, refused, snapshot, train  # noqa: F401  (train is a fixture)

DISK = [*SMALL, "optimizer=adam", "client.persist_optimizer=true", "client.state_store=disk"]
DISK_RUN = ["client.state_store=disk", "client.persist_optimizer=true", "optimizer=adam", *SYNTH]


def referenced(run_dir) -> dict:
    """The bytes of every client file the run directory's resume.pt references."""
    state = load_torch(run_dir / "resume.pt")["client_states"]
    return {(cid, name): (run_dir / "client_state" / cid / name).read_bytes() for cid, (name, _) in state.items()}


def serialized_size(obj) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getbuffer().nbytes


def test_checkpoint_names_the_files_and_does_not_grow_with_their_contents(tmp_path):
    sizes = {}
    for numel in (1, 1_000_000):  # 4 bytes or 4 MB a client
        store = ClientStateStore("disk", torch.device("cpu"), tmp_path / str(numel))
        for cid in (0, 5):
            store.put(cid, {"control": {"w": torch.zeros(numel)}})
        store.commit()
        state = store.state_dict()
        assert state == {str(c): ["state.0.pt", os.path.getsize(tmp_path / str(numel) / str(c) / "state.0.pt")]
                         for c in (0, 5)}
        sizes[numel] = serialized_size(state)
    # only the recorded byte counts differ (a larger int in the pickle), not 8 MB of state
    assert sizes[1_000_000] - sizes[1] < 16


def test_versions_a_checkpoint_references_outlive_later_commits_until_pruned(tmp_path):
    store = ClientStateStore("disk", torch.device("cpu"), tmp_path)
    files = lambda: sorted(p.name for p in (tmp_path / "3").iterdir())  # noqa: E731
    store.put(3, {"x": torch.ones(1)})
    store.commit()
    store.prune()  # a resume.pt referencing state.0.pt was written
    for round_idx in (1, 2, 3):
        store.put(3, {"x": torch.full((1,), float(round_idx))})
        store.commit()
    # state.1.pt and state.2.pt were never referenced: gone at once; state.0.pt waits for the next checkpoint
    assert files() == ["state.0.pt", "state.3.pt"]
    store.prune()
    assert files() == ["state.3.pt"] and store.get(3)["x"].item() == 3.0


class Killed(BaseException):
    """Stands for kill -9 while resume.pt is written: nothing after it runs."""


def test_kill_between_client_files_and_resume_pt_leaves_the_last_checkpoint_resumable(compose_cfg, tmp_path,
                                                                                     monkeypatch):
    straight = build_algo(compose_cfg, tmp_path / "straight", *DISK)
    straight.fit()

    cut = build_algo(compose_cfg, tmp_path / "cut", *DISK)
    save, saved = src.algo.base.save_torch, {}

    def killed_in_round_3(obj, path):
        if path.name == "resume.pt" and cut.round == 3:
            raise Killed
        save(obj, path)
        if path.name == "resume.pt":
            saved.clear()
            saved.update(referenced(cut.run_dir))
    monkeypatch.setattr(src.algo.base, "save_torch", killed_in_round_3)
    with pytest.raises(Killed):
        cut.fit()
    monkeypatch.undo()
    # round 3's client files were committed, its resume.pt never written
    assert load_torch(cut.run_dir / "resume.pt")["round"] == 2
    newer = {(c, name) for c, (name, _) in cut.setup.store.state_dict().items()} - set(saved)
    assert newer and all((cut.run_dir / "client_state" / c / name).is_file() for c, name in newer)
    assert referenced(cut.run_dir) == saved  # round 2's client files, byte-identical

    resumed = resume(build_algo(compose_cfg, tmp_path / "cut", *DISK))
    resumed.fit()
    a, b = straight.server.global_state, resumed.server.global_state
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert metrics_without_times(resumed) == metrics_without_times(straight)
    # what remains is what the last resume.pt references: one version a client
    on_disk = {(p.parent.name, p.name) for p in (tmp_path / "cut" / "client_state").glob("*/*")}
    assert on_disk == set(referenced(tmp_path / "cut"))


def test_checkpoint_with_embedded_client_states_still_resumes_bit_for_bit(compose_cfg, tmp_path):
    """resume.pt as the disk store wrote it before references: every client's state inside it."""
    straight = build_algo(compose_cfg, tmp_path / "straight", *DISK)
    straight.fit()
    run_dir = tmp_path / "old"
    cut = build_algo(compose_cfg, run_dir, *DISK, "num_rounds=2")
    cut.fit()
    state = load_torch(run_dir / "resume.pt")
    state["client_states"] = {c: load_torch(run_dir / "client_state" / c / name)
                              for c, (name, _) in state["client_states"].items()}
    shutil.rmtree(run_dir / "client_state")
    resumed = build_algo(compose_cfg, run_dir, *DISK)
    resumed.check_state(state)
    resumed.start(state)
    resumed.fit()
    a, b = straight.server.global_state, resumed.server.global_state
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_resume_reads_each_client_file_once(compose_cfg, tmp_path, monkeypatch):
    """src/run.py checks the checkpoint before it writes; loading it then does not read every file again."""
    run_dir = tmp_path / "run"
    build_algo(compose_cfg, run_dir, *DISK, "num_rounds=2").fit()
    files = len(load_torch(run_dir / "resume.pt")["client_states"])
    reads = []
    read_referenced = ClientStateStore.read_referenced
    monkeypatch.setattr(ClientStateStore, "read_referenced", staticmethod(lambda path: reads.append(path) or
                                                                          read_referenced(path)))
    cfg = compose_cfg(*DISK)
    with open_dict(cfg):
        del cfg["hydra"]
    results = src.run.run(cfg, run_dir)
    assert results["rounds"] == 4 and files and len(reads) == len(set(reads)) == files


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-round train.py run with disk client state (persisted Adam moments)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    run_train(run_dir, "num_rounds=2", *DISK_RUN)
    return run_dir


def test_resume_in_a_new_directory_links_the_files_and_leaves_the_old_run_untouched(train, finished, tmp_path):
    old = copy_run(finished, tmp_path / "old")
    before = snapshot(old)
    assert train(tmp_path / "new", "num_rounds=4", f"resume={old}", *DISK_RUN).returncode == 0
    assert train(tmp_path / "straight", "num_rounds=4", *DISK_RUN).returncode == 0
    assert snapshot(old) == before
    a, b = (load_torch(tmp_path / d / "FINAL_MODEL.pt") for d in ("straight", "new"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("damage", ["missing", "truncated", "corrupt"])
def test_missing_or_damaged_client_file_is_refused_and_nothing_changes(train, finished, tmp_path, damage):
    run_dir = copy_run(finished, tmp_path / "run")
    cid, (name, size) = next(iter(load_torch(run_dir / "resume.pt")["client_states"].items()))
    path = run_dir / "client_state" / cid / name
    if damage == "missing":
        path.unlink()
    else:
        path.write_bytes(b"x" * (size // 2 if damage == "truncated" else size))
    before = snapshot(run_dir)
    expected = {"missing": "is missing", "truncated": f"has {size // 2} bytes where the checkpoint recorded {size}",
                "corrupt": "cannot be read"}[damage]
    refused(train(run_dir, "num_rounds=3", *DISK_RUN), f"client state file {path} {expected}",
            "Restore that folder", "Nothing was changed")
    assert snapshot(run_dir) == before

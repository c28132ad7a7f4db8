"""Divergence: a client whose loss or update is not finite is dropped (or stops the run with
on_nonfinite=fail) and never aggregated; a diverged global model stops the run with exit code 3,
no accuracy, strict-JSON results marked `diverged` and the last good checkpoint kept."""
import json

import pytest
import torch

from conftest import run_train
from src.algo.base import TrainingDiverged
from src.algo.fedbase import all_finite
from src.server.fedavg import WeightedMean
from src.utils.io import load_torch
from tests.inprocess import SMALL, build_algo

FIVE = [*SMALL, "clients.total=5", "clients.per_round=1.0", "num_rounds=2", "eval_every=1", "logger.mode=disabled"]


def strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


def poison(algo, client_ids) -> None:
    """NaN inputs: these clients' losses and updates are NaN, deterministically."""
    for k in client_ids:
        algo.data.train.x[algo.clients[k].indices] = float("nan")


def test_diverged_run_exits_3_without_accuracy_and_keeps_the_good_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(run_dir, *[o for o in SMALL if not o.startswith("optimizer.lr=")], "optimizer.lr=1e12",
                     "logger.mode=disabled", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 3, out
    assert proc.stderr.startswith("error: round 2: the global model's test loss is not finite: training diverged")
    assert "optimizer.lr" in proc.stderr and "grad_clip" in proc.stderr and "Traceback" not in out
    assert "final test accuracy" not in out and "test_acc" not in out  # no accuracy is reported
    results = strict_json((run_dir / "results.json").read_text())
    assert results["diverged"] is True and results["diverged_round"] == 2 and results["rounds"] == 1
    assert results["final_test_accuracy"] is None and results["best_test_accuracy"] is None
    assert [strict_json(line)["round"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1]
    state = load_torch(run_dir / "resume.pt")  # round 1's, not the diverged state
    assert state["round"] == 1 and all_finite(state["server"])
    assert not (run_dir / "FINAL_MODEL.pt").exists()


@pytest.mark.parametrize("settings", [
    ["optimizer.momentum=0.9", "client.persist_optimizer=true"],
    ["algo=scaffold", "client.state_store=disk"],
    ["algo=fedseq", "algo.representation=label_histogram", "algo.min_examples=1", "algo.max_clients=2",
     "client.persist_optimizer=true"],
], ids=["fedavg", "scaffold", "fedseq"])
def test_nonfinite_clients_are_dropped_and_counted(settings, compose_cfg, tmp_path, monkeypatch):
    bad = {1, 3}
    algo = build_algo(compose_cfg, tmp_path, *FIVE, *settings)
    poison(algo, bad)
    add = WeightedMean.add

    def finite_add(self, state, weight):
        assert all_finite(state), "a non-finite update reached the server's accumulator"
        add(self, state, weight)
    monkeypatch.setattr(WeightedMean, "add", finite_add)
    algo.fit()

    groups = [s.client_ids for s in algo.superclients] if settings[0] == "algo=fedseq" else [[k] for k in range(5)]
    dropped = sum(bool(bad & set(g)) for g in groups)
    assert 0 < dropped < len(groups)
    assert [m["dropped_clients"] for m in algo.history] == [dropped, dropped]
    assert all(0.0 <= m["test_accuracy"] <= 1.0 for m in algo.history)
    assert all_finite(algo.server.state_dict())
    # a dropped client's round did not happen: it has no persisted state
    kept = {k for g in groups if not bad & set(g) for k in g}
    assert set(algo.setup.store.client_ids()) == kept
    results = strict_json((tmp_path / "results.json").read_text())
    assert results["dropped_clients"] == 2 * dropped and results["diverged"] is False


@pytest.mark.parametrize("policy, bad, message", [
    ("fail", {3}, "round 1: client 3 has a non-finite training loss or update (on_nonfinite=fail"),
    ("drop", set(range(5)), "round 1: all 5 client updates had a non-finite training loss or update"),
])
def test_nonfinite_client_stops_the_run(policy, bad, message, compose_cfg, tmp_path):
    algo = build_algo(compose_cfg, tmp_path, *FIVE, f"on_nonfinite={policy}")
    poison(algo, bad)
    trained = []
    for client in algo.clients:
        def record_then_train(round_idx, stream=0, max_steps=None, client=client, train=client.client_update):
            trained.append(client.client_id)
            train(round_idx, stream, max_steps)
        client.client_update = record_then_train
    with pytest.raises(TrainingDiverged, match="training loss or update") as e:
        algo.fit()
    assert message in str(e.value) and "optimizer.lr" in str(e.value)
    order = algo.draw(0, 5)
    assert trained == (order[:order.index(3) + 1] if policy == "fail" else order)  # stopped at the first bad client
    results = strict_json((tmp_path / "results.json").read_text())
    assert results["diverged"] is True and results["diverged_round"] == 1 and results["final_test_accuracy"] is None
    assert not (tmp_path / "resume.pt").exists() and not (tmp_path / "metrics.jsonl").exists()


def test_global_model_that_the_server_makes_nonfinite_stops_the_run(compose_cfg, tmp_path):
    algo = build_algo(compose_cfg, tmp_path, *FIVE, "algo=fedavgm", "algo.server.lr=1e39")  # inf in float32
    with pytest.raises(TrainingDiverged, match="round 1: the global model is not finite after the server update"):
        algo.fit()
    assert strict_json((tmp_path / "results.json").read_text())["diverged_round"] == 1


def test_metrics_lines_are_strict_json(compose_cfg, tmp_path):
    algo = build_algo(compose_cfg, tmp_path, *FIVE)
    algo.record({"round": 1, "train_loss": float("nan"), "test_loss": float("inf"), "round_time_s": 0.1})
    line = strict_json((tmp_path / "metrics.jsonl").read_text())
    assert line["train_loss"] is None and line["test_loss"] is None and algo.history == [line]


def test_all_finite_sees_every_tensor_of_an_update():
    update = {"state": {"w": torch.ones(3), "n": torch.tensor(7)}, "extra": {"c": [torch.zeros(0), torch.ones(2)]}}
    assert all_finite(update)
    for value in (float("nan"), float("inf"), float("-inf")):
        update["extra"]["c"][1][0] = value
        assert not all_finite(update)

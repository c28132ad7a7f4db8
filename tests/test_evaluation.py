"""Evaluation as papers report it: held-out splits, per-client accuracy and its fairness statistics
(batched, equal to a per-client loop), fine-tuned evaluation that changes nothing, model selection
on validation with early stopping, and the run records (selected clients, seed, overrides, hash)."""
import io
import json

import numpy as np
import pytest
import torch

from conftest import run_train
from src.data.holdout import client_holdout, stratified_holdout
from src.errors import ConfigError
from src.evaluation import fairness, grouped_scores, predict_log_probs
from src.hooks import JsonlTable, ModelSelection
from src.utils.io import load_torch
from tests.inprocess import SMALL, build_algo, interrupted, metrics_without_times

HELD_OUT = ["dataset.val_fraction=0.2", "clients.test_fraction=0.25", "num_rounds=4", "eval_every=1"]


def test_stratified_holdout_takes_the_fraction_of_every_class():
    labels = np.repeat(np.arange(4), [10, 20, 30, 40])
    kept, held = stratified_holdout(labels, 0.1, np.random.default_rng(0))
    assert np.bincount(labels[held]).tolist() == [1, 2, 3, 4]
    assert sorted(np.concatenate([kept, held]).tolist()) == list(range(100))
    again = stratified_holdout(labels, 0.1, np.random.default_rng(0))[1]
    assert np.array_equal(held, again)


def test_client_holdout_splits_each_client_and_keeps_a_training_sample():
    parts = [np.arange(0, 8), np.arange(8, 10), np.array([10])]
    train, test = client_holdout(parts, 0.5, np.random.default_rng(1))
    assert [len(t) for t in test] == [4, 1, 0] and [len(t) for t in train] == [4, 1, 1]
    for p, tr, te in zip(parts, train, test):
        assert sorted([*tr, *te]) == p.tolist() and not set(tr) & set(te)
        assert list(tr) == sorted(tr)  # training samples keep the partition's order


def test_validation_and_client_test_data_never_overlap_training_or_each_other(compose_cfg, tmp_path):
    partitioned = ["dataset=random", "model=mlp", "dataset.shape=[4]", "dataset.train_size=300", "partition=iid",
                   "clients.total=6", "device=cpu"]
    for settings in (SMALL, partitioned):  # naturally federated (synthetic) and partitioned
        algo = build_algo(compose_cfg, tmp_path / settings[0], *settings, *HELD_OUT)
        val = set(algo.val_indices.tolist())
        train = [set(c.indices.tolist()) for c in algo.clients]
        test = [set(t.tolist()) for t in algo.client_test_indices]
        assert val and all(test) and all(train)
        everything = [val, *train, *test]
        assert sum(map(len, everything)) == len(set().union(*everything))  # pairwise disjoint
        assert len(set().union(*everything)) == len(algo.data.train)  # and nothing is lost


def test_grouped_scores_equal_a_per_client_loop():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    from src.data.device_data import DeviceDataset
    data = DeviceDataset(x, y, 3)
    clients = [torch.arange(0, 7), torch.arange(7, 20), torch.tensor([20]), torch.arange(21, 40)]
    owners = torch.cat([torch.full((len(c),), k) for k, c in enumerate(clients)])
    loss, correct, count = grouped_scores(model, data, owners, 4, batch_size=6, tta="none")
    for k, idx in enumerate(clients):
        log_probs = predict_log_probs(model, x[idx], "none")
        assert count[k] == len(idx)
        assert correct[k] == (log_probs.argmax(1) == y[idx]).sum().item()
        assert loss[k] == pytest.approx(torch.nn.functional.nll_loss(log_probs, y[idx], reduction="sum").item(),
                                        rel=1e-6)


def test_fairness_statistics_by_hand():
    got = fairness([0.2, 0.4, 0.6, 0.8, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0], "a")
    assert got["a_mean"] == pytest.approx(8.0 / 11)
    assert got["a_min"] == 0.0
    assert got["a_worst10"] == pytest.approx(0.1)  # ceil(1.1) = 2 worst clients: 0.0 and 0.2
    assert got["a_p10"] == pytest.approx(0.2)  # numpy's linear percentile: position 1.0 of the sorted list
    assert got["a_std"] == pytest.approx((7.2 / 11 - (8.0 / 11) ** 2) ** 0.5)  # population std: E[a^2] - mean^2
    assert got["a_jain"] == pytest.approx(8.0 ** 2 / (11 * 7.2))  # sum 8, sum of squares .04+.16+.36+.64+6 = 7.2
    assert fairness([0.5, 0.5], "b")["b_jain"] == 1.0 and fairness([0.0, 1.0], "b")["b_jain"] == 0.5
    assert fairness([0.0, 0.0], "b")["b_jain"] is None  # undefined when nobody is right


def test_model_selection_and_early_stopping_on_a_fabricated_sequence(tmp_path):
    history: list[dict] = []
    saved = []
    selection = ModelSelection(tmp_path, lambda: history, lambda: {"w": torch.tensor(float(len(history)))},
                               "val_accuracy", patience=3)
    sequence = [0.5, 0.6, None, 0.6, 0.55, 0.58, 0.7, 0.6]  # None: a round without evaluation
    stopped_at = None
    for r, v in enumerate(sequence, 1):
        metrics = {"round": r, **({} if v is None else {"val_accuracy": v})}
        before = tmp_path.joinpath("BEST_MODEL.pt").stat().st_mtime_ns if r > 1 else None
        selection.on_round_end(metrics)
        saved.append(before != tmp_path.joinpath("BEST_MODEL.pt").stat().st_mtime_ns)
        history.append(metrics)
        if selection.stop:
            stopped_at = r
            break
    # best at round 2 (the tie at round 4 does not count as better); 3 rounds later, round 5, it stops
    assert stopped_at == 5 and selection.best(history)["round"] == 2
    assert saved == [True, True, False, False, False]
    assert torch.load(tmp_path / "BEST_MODEL.pt", weights_only=True)["w"] == 1.0  # the model of round 2
    loss = ModelSelection(tmp_path, lambda: [{"round": 1, "val_loss": 0.3}, {"round": 2, "val_loss": 0.2}],
                          lambda: {}, "val_loss", None)
    assert loss.best(loss.history())["round"] == 2  # lower is better for a loss


def test_jsonl_table_keeps_only_rounds_up_to_the_checkpoint(tmp_path):
    table = JsonlTable(tmp_path / "t.jsonl")
    for r in (1, 2, 3):
        table.append({"round": r, "accuracy": [0.5, float("nan")]})
    with open(table.path, "a") as f:
        f.write('{"round": 4, "accur')  # cut short by a kill
    table.keep_rounds(2)
    rows = [json.loads(line) for line in table.path.read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2] and rows[0]["accuracy"] == [0.5, None]
    table.keep_rounds(0)
    assert table.path.read_text() == ""


def test_per_client_and_finetuned_evaluation_in_a_run(compose_cfg, tmp_path):
    algo = build_algo(compose_cfg, tmp_path, *SMALL, *HELD_OUT, "evaluation.finetune_steps=3", "client.persist_optimizer=true")
    algo.start(None)
    algo.fit()
    last = algo.history[-1]
    for key in ("client_acc_mean", "client_acc_std", "client_acc_min", "client_acc_p10", "client_acc_worst10",
                "client_acc_jain", "finetuned_acc_mean", "val_accuracy", "val_loss", "test_accuracy"):
        assert key in last, key
    rows = [json.loads(line) for line in (tmp_path / "client_metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["clients"] == list(range(6)) and len(rows[-1]["accuracy"]) == 6
    assert np.mean(rows[-1]["accuracy"]) == pytest.approx(last["client_acc_mean"])
    # the batched per-client accuracy equals scoring each client's held-out data on its own
    algo.setup.load(algo.server.global_state)
    for k, idx in enumerate(algo.client_test_indices):
        pred = predict_log_probs(algo.model.eval(), algo.data.train.x[idx], "none").argmax(1)
        assert rows[-1]["accuracy"][k] == pytest.approx((pred == algo.data.train.y[idx]).float().mean().item())
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["final_client_acc_mean"] == last["client_acc_mean"]
    assert results["best_round"] in (1, 2, 3, 4) and "best_test_accuracy" not in results  # never selected on test
    best = next(m for m in algo.history if m["round"] == results["best_round"])
    assert results["best_val_test_accuracy"] == best["test_accuracy"]
    assert results["best_val_accuracy"] == max(m["val_accuracy"] for m in algo.history)
    assert (tmp_path / "BEST_MODEL.pt").is_file()


def test_finetuned_evaluation_changes_no_model_store_or_rng(compose_cfg, tmp_path):
    algo = build_algo(compose_cfg, tmp_path, *SMALL, *HELD_OUT, "evaluation.finetune_steps=5",
                      "client.persist_optimizer=true", "optimizer.momentum=0.9")
    algo.start(None)
    algo.round = 0
    algo.train_step()
    algo.commit_round()
    global_before = {k: v.clone() for k, v in algo.server.global_state.items()}
    store_before = {i: serialized(algo.setup.store.get(i)) for i in range(len(algo.clients))}
    rng_before = torch.get_rng_state()
    metrics, table = algo.client_evaluation(algo.server.global_state, 1)
    assert metrics["finetuned_acc_mean"] >= 0 and len(table["finetuned_accuracy"]) == 6
    assert all(torch.equal(global_before[k], v) for k, v in algo.server.global_state.items())
    assert store_before == {i: serialized(algo.setup.store.get(i)) for i in range(len(algo.clients))}
    assert torch.equal(rng_before, torch.get_rng_state())
    # the working model is left holding the global weights
    assert all(torch.equal(algo.setup.live_state[k], v) for k, v in algo.server.global_state.items())


def serialized(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_resume_bit_for_bit_with_every_evaluation_on(compose_cfg, tmp_path):
    settings = [*SMALL, *HELD_OUT, "evaluation.finetune_steps=2", "early_stopping.patience=10",
                "client.persist_optimizer=true", "optimizer.momentum=0.9"]
    straight = build_algo(compose_cfg, tmp_path / "straight", *settings)
    straight.start(None)
    straight.fit()
    cut = interrupted(compose_cfg, tmp_path / "cut", settings, 2)
    cut.start(load_torch(tmp_path / "cut" / "resume.pt"))
    cut.fit()
    assert metrics_without_times(straight) == metrics_without_times(cut)
    assert all(torch.equal(v, cut.server.global_state[k]) for k, v in straight.server.global_state.items())
    assert ((tmp_path / "straight" / "client_metrics.jsonl").read_text()
            == (tmp_path / "cut" / "client_metrics.jsonl").read_text())
    best_a, best_b = (torch.load(tmp_path / d / "BEST_MODEL.pt", weights_only=True) for d in ("straight", "cut"))
    assert all(torch.equal(v, best_b[k]) for k, v in best_a.items())


def test_early_stopping_stops_and_a_rerun_does_nothing(tmp_path):
    run_dir = tmp_path / "run"
    # lr 0 keeps the model, so validation never improves after round 1: patience 2 stops at round 3
    settings = ["dataset=synthetic", "model=mlp", "clients.total=6", "clients.per_round=0.5", "dataset.max_device_size=60",
                "optimizer.lr=0", "num_rounds=10", "eval_every=1", "dataset.val_fraction=0.2",
                "early_stopping.patience=2"]
    run_train(run_dir, *settings)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["stopped_early"] and results["rounds"] == 3 and results["best_round"] == 1
    assert results["seed"] == 0 and "early_stopping.patience=2" in results["overrides"]
    assert len(results["config_sha256"]) == 64
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [1, 2, 3] and all(len(m["clients"]) == 3 for m in metrics)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name not in ("train.log", ".lock")}
    proc = run_train(run_dir, *settings)
    assert "already finished (3 rounds, stopped early)" in proc.stdout + proc.stderr
    assert before == {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name not in ("train.log", ".lock")}


@pytest.mark.parametrize("settings, problem", [
    (["early_stopping.patience=3"], "early_stopping.patience: early stopping selects on the validation split"),
    (["evaluation.finetune_steps=2"], "evaluation.finetune_steps: the fine-tuned clients"),
    (["clients.test_fraction=1.0"], "clients.test_fraction: must be in [0, 1)"),
    (["dataset.val_fraction=1.5"], "val_fraction"),
])
def test_settings_that_cannot_work_are_refused(settings, problem, compose_cfg, tmp_path):
    with pytest.raises(ConfigError, match=problem.replace("[", r"\[").replace(")", r"\)")):
        build_algo(compose_cfg, tmp_path, *SMALL, *settings)

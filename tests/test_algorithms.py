"""Every algorithm: resumes bit for bit from a mid-run checkpoint; and on a pathological partition
(one class per client) SCAFFOLD, FedDyn and FedSeq beat FedAvg after the same number of rounds."""
import pytest
import torch

from tests.inprocess import SMALL, build_algo, interrupted, metrics_without_times, resume

FEDSEQ_SMALL = ["algo.min_examples=100", "algo.pretrain_epochs=2"]
ALGORITHMS = {
    "fedavg": [], "fairavg": [], "fedprox": [], "scaffold": [], "feddyn": [], "fedadam": [], "fedyogi": [],
    "fedadagrad": [], "fedavgm": [], "fedmedian": [], "centralized": [], "fedseq": FEDSEQ_SMALL,
    "fedseq_fedprox": FEDSEQ_SMALL, "fedseq_feddyn": FEDSEQ_SMALL,
}


@pytest.mark.parametrize("algo", sorted(ALGORITHMS))
def test_every_algorithm_resumes_bit_for_bit(algo, compose_cfg, tmp_path):
    settings = [*SMALL, f"algo={algo}", *ALGORITHMS[algo], "num_rounds=3", "eval_every=1", "clients.total=8",
                "optimizer.momentum=0.9", "client.persist_optimizer=true"]
    straight = build_algo(compose_cfg, tmp_path / "straight", *settings)
    straight.fit()
    resumed = resume(interrupted(compose_cfg, tmp_path / "cut", settings, 1))
    resumed.fit()
    a, b = straight.server.state_dict(), resumed.server.state_dict()
    assert a.keys() == b.keys()
    for part in a:  # the global model and the server's own state (controls, h, moments)
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert metrics_without_times(straight) == metrics_without_times(resumed)
    # between rounds clients hold their indices and nothing model-sized (persisted state is in the store)
    for client in resumed.clients:
        held = {k for k, v in vars(client).items() if k != "indices" and has_tensor(v)}
        assert not held, f"client {client.client_id} keeps {held}"


def has_tensor(value) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, dict):
        return any(has_tensor(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(has_tensor(v) for v in value)
    return False


# One class per client (alpha=0), 200 clients of 300 Fashion-MNIST images, 20 client trainings a
# round (FedSeq: 2 superclients of 10 clients), 5 local SGD steps at lr 0.02, 10 rounds. Measured
# with seed 0: FedAvg 58.7%, SCAFFOLD 62.3%, FedDyn 60.8%, FedSeq 71.7%.
PATHOLOGICAL = ["model=mlp", "model.hidden=[64]", "partition.alpha=0", "clients.total=200",
                "client.local_epochs=null", "client.local_steps=5", "client.batch_size=64", "optimizer.lr=0.02",
                "num_rounds=10", "eval_every=10", "device=cpu", "checkpoint.every=100"]


def test_drift_correcting_algorithms_beat_fedavg_on_one_class_per_client(compose_cfg, tmp_path, fmnist_root):
    runs = {
        "fedavg": ["algo=fedavg", "clients.num_per_round=20"],
        "scaffold": ["algo=scaffold", "clients.num_per_round=20"],
        "feddyn": ["algo=feddyn", "clients.num_per_round=20"],
        "fedseq": ["algo=fedseq", "clients.num_per_round=2", "algo.min_examples=3000", "algo.pretrain_epochs=2"],
    }
    accuracy = {}
    for name, extra in runs.items():
        algo = build_algo(compose_cfg, tmp_path / name, *PATHOLOGICAL, f"dataset.root={fmnist_root}", *extra)
        accuracy[name] = algo.fit()["final_test_accuracy"]
    for name in ("scaffold", "feddyn", "fedseq"):
        assert accuracy[name] > accuracy["fedavg"] + 0.01, accuracy

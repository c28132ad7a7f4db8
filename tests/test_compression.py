"""Update compression (src/compression.py): each kind by hand on toy tensors, error feedback over two
rounds through the client state store, QSGD's and random-k's unbiasedness over many draws, the byte
counts by hand, start-up checks, and runs end to end (bytes in the metrics and results, resume bit for
bit with error feedback on)."""
import json
import math
from types import SimpleNamespace

import pytest
import torch

from src.algo.base import RESULTS_FILE
from src.client.client import ClientUpdate
from src.client.state_store import ClientStateStore
from src.compression import QSGD, RESIDUAL, Identity, NoCompression, RandomK, Sign, TopK, budget, install_broadcast
from src.config import validate
from src.errors import ConfigError
from src.server import FedAvgServer
from src.sweep.collect import collect
from src.sweep.experiment import Experiment, save_declaration
from tests.inprocess import SMALL, build_algo, interrupted, metrics_without_times, resume
from tests.test_golden import model_hash
from tests.test_sweep import fabricate


def installed(compressor, g, param_names=("w",), seed=0):
    """`compressor` installed on a toy federation whose global model is `g`."""
    server = FedAvgServer("uniform")
    server.set_global_state(g)
    server.attach(list(param_names), 4)
    algo = SimpleNamespace(cfg=SimpleNamespace(seed=seed), server=server, round=0, hooks=[], transforms=[],
                           setup=SimpleNamespace(param_names=list(param_names)))
    compressor.install(algo)
    assert algo.transforms == [compressor] and algo.hooks == [compressor.meter]
    return compressor, algo


def update(sender=0, extra=None, **state):
    state = {k: torch.tensor(v) for k, v in state.items()}
    return ClientUpdate(state, 1, torch.zeros(()), 1, extra=extra, sender=sender)


@pytest.fixture
def store(tmp_path):
    return ClientStateStore("host", torch.device("cpu"), tmp_path / "client_state")


# ---- each kind by hand ----------------------------------------------------------------------------
def test_top_k_keeps_exactly_the_k_largest_magnitudes():
    x = torch.tensor([0.5, -4.0, 1.0, 3.0, -0.1, 2.0, -2.5, 0.0, 0.2, 1.5])
    c, size = TopK(0.3).compress(x, None)  # k = 3: -4, 3, -2.5
    assert c.tolist() == [0.0, -4.0, 0.0, 3.0, 0.0, 0.0, -2.5, 0.0, 0.0, 0.0]
    assert size == 3 * (4 + 4)
    assert TopK(1.0).compress(x, None)[0].tolist() == x.tolist()


def test_budget_is_the_ceiling_of_the_written_fraction():
    assert budget(0.01, 300) == 3  # 0.01 * 300 is 3.0000000000000004 in floats
    assert budget(0.01, 301) == 4 and budget(0.01, 6) == 1 and budget(0.3, 10) == 3 and budget(1.0, 7) == 7


def test_top_k_error_feedback_over_two_rounds(store):
    t, algo = installed(TopK(0.25), {"w": torch.zeros(4)})  # k = 1 of 4
    # round 1: Delta = [4, -1, 0.5, 2]: send [4, 0, 0, 0], keep [0, -1, 0.5, 2]
    sent = t.client(update(w=[4.0, -1.0, 0.5, 2.0]), 0, store)
    assert sent.state["w"].tolist() == [4.0, 0.0, 0.0, 0.0]
    store.commit()
    assert store.get(0)[RESIDUAL]["w"].tolist() == [0.0, -1.0, 0.5, 2.0]
    # round 2, from G = [1, 1, 1, 1]: Delta = [1, -1.5, 0, 0.25], p = Delta + e = [1, -2.5, 0.5, 2.25]:
    # the residual's -1 makes entry 1 the largest; without it the round would send -1.5 there
    algo.server.set_global_state({"w": torch.ones(4)})
    sent = t.client(update(w=[2.0, -0.5, 1.0, 1.25]), 0, store)
    assert sent.state["w"].tolist() == [1.0, -1.5, 1.0, 1.0]  # G + [0, -2.5, 0, 0]
    store.commit()
    assert store.get(0)[RESIDUAL]["w"].tolist() == [1.0, 0.0, 0.5, 2.25]
    assert RESIDUAL not in store.get(1)  # only the client that sent keeps one
    plain, _ = installed(TopK(0.25, error_feedback=False), {"w": torch.ones(4)})
    assert plain.client(update(w=[2.0, -0.5, 1.0, 1.25]), 1, store).state["w"].tolist() == [1.0, -0.5, 1.0, 1.0]


def test_residual_stays_beside_the_clients_own_state(store):
    t, _ = installed(TopK(0.5), {"w": torch.zeros(2)})
    store.put(0, {"optimizer": torch.tensor(7.0)})  # what the client itself staged this round
    t.client(update(w=[3.0, 1.0]), 0, store)
    store.commit()
    assert store.get(0)["optimizer"].item() == 7.0 and store.get(0)[RESIDUAL]["w"].tolist() == [0.0, 1.0]


def test_sign_with_error_feedback_by_hand(store):
    t, _ = installed(Sign(), {"w": torch.zeros(4)})
    # round 1: p = [1, -3, 0, 2], scale ||p||_1 / 4 = 1.5, sign(0) = +1: send [1.5, -1.5, 1.5, 1.5]
    assert t.client(update(w=[1.0, -3.0, 0.0, 2.0]), 0, store).state["w"].tolist() == [1.5, -1.5, 1.5, 1.5]
    store.commit()
    assert store.get(0)[RESIDUAL]["w"].tolist() == [-0.5, -1.5, -1.5, 0.5]
    # round 2: p = [1.5, 0.5, 1.5, 0.5] + e = [1, -1, 0, 1], scale 0.75
    assert t.client(update(w=[1.5, 0.5, 1.5, 0.5]), 0, store).state["w"].tolist() == [0.75, -0.75, 0.75, 0.75]
    store.commit()
    assert store.get(0)[RESIDUAL]["w"].tolist() == [0.25, -0.25, -0.75, 0.25]
    _, size = Sign().compress(torch.ones(17), None)
    assert size == 3 + 4  # 17 bits in 3 bytes, and the float scale


def test_qsgd_levels_and_unbiasedness():
    assert (QSGD(2).levels, QSGD(3).levels, QSGD(8).levels) == (1, 3, 127)
    x = torch.tensor([0.3, -0.5, 0.1, 0.8, 0.0])
    norm = torch.linalg.vector_norm(x)
    for bits in (2, 3):
        q = QSGD(bits)
        s = q.levels
        gen = torch.Generator().manual_seed(0)
        draws = torch.stack([q.compress(x, gen)[0] for _ in range(10000)])
        level = draws.abs() * s / norm  # each entry is sign(x_j) ||x|| l / s with l in 0..s
        assert torch.allclose(level, level.round(), atol=1e-4) and level.round().max() <= s
        # ... and l is s |x_j| / ||x|| rounded down or up, never further
        r = x.abs() * s / norm
        assert ((level.round() == r.floor()) | (level.round() == r.ceil())).all()
        assert (draws.sign() * x.sign() >= 0).all()
        # unbiased: per-draw variance <= ||x|| |x_j| / s <= 0.8, so the mean of 10^4 is within 0.009 (1 sd)
        assert torch.allclose(draws.mean(0), x, atol=0.03)
    assert QSGD(2).compress(torch.zeros(3), torch.Generator())[0].tolist() == [0.0, 0.0, 0.0]


def test_random_k_unbiased_over_draws():
    x = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0])
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([RandomK(0.4).compress(x, gen)[0] for _ in range(4000)])  # k = 2, scaled by 5/2
    kept = draws != 0
    assert (kept.sum(1) <= 2).all() and (draws[kept] == (x * 2.5).expand_as(draws)[kept]).all()
    # per-entry variance x_j^2 (n/k - 1) = 1.5 x_j^2 <= 13.5: the mean of 4000 is within 0.06 (1 sd)
    assert torch.allclose(draws.mean(0), x, atol=0.2)
    c, size = RandomK(0.4, unbiased=False).compress(x, torch.Generator().manual_seed(1))
    assert ((c == 0) | (c == x)).all() and size == 2 * 4


def test_random_k_indices_are_a_function_of_seed_round_and_client(store):
    t, algo = installed(RandomK(0.1), {"w": torch.zeros(100)})
    u = update(w=list(range(1, 101)))
    first = t.client(u, 3, store).state["w"]
    assert torch.equal(t.client(u, 3, store).state["w"], first) and (first != 0).sum() == 10
    assert not torch.equal(t.client(u, 4, store).state["w"], first)
    algo.round = 1
    assert not torch.equal(t.client(u, 3, store).state["w"], first)


# ---- bytes ------------------------------------------------------------------------------------------
# w: 100 entries, b: 10, an int64 buffer (8 bytes) and a 3-entry float payload (12 bytes), both sent as
# they are; uncompressed: 4 * 110 + 8 + 12 = 460 bytes up, and the broadcast (G) 448 bytes down
@pytest.mark.parametrize("compressor, up", [
    (TopK(0.05), 8 * 5 + 8 * 1 + 8 + 12),  # k = 5 and ceil(0.5) = 1, each a float32 value and an int32 index
    (RandomK(0.05), 4 * 5 + 4 * 1 + 8 + 12),  # values only
    (QSGD(8), (100 + 4) + (10 + 4) + 8 + 12),  # a byte per entry and a float norm per tensor
    (QSGD(2), (25 + 4) + (3 + 4) + 8 + 12),  # 200 bits, 20 bits in 3 bytes
    (Sign(), (13 + 4) + (2 + 4) + 8 + 12),  # 100 bits in 13 bytes, 10 in 2
])
def test_bytes_by_hand(compressor, up, store):
    g = {"w": torch.zeros(10, 10), "b": torch.zeros(10), "count": torch.tensor(0)}
    t, _ = installed(compressor, g, param_names=("w", "b"))
    trained = update(w=torch.randn(10, 10).tolist(), b=torch.randn(10).tolist(), count=3,
                     extra={"control": torch.zeros(3)})
    for client in (0, 1):  # two updates in the round
        sent = t.client(trained, client, store)
        assert sent.state["count"] is trained.state["count"] and sent.extra is trained.extra
    metrics = {}
    t.meter.on_round_end(metrics)
    assert metrics == {"bytes_up": 2 * up, "bytes_up_uncompressed": 2 * 460, "bytes_down": 2 * 448}
    t.meter.on_round_start()
    history = [metrics, {"round": 2, **t.meter.counts}]
    assert t.totals(history) == metrics
    assert NoCompression().totals(history) == {}


# ---- the compressed broadcast ------------------------------------------------------------------------
def test_qsgd_with_the_max_norm_puts_the_largest_entry_on_the_top_level():
    x = torch.tensor([0.3, -0.6, 0.1, 0.0])
    q = QSGD(3, norm="max")  # s = 3 levels of 0.6 / 3 = 0.2
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([q.compress(x, gen)[0] for _ in range(10000)])
    assert torch.allclose(draws[:, 1], x[1].expand(10000))  # the top level: always sent as it is
    low, high = torch.isclose(draws[:, 0], torch.tensor(0.2)), torch.isclose(draws[:, 0], torch.tensor(0.4))
    assert (low | high).all() and low.any() and high.any()  # 0.3 is 1.5 levels: rounded to one or two
    assert draws[:, 3].eq(0).all()
    # per-entry variance at most (0.2 / 2)^2 = 0.01: the mean of 10^4 is within 0.001 (1 sd)
    assert torch.allclose(draws.mean(0), x, atol=0.005)


def test_broadcast_quantizes_the_model_once_per_round_and_updates_count_from_it(store):
    g = {"w": torch.tensor([0.3, -0.6, 0.1, 0.0]), "count": torch.tensor(0)}
    server = FedAvgServer("uniform")
    server.set_global_state(g)
    server.attach(["w"], 4)
    algo = SimpleNamespace(cfg=SimpleNamespace(seed=0), server=server, round=0, hooks=[], transforms=[],
                           setup=SimpleNamespace(param_names=["w"]), compression=NoCompression(),
                           send_data=server.send_data)
    broadcast = install_broadcast(algo, bits=3)
    assert isinstance(algo.compression, Identity) and algo.transforms == [broadcast, algo.compression]
    sent = algo.send_data()["global_state"]
    assert sent is algo.send_data()["global_state"]  # every client of the round receives the same model
    assert sent["count"] is server.global_state["count"] and sent["w"][1] == -0.6 and sent["w"][3] == 0
    algo.round = 1
    rounds = torch.stack([algo.send_data()["global_state"]["w"]] + [
        (setattr(algo, "round", r), algo.send_data()["global_state"]["w"])[1] for r in range(2, 4000)])
    assert torch.allclose(rounds.mean(0), g["w"], atol=0.01)  # unbiased over the rounds' draws
    # the update counts from where the client started: G + (w - Q(G)), then sent as it is
    q = algo.send_data()["global_state"]["w"]
    trained = update(w=[1.0, 1.0, 1.0, 1.0], count=2)
    out = broadcast.client(trained, 0, store)
    assert torch.allclose(out.state["w"], g["w"] + (torch.ones(4) - q)) and out.state["count"] is trained.state["count"]
    algo.compression.client(out, 0, store)
    metrics = {}
    algo.compression.meter.on_round_end(metrics)
    # down: 4 entries of 3 bits in 2 bytes + a float32 scale, and the int64 buffer as it is
    assert metrics == {"bytes_up": 4 * 4 + 8, "bytes_up_uncompressed": 4 * 4 + 8, "bytes_down": 2 + 4 + 8}


def test_a_run_with_a_compressed_broadcast_counts_it_and_resumes_bit_for_bit(compose_cfg, tmp_path):
    settings = [*SMALL, "broadcast.bits=8", "compression=top_k", "compression.fraction=0.1"]
    straight = build_algo(compose_cfg, tmp_path / "straight", *settings)
    straight.fit()
    sizes = [straight.server.global_state[n].numel() for n in straight.setup.param_names]
    assert all(m["bytes_down"] == 3 * sum(n + 4 for n in sizes) for m in straight.history)  # one byte an entry
    assert all(m["bytes_up"] == 3 * sum(8 * math.ceil(n / 10) for n in sizes) for m in straight.history)
    assert straight.history[-1]["test_accuracy"] > 0.5
    resumed = resume(interrupted(compose_cfg, tmp_path / "cut", settings, 2))
    resumed.fit()
    assert metrics_without_times(resumed) == metrics_without_times(straight)
    assert model_hash(resumed.server.global_state) == model_hash(straight.server.global_state)


# ---- start-up checks ------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, expected", [
    (["compression=top_k", "compression.fraction=0"], "compression.fraction: src.compression.TopK refuses"),
    (["compression=random_k", "compression.fraction=1.5"], "compression.fraction: src.compression.RandomK refuses"),
    (["compression=qsgd", "compression.bits=1"], "compression.bits: src.compression.QSGD refuses bits=1"),
    (["compression=random_k", "compression.error_feedback=true"], "compression.error_feedback: random_k with unbiased"),
    (["compression=sign", "+compression.fraction=0.1"], "compression.fraction: unknown key"),
    (["broadcast.bits=1"], "broadcast.bits"),
    (["compression=qsgd", "compression.norm=l1"], "compression.norm"),
])
def test_bad_compression_settings_are_refused(compose_cfg, overrides, expected):
    with pytest.raises(ConfigError) as info:
        validate(compose_cfg(*SMALL, *overrides))
    assert any(p.startswith(expected) for p in info.value.problems), info.value.problems


def test_unscaled_random_k_takes_error_feedback(compose_cfg):
    validate(compose_cfg(*SMALL, "compression=random_k", "compression.unbiased=false", "compression.error_feedback=true"))


# ---- end to end -------------------------------------------------------------------------------------
def test_compressed_run_reports_bytes(compose_cfg, tmp_path):
    algo = build_algo(compose_cfg, tmp_path / "run", *SMALL, "compression=top_k", "compression.fraction=0.1")
    algo.fit()
    params = sum(algo.server.global_state[n].numel() for n in algo.setup.param_names)
    sizes = [algo.server.global_state[n].numel() for n in algo.setup.param_names]
    per_client_up = sum(8 * math.ceil(n / 10) for n in sizes)  # every entry of the MLP is a parameter
    for m in algo.history:
        assert m["bytes_up"] == 3 * per_client_up  # 3 clients a round
        assert m["bytes_up_uncompressed"] == m["bytes_down"] == 3 * 4 * params
    results = algo.results()
    assert results["bytes_up"] == 4 * 3 * per_client_up and results["bytes_down"] == 4 * 3 * 4 * params
    stored = algo.setup.store.state_dict()
    assert stored and all(set(s[RESIDUAL]) == set(algo.setup.param_names) for s in stored.values())


def test_compression_none_reports_nothing(compose_cfg, tmp_path):
    algo = build_algo(compose_cfg, tmp_path / "run", *SMALL, "num_rounds=1")
    algo.fit()
    assert "bytes_up" not in algo.history[0] and "bytes_up" not in algo.results()


@pytest.mark.parametrize("settings", [
    ["compression=top_k", "compression.fraction=0.05"],
    ["compression=sign", "client.state_store=disk", "client.persist_optimizer=true", "optimizer.momentum=0.9"],
])
def test_error_feedback_run_resumes_bit_for_bit(settings, compose_cfg, tmp_path):
    settings = [*SMALL, *settings]
    straight = build_algo(compose_cfg, tmp_path / "straight", *settings)
    straight.fit()
    resumed = resume(interrupted(compose_cfg, tmp_path / "cut", settings, 2))
    resumed.fit()
    assert metrics_without_times(resumed) == metrics_without_times(straight)
    assert model_hash(resumed.server.global_state) == model_hash(straight.server.global_state)
    residuals = lambda a: {c: a.setup.store.get(c)[RESIDUAL] for c in a.setup.store.client_ids()}  # noqa: E731
    assert residuals(resumed).keys() == residuals(straight).keys()
    for c, r in residuals(straight).items():
        assert all(torch.equal(r[k], residuals(resumed)[c][k]) for k in r)


def test_collect_shows_the_bytes_columns_when_runs_report_them(tmp_path):
    exp = Experiment(name="comp", grid={"compression": ["none", "top_k"]}, seeds=[0, 1])
    save_declaration(exp, tmp_path)
    for kind in ("none", "top_k"):
        for seed in (0, 1):
            run_dir = tmp_path / "comp" / kind / f"seed{seed}"
            fabricate(run_dir, [0.5, 0.6], 10)
            if kind == "top_k":
                results = json.loads((run_dir / RESULTS_FILE).read_text())
                results.update({"bytes_up": 2e6 + seed * 1e6, "bytes_up_uncompressed": 100e6, "bytes_down": 100e6})
                (run_dir / RESULTS_FILE).write_text(json.dumps(results))
    report = collect(str(tmp_path / "comp"), plots=False)[0].read_text()
    assert "| uploaded (MB) | upload compression (x) |" in report
    row = {line.split(" | ")[0].lstrip("| "): line for line in report.splitlines() if line.startswith("| ")}
    assert row["top_k"].endswith("| 2.50 ± 0.71 | 41.7 ± 11.8 |")  # 100 / 2 and 100 / 3
    assert row["none"].endswith("| — | — |")

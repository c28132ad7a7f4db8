"""The client trainer's switches against hand-computed values: LR schedules, persisted optimizer
state in each store, EMA, label smoothing, flip TTA, gradient clipping; and resume with all on."""
import math
from functools import partial

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from src.evaluation import predict_log_probs
from src.client.client import Client, TrainSetup
from src.client.ema import ClientEMA
from src.client.schedule import LRSchedule
from src.client.state_store import ClientStateStore
from src.config import validate
from src.data.device_data import DeviceDataset
from src.errors import ConfigError, UserError
from src.losses import CrossEntropy
from src.utils.io import load_torch
from tests.inprocess import SMALL, build_algo, interrupted, metrics_without_times, resume

X = torch.tensor([[1.0, 2.0, 0.5], [3.0, -1.0, 0.0], [0.5, 0.5, -2.0], [-1.0, 1.0, 1.0]])
Y = torch.tensor([0, 1, 1, 0])


def toy_setup(optimizer=partial(torch.optim.SGD, lr=0.1), store=None, **kw):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    kw = {"batch_size": 2, "local_epochs": None, "local_steps": 4, "seed": 0, "store": store, **kw}
    return TrainSetup(model, DeviceDataset(X, Y, 2), CrossEntropy(), optimizer, **kw)


def train_round(setup, client, round_idx, global_state=None):
    client.receive_data({"global_state": global_state or {k: v.clone() for k, v in setup.live_state.items()}})
    client.client_update(round_idx)
    update = client.send_data()
    if setup.store is not None:
        setup.store.commit()
    return update


# ---- LR schedules -------------------------------------------------------------------------------
def test_schedule_multipliers_by_hand():
    cos, lin = LRSchedule("cosine"), LRSchedule("linear")
    assert cos(0, 10) == 1.0 and cos(5, 10) == pytest.approx(0.5) and cos(10, 10) == pytest.approx(0.0)
    assert lin(0, 8) == 1.0 and lin(2, 8) == 0.75 and lin(6, 8) == 0.25
    step = LRSchedule("step", milestones=(0.5, 0.75), gamma=0.1)
    assert [step(t, 8) for t in (0, 3, 4, 5, 6, 7)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    # warm-up over 0.25 of 8 steps = 2 steps: 1/2, 2/2, then linear decay over the remaining 6
    warm = LRSchedule("linear", warmup=0.25)
    assert [warm(t, 8) for t in range(5)] == pytest.approx([0.5, 1.0, 1.0, 5 / 6, 4 / 6])
    with pytest.raises(ValueError, match="warmup"):
        LRSchedule("cosine", warmup=1.5)


@pytest.mark.parametrize("continuous", [True, False])
def test_lr_seen_at_each_local_step_follows_the_schedule_position(continuous):
    seen = []

    def recording_sgd(params):
        opt = torch.optim.SGD(params, lr=0.2)
        opt.register_step_pre_hook(lambda o, args, kwargs: seen.append(o.param_groups[0]["lr"]))
        return opt

    schedule = LRSchedule("cosine", continuous=continuous)
    setup = toy_setup(recording_sgd, num_rounds=3, schedule=schedule)
    client = Client(0, torch.arange(4), setup)
    steps = 4
    for r in range(3):
        seen.clear()
        train_round(setup, client, r)
        # continuous: step s of round r sits at r*S + s of a 3*S-step cosine; otherwise at s of S
        expected = [0.2 * 0.5 * (1 + math.cos(math.pi * ((r * steps + s) / (3 * steps) if continuous else s / steps)))
                    for s in range(steps)]
        assert seen == pytest.approx(expected)


# ---- persisted optimizer state ------------------------------------------------------------------
def momentum_at_first_step(setup, client, round_idx):
    """The optimizer state a client round starts from, captured just before its first step."""
    captured = []
    inner = setup.optimizer

    def capturing(params):
        opt = inner(params)
        opt.register_step_pre_hook(lambda o, a, k: captured.append(
            {i: {n: t.clone() for n, t in s.items()} for i, s in o.state_dict()["state"].items()}) if not captured else None)
        return opt

    setup.optimizer = capturing
    train_round(setup, client, round_idx)
    setup.optimizer = inner
    return captured[0]


@pytest.mark.parametrize("where", ["device", "host", "disk"])
def test_optimizer_state_restored_bit_for_bit_from_each_store_and_after_resume(where, tmp_path):
    store = ClientStateStore(where, torch.device("cpu"), tmp_path / "state")
    setup = toy_setup(partial(torch.optim.SGD, lr=0.1, momentum=0.9), store, persist_optimizer=True)
    client = Client(7, torch.arange(4), setup)
    assert momentum_at_first_step(setup, client, 0) == {}  # first round: nothing saved yet
    saved = store.get(7)["optimizer"]["state"]
    assert set(saved) == {0, 1} and saved[0]["momentum_buffer"].abs().sum() > 0
    restored = momentum_at_first_step(setup, client, 1)
    for i in saved:
        assert torch.equal(restored[i]["momentum_buffer"], saved[i]["momentum_buffer"])
    if where == "disk":
        assert (tmp_path / "state" / "7" / "state.1.pt").is_file()  # committed at the store's second commit

    # the state survives a checkpoint round trip into a fresh store
    checkpoint = store.state_dict()
    fresh = ClientStateStore(where, torch.device("cpu"), tmp_path / "state2")
    fresh.load_state_dict(checkpoint, source=store.directory)  # the disk store's checkpoint names its files
    after = fresh.get(7)["optimizer"]["state"]
    before = store.get(7)["optimizer"]["state"]
    assert all(torch.equal(after[i]["momentum_buffer"], before[i]["momentum_buffer"]) for i in before)


def test_optimizer_state_is_rebuilt_empty_when_not_persisted(tmp_path):
    store = ClientStateStore("host", torch.device("cpu"), tmp_path)
    setup = toy_setup(partial(torch.optim.SGD, lr=0.1, momentum=0.9), store, persist_optimizer=False)
    client = Client(0, torch.arange(4), setup)
    train_round(setup, client, 0)
    assert momentum_at_first_step(setup, client, 1) == {} and store.state_dict() == {}


def test_writes_become_visible_only_at_commit(tmp_path):
    store = ClientStateStore("disk", torch.device("cpu"), tmp_path)
    store.put(3, {"x": torch.ones(2)})
    assert store.get(3) == {} and store.state_dict() == {}  # a mid-round checkpoint sees the old state
    store.commit()
    assert torch.equal(store.get(3)["x"], torch.ones(2))


def test_persisted_adam_step_count_continues_across_rounds(tmp_path):
    store = ClientStateStore("device", torch.device("cpu"), tmp_path)
    setup = toy_setup(partial(torch.optim.Adam, lr=0.01), store, persist_optimizer=True)
    client = Client(0, torch.arange(4), setup)
    for r in range(3):
        train_round(setup, client, r)
    assert store.get(0)["optimizer"]["state"][0]["step"].item() == 12.0  # 3 rounds x 4 local steps


# ---- EMA ----------------------------------------------------------------------------------------
def test_ema_keeps_the_playbooks_share_on_the_round_start_weights():
    """0.999**148: the EMA of a weight that moves from 0 to 1 at the first step and stays there."""
    model = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(model.weight)
    ema = ClientEMA(model, 0.999, persist=False, send="ema")
    ema.begin(model, None)
    with torch.no_grad():
        model.weight.fill_(1.0)
    for _ in range(148):
        ema.update(model)
    start_share = 1.0 - ema.weights(dict(model.state_dict()))["weight"].item()
    assert start_share == pytest.approx(0.999 ** 148, rel=1e-5)
    assert start_share == pytest.approx(0.8623, abs=1e-4)  # "about 86%" of the EMA stays at round start


@pytest.mark.parametrize("persist", [True, False])
def test_ema_persist_or_reset_and_what_is_sent(persist, tmp_path):
    store = ClientStateStore("host", torch.device("cpu"), tmp_path)
    setup = toy_setup(store=store)
    setup.ema = ClientEMA(setup.model, 0.9, persist=persist, send="ema")
    setup.__post_init__()  # sent_state now points at the EMA weights
    client = Client(0, torch.arange(4), setup)
    start = {k: v.clone() for k, v in setup.live_state.items()}
    update = train_round(setup, client, 0, start)
    assert torch.equal(update.state["weight"], update.ema_state["weight"])  # send=ema
    assert not torch.equal(update.state["weight"], setup.live_state["weight"])
    ema_after_round0 = update.state["weight"].clone()

    # next round, from a different global model: the EMA starts at the saved EMA or at that model
    new_global = {k: v + 1.0 for k, v in start.items()}
    setup.load(new_global)
    setup.ema.begin(setup.model, store.get(0).get("ema") if persist else None)
    expected = ema_after_round0 if persist else new_global["weight"]
    assert torch.equal(setup.ema.weights(setup.live_state)["weight"], expected)
    assert ("ema" in store.get(0)) == persist


def test_raw_weights_are_sent_when_asked():
    setup = toy_setup()
    setup.ema = ClientEMA(setup.model, 0.9, persist=False, send="raw")
    setup.__post_init__()
    update = train_round(setup, Client(0, torch.arange(4), setup), 0)
    assert torch.equal(update.state["weight"], setup.live_state["weight"])
    assert not torch.equal(update.ema_state["weight"], update.state["weight"])


# ---- clipping -----------------------------------------------------------------------------------
def test_clipping_bounds_the_global_gradient_norm():
    """One SGD step with lr 1 from the same weights: the update is -grad, so its global norm (over
    weight and bias together) is the gradient norm, cut to 0.01 by clipping."""
    deltas = {}
    for clip in (None, 0.01):
        setup = toy_setup(partial(torch.optim.SGD, lr=1.0), local_steps=1, batch_size=4, grad_clip=clip)
        start = {k: v.clone() for k, v in setup.live_state.items()}
        update = train_round(setup, Client(0, torch.arange(4), setup), 0, start)
        deltas[clip] = torch.cat([(update.state[k] - start[k]).flatten() for k in start]).norm().item()
    assert deltas[None] > 0.01
    assert deltas[0.01] == pytest.approx(0.01, rel=1e-4)


# ---- label smoothing and TTA --------------------------------------------------------------------
def test_label_smoothing_changes_the_training_loss_only(compose_cfg, tmp_path):
    losses = {}
    for eps in (0.0, 0.3):
        setup = toy_setup(local_steps=1, batch_size=4)
        setup.loss_fn = CrossEntropy(label_smoothing=eps)
        losses[eps] = train_round(setup, Client(0, torch.arange(4), setup), 0).loss_sum.item()
    assert losses[0.3] != pytest.approx(losses[0.0])

    # evaluation reports hard-label cross-entropy whatever the training loss
    results = {}
    for eps in (0.0, 0.3):
        algo = build_algo(compose_cfg, tmp_path / str(eps), *SMALL, f"loss.label_smoothing={eps}")
        results[eps] = algo.evaluate()
        logits = algo.model(algo.data.test.x)
        assert results[eps]["test_loss"] == pytest.approx(F.cross_entropy(logits, algo.data.test.y).item(), rel=1e-5)
    assert results[0.0] == results[0.3]  # same initial model, same metric


def test_flip_tta_is_the_mean_of_the_two_predictions():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x = torch.randn(5, 1, 3, 4)
    expected = (F.softmax(model(x), 1) + F.softmax(model(x.flip(-1)), 1)) / 2
    torch.testing.assert_close(predict_log_probs(model, x, "hflip").exp(), expected)
    torch.testing.assert_close(predict_log_probs(model, x, "none").exp(), F.softmax(model(x), 1))


def test_flip_tta_is_refused_on_data_that_is_not_flip_invariant(compose_cfg):
    validate(compose_cfg("tta=hflip"))  # Fashion-MNIST: mirrored clothes keep their label
    for data in (["dataset=mnist"], ["dataset=synthetic", "model=mlp"]):
        with pytest.raises(ConfigError, match=r"(?s)1 problem.*not flip-invariant.*use tta=none"):
            validate(compose_cfg(*data, "tta=hflip"))


# ---- everything on, through the controller, interrupted and resumed ----------------------------
@pytest.mark.parametrize("where", ["device", "host", "disk"])
def test_all_switches_on_resume_bit_for_bit(where, compose_cfg, tmp_path):
    switches = [*SMALL, "optimizer=adam", "schedule=cosine", "schedule.warmup=0.1", "client.persist_optimizer=true",
                f"client.state_store={where}", "client.ema.decay=0.9", "client.ema.persist=true",
                "client.grad_clip=1.0", "loss.label_smoothing=0.1"]
    straight = build_algo(compose_cfg, tmp_path / "straight", *switches)
    straight.fit()
    resumed = resume(interrupted(compose_cfg, tmp_path / "cut", switches, 2))
    assert resumed.round == 2 and resumed.setup.store.client_ids()
    resumed.fit()

    a, b = straight.server.global_state, resumed.server.global_state
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert metrics_without_times(straight) == metrics_without_times(resumed)


def test_ema_evaluate_scores_the_clients_mean_ema(compose_cfg, tmp_path):
    algo = build_algo(compose_cfg, tmp_path, *SMALL, "num_rounds=1", "client.ema.decay=0.5",
                      "client.ema.send=raw", "client.ema.evaluate=true")
    seen = []
    aggregate = algo.server.aggregate

    def recording(updates):
        def record(stream):
            for u in stream:
                seen.append(({k: v.clone() for k, v in u.ema_state.items()}, u.num_samples))
                yield u
        aggregate(record(updates))
    algo.server.aggregate = recording
    algo.fit()
    total = sum(n for _, n in seen)
    for key, value in algo.ema_eval_state.items():
        torch.testing.assert_close(value, sum(state[key] * n for state, n in seen) / total)
    assert not torch.equal(algo.ema_eval_state["net.1.weight"], algo.server.global_state["net.1.weight"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="mixed precision runs on CUDA only")
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_on_cuda_trains_and_resumes(amp, compose_cfg, tmp_path):
    settings = [*SMALL, "device=cuda", f"client.amp={amp}", "client.grad_clip=1.0"]
    straight = build_algo(compose_cfg, tmp_path / "straight", *settings)
    assert (straight.setup.scaler is not None) == (amp == "fp16")
    results = straight.fit()
    assert math.isfinite(results["final_test_loss"])
    resumed = resume(interrupted(compose_cfg, tmp_path / "cut", settings, 2))
    resumed.fit()
    # CUDA kernels need not be bitwise reproducible: equal up to float tolerance
    for k, v in straight.server.global_state.items():
        torch.testing.assert_close(resumed.server.global_state[k], v)


def test_num_rounds_cannot_change_under_a_decaying_continuous_schedule(compose_cfg, tmp_path):
    first = build_algo(compose_cfg, tmp_path, *SMALL, "num_rounds=2", "schedule=cosine")
    first.fit()
    longer = build_algo(compose_cfg, tmp_path, *SMALL, "num_rounds=3", "schedule=cosine")
    with pytest.raises(UserError, match="num_rounds: checkpoint 2, now 3"):
        longer.load_state_dict(load_torch(tmp_path / "resume.pt"))
    restarting = build_algo(compose_cfg, tmp_path, *SMALL, "num_rounds=3", "schedule=cosine", "schedule.continuous=false")
    with pytest.raises(UserError, match="schedule.continuous"):  # other settings are still compared
        restarting.load_state_dict(load_torch(tmp_path / "resume.pt"))

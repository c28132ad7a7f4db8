"""Why persisted Adam state does not pay in the playbook presets: an isolated A/B inside one round.

The trajectory is the playbook/persist_optimizer preset as train.py builds it (FedAvg, AdamW with
the LR schedule continuous across rounds, each client's moments and step count persisted). In every
round after the first, each client trains twice from the same global weights, on the same batches
(one generator per round and client) and at the same learning rates:

  restored  its persisted AdamW state loaded, as the preset does (this arm continues the run);
  fresh     a new AdamW, as the continuous_lr preset does.

Measured per local step k: the training loss of the batch (before the step), the loss of a fixed
probe of the client's own data (1000 un-augmented samples) after k steps, the size of the step
||w_k - w_{k-1}||, and sqrt(v_hat), the per-weight denominator Adam divides by, compared between the
arms. Per round: the cosine between the momentum a restored client carries in and its first
gradient, and the test loss and accuracy of the FedAvg mean of each arm's clients (the same start,
one round apart). The playbook's claim is a "10-15 step warm-up tax" per rebuilt optimizer.

    .venv/bin/python benchmarks/persist_optimizer_ab.py [--seeds 0 1 2] [--rounds 10] [--partial]
        [--out results/benchmarks/persist_optimizer] [--summarise]

--partial measures the 4-of-10 setting (experiments/playbook_partial.yaml) instead of 4-of-4.
Writes raw_seed<S>.json (every number) per seed as it finishes and summary.md (the tables, over
every seed measured in the folder so far) under --out/full or --out/partial, and prints the tables.
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from src.algo import FedAvg  # noqa: E402
from src.config import validate  # noqa: E402
from src.server.fedavg import WeightedMean  # noqa: E402

PROBE_SAMPLES = 1000
PROBE_STEPS = (0, 1, 2, 5, 10, 15, 20, 30, 40, 60, 80, 100, 120)   # probe loss after k local steps
V_STEPS = (1, 2, 5, 10, 20, 40, 80, 120)                          # sqrt(v_hat) compared after k steps
WINDOWS = ((1, 5), (6, 10), (11, 15), (16, 20), (21, 40), (41, 80), (81, 120))


def build(seed: int, partial: bool, run_dir: Path) -> FedAvg:
    overrides = ["experiment=playbook/persist_optimizer", f"seed={seed}", "device=cpu", "logger.mode=disabled"]
    if partial:
        overrides += ["clients.total=10", "clients.per_round=0.4"]
    with initialize_config_dir(config_dir=str(ROOT / "config"), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    validate(cfg)
    return FedAvg(cfg=cfg, run_dir=run_dir, server=cfg.algo.server)


class Probe:
    """Watches one client round through hooks on the loss and the optimizer, so the training itself
    is Client.client_update unchanged."""

    def __init__(self, algo: FedAvg):
        self.algo = algo
        self.setup = algo.setup
        self.loss_fn, self.make_optimizer = self.setup.loss_fn, self.setup.optimizer
        self.setup.loss_fn = _Recording(self.loss_fn, self)
        self.setup.optimizer = self._optimizer

    def start(self, client) -> None:
        idx = client.indices[:PROBE_SAMPLES]
        self.probe_x, self.probe_y = self.setup.data.x[idx], self.setup.data.y[idx]
        self.batch_loss, self.step_norm, self.lr, self.probe_loss, self.sqrt_v = [], [], [], {}, {}
        self.carried_cos = None
        self.steps = 0

    def _optimizer(self, params):
        opt = self.make_optimizer(params)
        opt.register_step_pre_hook(self._before_step)
        opt.register_step_post_hook(self._after_step)
        return opt

    @torch.no_grad()
    def _probe(self) -> float:
        model = self.setup.model
        model.eval()
        loss = self.loss_fn(model(self.probe_x), self.probe_y).item()
        model.train()
        return loss

    @torch.no_grad()
    def _before_step(self, opt, args, kwargs) -> None:
        if self.steps == 0:
            self.probe_loss[0] = self._probe()
            params = self.setup.params
            carried = [opt.state[p]["exp_avg"] for p in params if "exp_avg" in opt.state[p]]
            if carried:   # the momentum a restored client brings in, against its first gradient
                m = torch.cat([c.flatten() for c in carried])
                g = torch.cat([p.grad.flatten() for p in params])
                self.carried_cos = torch.nn.functional.cosine_similarity(m, g, dim=0).item()
        self.before = [p.detach().clone() for p in self.setup.params]
        self.lr.append(opt.param_groups[0]["lr"])

    @torch.no_grad()
    def _after_step(self, opt, args, kwargs) -> None:
        self.steps += 1
        k = self.steps
        delta = torch._foreach_sub(self.setup.params, self.before)
        self.step_norm.append(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(delta))).item())
        if k in PROBE_STEPS:
            self.probe_loss[k] = self._probe()
        if k in V_STEPS:
            beta2 = opt.param_groups[0]["betas"][1]
            v = []
            for p in self.setup.params:
                st = opt.state[p]
                v.append((st["exp_avg_sq"] / (1 - beta2 ** float(st["step"]))).sqrt().flatten())
            self.sqrt_v[k] = torch.cat(v)


class _Recording(nn.Module):
    def __init__(self, loss_fn: nn.Module, probe: Probe):
        super().__init__()
        self.loss_fn, self.probe = loss_fn, probe

    def forward(self, out, y):
        loss = self.loss_fn(out, y)
        self.probe.batch_loss.append(loss.item())
        return loss


def arm(probe: Probe, client, round_idx: int, restored: bool) -> dict:
    """Train `client` once from the weights the server sends; the fresh arm neither reads nor
    writes the client's persisted state."""
    algo, setup = probe.algo, probe.setup
    setup.persist_optimizer = restored
    probe.start(client)
    client.receive_data(algo.server.send_data())
    client.client_update(round_idx)
    update = client.send_data()
    setup.persist_optimizer = True
    state = {k: v.detach().clone() for k, v in update.state.items()}
    return {"state": state, "weight": algo.server.client_weight(update), "batch_loss": probe.batch_loss,
            "probe_loss": probe.probe_loss, "step_norm": probe.step_norm, "lr": probe.lr,
            "sqrt_v": probe.sqrt_v, "carried_cos": probe.carried_cos, "update": update}


def run_seed(seed: int, rounds: int, partial: bool) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        algo = build(seed, partial, Path(tmp))
        probe = Probe(algo)
        records = []
        for r in range(rounds):
            start = time.perf_counter()
            clients = algo.select_clients(r)
            fresh_mean = WeightedMean(algo.server.global_state)
            rows = []

            def updates():
                for client in clients:
                    has_state = "optimizer" in algo.setup.store.get(client.client_id)
                    if has_state:
                        f = arm(probe, client, r, restored=False)
                        fresh_mean.add(f["state"], f["weight"])
                    a = arm(probe, client, r, restored=True)
                    if has_state:
                        assert a["lr"] == f["lr"], "the arms must train at the same learning rates"
                        assert a["batch_loss"][0] == f["batch_loss"][0], "the arms must start alike"
                        rows.append(compare(seed, r, client.client_id, f, a))
                    else:
                        fresh_mean.add(a["state"], a["weight"])   # a first visit: both arms are fresh
                    yield a["update"]

            algo.server.aggregate(updates())
            algo.setup.store.commit()
            restored_eval = algo.evaluate(algo.server.global_state)
            fresh_eval = algo.evaluate(fresh_mean.result())
            records.append({"seed": seed, "round": r + 1, "clients": rows, "restored": restored_eval,
                            "fresh": fresh_eval})
            print(f"seed {seed} round {r + 1}: {len(rows)} clients compared; test acc restored "
                  f"{100 * restored_eval['test_accuracy']:.2f}% fresh {100 * fresh_eval['test_accuracy']:.2f}%  "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
        return records


def compare(seed, round_idx, client_id, fresh: dict, restored: dict) -> dict:
    # string keys, as JSON stores them
    ratio = {str(k): (fresh["sqrt_v"][k] / restored["sqrt_v"][k].clamp_min(1e-12)).median().item() for k in V_STEPS}
    rel = {str(k): ((fresh["sqrt_v"][k] - restored["sqrt_v"][k]).norm() / restored["sqrt_v"][k].norm()).item()
           for k in V_STEPS}
    last, arms = V_STEPS[-1], (("fresh", fresh), ("restored", restored))
    settle = {name: {str(k): ((a["sqrt_v"][k] - a["sqrt_v"][last]).norm() / a["sqrt_v"][last].norm()).item()
                     for k in V_STEPS} for name, a in arms}
    return {"seed": seed, "round": round_idx + 1, "client": client_id,
            "batch_loss": {"fresh": fresh["batch_loss"], "restored": restored["batch_loss"]},
            "probe_loss": {name: {str(k): v for k, v in a["probe_loss"].items()} for name, a in arms},
            "step_norm": {"fresh": fresh["step_norm"], "restored": restored["step_norm"]},
            "sqrt_v_median_ratio_fresh_over_restored": ratio, "sqrt_v_relative_distance": rel,
            "sqrt_v_distance_to_round_end": settle,
            "carried_momentum_cos_first_grad": restored["carried_cos"], "lr_first": restored["lr"][0]}


def mean_sd(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:+.4f}" if values else "—"
    return f"{statistics.mean(values):+.4f} ± {statistics.stdev(values) / len(values) ** 0.5:.4f}"


def summarise(records: list[dict], setting: str) -> str:
    rows = [c for rec in records for c in rec["clients"]]
    n = len(rows)
    lines = [f"## {setting}: {n} client rounds compared "
             f"(seeds {sorted({r['seed'] for r in records})}, rounds 2-{max(r['round'] for r in records)})", "",
             "Differences are fresh minus restored (positive: the fresh optimizer is worse), mean ± standard "
             "error over the client rounds.", "",
             "| local steps | batch loss, fresh − restored | step size, fresh / restored |", "|---|---|---|"]
    for lo, hi in WINDOWS:
        d = [statistics.mean(c["batch_loss"]["fresh"][lo - 1:hi]) - statistics.mean(c["batch_loss"]["restored"][lo - 1:hi])
             for c in rows]
        s = [statistics.mean(c["step_norm"]["fresh"][lo - 1:hi]) / statistics.mean(c["step_norm"]["restored"][lo - 1:hi])
             for c in rows]
        lines.append(f"| {lo}-{hi} | {mean_sd(d)} | {statistics.mean(s):.2f} |")
    total = [statistics.mean(c["batch_loss"]["fresh"]) - statistics.mean(c["batch_loss"]["restored"]) for c in rows]
    lines.append(f"| all 120 | {mean_sd(total)} | |")
    lines += ["", "| after k steps | probe loss, fresh | restored | fresh − restored |", "|---|---|---|---|"]
    for k in PROBE_STEPS:
        f = [c["probe_loss"]["fresh"][str(k)] for c in rows]
        a = [c["probe_loss"]["restored"][str(k)] for c in rows]
        lines.append(f"| {k} | {statistics.mean(f):.4f} | {statistics.mean(a):.4f} | "
                     f"{mean_sd([x - y for x, y in zip(f, a)])} |")
    lines += ["", "sqrt(v̂) is Adam's per-weight denominator; d(a, b) = ‖a − b‖ / ‖b‖ over all weights, "
                  "v̂₁₂₀ the arm's own value at the round's last step.", "",
              "| after k steps | median sqrt(v̂) fresh / restored | d(fresh, restored) | d(fresh, fresh v̂₁₂₀) "
              "| d(restored, restored v̂₁₂₀) |", "|---|---|---|---|---|"]
    for k in V_STEPS:
        ratio = [c["sqrt_v_median_ratio_fresh_over_restored"][str(k)] for c in rows]
        rel = [c["sqrt_v_relative_distance"][str(k)] for c in rows]
        own = [statistics.mean(c["sqrt_v_distance_to_round_end"][a][str(k)] for c in rows) for a in ("fresh", "restored")]
        lines.append(f"| {k} | {statistics.mean(ratio):.3f} | {statistics.mean(rel):.3f} | {own[0]:.3f} | {own[1]:.3f} |")
    cos = [c["carried_momentum_cos_first_grad"] for c in rows]
    lines += ["", f"Cosine between the momentum a restored client carries in and its first gradient: "
                  f"mean {statistics.mean(cos):+.3f} (min {min(cos):+.3f}, max {max(cos):+.3f}).", "",
              "Per round: the FedAvg mean of each arm's clients on the test set (both from the same global model), "
              "and over the round's client rounds the batch-loss difference (fresh − restored), the step-size "
              "ratio and Adam's denominator ratio at the round's end.", "",
              "| round | LR at round start | test acc restored (%) | fresh (%) | test loss restored | fresh "
              "| batch loss diff, steps 1-20 | steps 21-120 | step size fresh / restored | median sqrt(v̂₁₂₀) fresh / restored |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for rnd in sorted({r["round"] for r in records}):
        rs = [r for r in records if r["round"] == rnd and r["clients"]]
        if not rs:
            continue
        cell = lambda arm, key, scale: statistics.mean(scale * r[arm][key] for r in rs)  # noqa: E731
        cs = [c for r in rs for c in r["clients"]]
        early = [statistics.mean(c["batch_loss"]["fresh"][:20]) - statistics.mean(c["batch_loss"]["restored"][:20]) for c in cs]
        late = [statistics.mean(c["batch_loss"]["fresh"][20:]) - statistics.mean(c["batch_loss"]["restored"][20:]) for c in cs]
        step = statistics.mean(sum(c["step_norm"]["fresh"]) / sum(c["step_norm"]["restored"]) for c in cs)
        v = statistics.mean(c["sqrt_v_median_ratio_fresh_over_restored"][str(V_STEPS[-1])] for c in cs)
        lr = statistics.mean(c["lr_first"] for c in cs)
        lines.append(f"| {rnd} | {lr:.1e} | {cell('restored', 'test_accuracy', 100):.2f} | {cell('fresh', 'test_accuracy', 100):.2f} | "
                     f"{cell('restored', 'test_loss', 1):.4f} | {cell('fresh', 'test_loss', 1):.4f} | "
                     f"{mean_sd(early)} | {mean_sd(late)} | {step:.2f} | {v:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=10, help="rounds to run (of the preset's 10: the LR horizon stays)")
    p.add_argument("--partial", action="store_true", help="10 clients, 4 per round, instead of 4 of 4")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N)")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "benchmarks" / "persist_optimizer")
    p.add_argument("--summarise", action="store_true", help="only summarise the seeds already measured in --out")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    setting = "4 of 10 clients per round" if args.partial else "4 of 4 clients per round"
    out = args.out / ("partial" if args.partial else "full")
    out.mkdir(parents=True, exist_ok=True)
    if not args.summarise:
        for seed in args.seeds:   # one file per seed, written as soon as it is measured
            (out / f"raw_seed{seed}.json").write_text(json.dumps(run_seed(seed, args.rounds, args.partial)))
    records = [rec for f in sorted(out.glob("raw_seed*.json")) for rec in json.loads(f.read_text())]
    if not records:
        raise SystemExit(f"nothing measured in {out}: run without --summarise first")
    text = summarise(records, setting)
    print(text)
    (out / "summary.md").write_text(text)
    print(f"written: {out / 'summary.md'} (from {', '.join(f.name for f in sorted(out.glob('raw_seed*.json')))})")


if __name__ == "__main__":
    main()

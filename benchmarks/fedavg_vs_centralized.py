"""FedAvg's round loop versus plain centralized training, timed in one process.

(a) FedAvg as train.py builds it (config composed by Hydra, FedAvg controller, FedAvgServer,
    Client, TrainSetup): R rounds of 50 clients (all selected) x 5 local SGD steps at batch 10 on
    3x32x32 inputs (dataset=random) with the LeNet-style CNN at FedSeq's width (64 channels); no evaluation.
(b) A bare torch loop: the same number of SGD steps with the same model and batch size, batches
    drawn by indexing the same on-device tensor with randperm.

Both do the same arithmetic per step, so the ratio (a)/(b) is the framework's overhead per client
(state loading, optimizer construction, generator seeding, aggregation). Target: <= 1.10 on a
2-core CPU. Runs alternate; the median of --repeats is reported.

    python benchmarks/fedavg_vs_centralized.py [--device cpu|cuda|auto] [--rounds 4] [--repeats 3]
"""
import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from src.algo import FedAvg  # noqa: E402
from src.config import validate  # noqa: E402
from timing import timed  # noqa: E402  (benchmarks/timing.py, beside this script)

CLIENTS, LOCAL_STEPS, BATCH = 50, 5, 10


def build_fedavg(device: str, run_dir: Path) -> FedAvg:
    overrides = ["algo=fedavg", "dataset=random", "model=lenet", "model.channels=64", "partition=iid", f"device={device}",
                 f"clients.total={CLIENTS}", "clients.per_round=1.0", f"client.batch_size={BATCH}",
                 "client.local_epochs=null", f"client.local_steps={LOCAL_STEPS}", "optimizer.lr=0.01"]
    with initialize_config_dir(config_dir=str(ROOT / "config"), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    validate(cfg)
    return FedAvg(cfg=cfg, run_dir=run_dir, server=cfg.algo.server)


def fedavg_rounds(algo: FedAvg, rounds: int) -> None:
    for _ in range(rounds):
        algo.train_step()
        algo.round += 1


def centralized_steps(model, optimizer, x, y, steps: int, gen: torch.Generator) -> None:
    model.train()
    done = 0
    while done < steps:
        for idx in torch.randperm(y.shape[0], device=y.device, generator=gen).split(BATCH):
            if done == steps:
                return
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done += 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N) (1 is steadier on a busy machine)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        fed = build_fedavg(args.device, Path(tmp))
    device = fed.device
    torch.manual_seed(0)
    model = type(fed.model)(in_shape=list(fed.data.in_shape), num_classes=fed.spec.num_classes).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator(device=device).manual_seed(0)
    x, y = fed.data.train.x, fed.data.train.y
    steps = args.rounds * CLIENTS * LOCAL_STEPS
    print(f"torch {torch.__version__} on {device}, {torch.get_num_threads()} threads; "
          f"{args.rounds} rounds x {CLIENTS} clients x {LOCAL_STEPS} steps at batch {BATCH} = {steps} steps")

    fedavg_rounds(fed, 1)  # warm-up both
    centralized_steps(model, optimizer, x, y, CLIENTS * LOCAL_STEPS, gen)
    t_fed, t_cen = [], []
    for r in range(args.repeats):
        t_fed.append(timed(lambda: fedavg_rounds(fed, args.rounds), device))
        t_cen.append(timed(lambda: centralized_steps(model, optimizer, x, y, steps, gen), device))
        print(f"repeat {r + 1}: fedavg {t_fed[-1]:.3f} s  centralized {t_cen[-1]:.3f} s  "
              f"ratio {t_fed[-1] / t_cen[-1]:.3f}")
    fed_s, cen_s = statistics.median(t_fed), statistics.median(t_cen)
    print(f"fedavg {1e3 * fed_s / steps:.3f} ms/step, centralized {1e3 * cen_s / steps:.3f} ms/step")
    print(f"ratio fedavg/centralized = {fed_s / cen_s:.3f}  (target <= 1.10)")


if __name__ == "__main__":
    main()

"""The cross-device shape of pfl-research's CIFAR-10 benchmark, per round, on each engine and against a
plain centralized loop of the same steps, timed side by side in one process.

1,000 clients x 50 samples of 3x32x32 (dataset=random: noise, nothing to learn), 50 clients a round,
1 epoch at batch 10 (5 steps a client, 250 a round), FedAvg with plain SGD and the LeNet-style CNN
(model.channels, 32 by default). Each engine is a FedAvg built as train.py builds it, with the
engine's overrides (ENGINES: add one there, e.g. a distributed engine, to time it too); the
centralized loop takes the round's 250 steps with the same model and batch size on the same
on-device tensor (benchmarks/fedavg_vs_centralized.py's loop). Runs alternate; medians of --repeats
are reported as seconds per round and as ratios to centralized.

    python benchmarks/cross_device.py [--device cpu|cuda] [--engines sequential vmap] [--width W] [--rounds 2]
                                      [--repeats 3]
"""
import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from src.algo import FedAvg  # noqa: E402
from fedavg_vs_centralized import BATCH, centralized_steps, fedavg_rounds  # noqa: E402  (beside this script)
from timing import build_fedavg, timed  # noqa: E402

CLIENTS, SAMPLES, COHORT, EPOCHS = 1000, 50, 50, 1
ENGINES = {"sequential": ["engine=sequential"], "vmap": ["engine=vmap"]}  # name -> its overrides


def build(device: str, engine: list[str], channels: int, run_dir: Path) -> FedAvg:
    overrides = ["algo=fedavg", "dataset=random", f"dataset.train_size={CLIENTS * SAMPLES}", "model=lenet",
                 f"model.channels={channels}", "partition=iid", f"device={device}", f"clients.total={CLIENTS}",
                 f"clients.num_per_round={COHORT}", f"client.batch_size={BATCH}", f"client.local_epochs={EPOCHS}",
                 "optimizer.lr=0.01", *engine]
    return build_fedavg(overrides, run_dir)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--width", type=int, default=None, help="engine.width for vmap (default: its own rule)")
    p.add_argument("--rounds", type=int, default=2, help="rounds per timed run")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        width = [f"engine.width={args.width}"] if args.width else []
        algos = {name: build(args.device, ENGINES[name] + (width if name == "vmap" else []), args.channels,
                             Path(tmp) / name) for name in args.engines}
        first = next(iter(algos.values()))
        device, steps = first.device, COHORT * EPOCHS * -(-SAMPLES // BATCH)
        torch.manual_seed(0)
        model = type(first.model)(in_shape=list(first.data.in_shape), num_classes=first.spec.num_classes,
                                  channels=args.channels).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        gen = torch.Generator(device=device).manual_seed(0)
        x, y = first.data.train.x, first.data.train.y

        def central():
            for _ in range(args.rounds):
                centralized_steps(model, optimizer, x, y, steps, gen)

        print(f"torch {torch.__version__} on {device}, {torch.get_num_threads()} threads; {CLIENTS} clients x "
              f"{SAMPLES} samples, {COHORT} a round, batch {BATCH}, {steps} steps a round, LeNet "
              f"{args.channels} channels")
        runs = {name: (lambda a=a: fedavg_rounds(a, args.rounds)) for name, a in algos.items()}
        runs["centralized"] = central
        for run in runs.values():  # warm-up
            run()
        times = {name: [] for name in runs}
        for r in range(args.repeats):
            for name, run in runs.items():
                times[name].append(timed(run, device) / args.rounds)
            print(f"repeat {r + 1}: " + "  ".join(f"{n} {t[-1]:.3f} s/round" for n, t in times.items()))
    base = statistics.median(times["centralized"])
    for name, t in times.items():
        print(f"{name:>12}: {statistics.median(t):.3f} s/round, {statistics.median(t) / base:.2f}x centralized")
    if "sequential" in times and "vmap" in times:
        speedup = statistics.median(times["sequential"]) / statistics.median(times["vmap"])
        print(f"vmap speed-up over sequential: {speedup:.2f}x (GPU target: >= 10x)")


if __name__ == "__main__":
    main()

"""engine=distributed against engine=sequential on benchmarks/cross_device.py's shape (1,000 clients x 50
samples of 3x32x32, 50 a round, 5 steps a client, the LeNet-style CNN): seconds per round of train.py
runs, one with engine=sequential and one launched by torchrun per --procs, alternating, medians of
--repeats. A round's time is metrics.jsonl's round_time_s (rank 0's: training, the gather, the
aggregation), rounds 2 to R-1 (the first warms up, the last evaluates). Every run's final model must
be the sequential run's bit for bit; the script says so.

    python benchmarks/distributed_cost.py [--device cpu|cuda] [--procs 1 2] [--rounds 5] [--repeats 3]

On a CPU the processes share its cores: run it on a quiet machine with at least as many cores as the
largest --procs (each process gets OMP_NUM_THREADS=1, and so does the sequential run)."""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cross_device import CLIENTS, COHORT, EPOCHS, SAMPLES  # noqa: E402  (beside this script)
from fedavg_vs_centralized import BATCH  # noqa: E402


def shape(device: str, rounds: int, channels: int) -> list[str]:
    return ["algo=fedavg", "dataset=random", f"dataset.train_size={CLIENTS * SAMPLES}", "model=lenet",
            f"model.channels={channels}", "partition=iid", f"device={device}", f"clients.total={CLIENTS}",
            f"clients.num_per_round={COHORT}", f"client.batch_size={BATCH}", f"client.local_epochs={EPOCHS}",
            "optimizer.lr=0.01", f"num_rounds={rounds}", f"eval_every={rounds}"]


def timed_run(run_dir: Path, procs: int, overrides: list[str]) -> float:
    """Median seconds per round of one run (procs 0: engine=sequential in one process)."""
    launcher = [sys.executable, "train.py"] if not procs else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", "train.py",
        "engine=distributed"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    subprocess.run([*launcher, f"hydra.run.dir={run_dir}", *overrides], cwd=ROOT, env=env, check=True,
                   capture_output=True)
    times = [json.loads(line)["round_time_s"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(times[1:-1])


def same_model(a: Path, b: Path) -> bool:
    fa, fb = (torch.load(d / "FINAL_MODEL.pt", weights_only=True) for d in (a, b))
    return all(torch.equal(fa[k], fb[k]) for k in fa)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5, help="rounds per run (>= 3)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    overrides = shape(args.device, args.rounds, args.channels)
    seconds: dict[int, list[float]] = {n: [] for n in [0, *args.procs]}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for n in seconds:  # alternating: a slower moment of the machine falls on every variant alike
                run_dir = Path(tmp) / f"{n}_{repeat}"
                seconds[n].append(timed_run(run_dir, n, overrides))
                if n:
                    assert same_model(Path(tmp) / f"0_{repeat}", run_dir), f"{n} processes: not the sequential model"
    base = statistics.median(seconds[0])
    steps = EPOCHS * -(-SAMPLES // BATCH)
    print(f"{args.device}, {COHORT} clients x {steps} steps a round, medians of {args.repeats}; every final model "
          "equals the sequential one bit for bit")
    for n, values in seconds.items():
        name = "sequential" if not n else f"distributed, {n} process{'es' if n > 1 else ''}"
        median = statistics.median(values)
        print(f"  {name:28s} {median:7.3f} s/round   sequential / this: {base / median:5.2f}")


if __name__ == "__main__":
    main()

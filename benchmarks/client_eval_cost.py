"""Per-client evaluation versus one pooled test evaluation, timed side by side in one process.

The default experiment's federation (Fashion-MNIST, LeNet-style CNN, 100 clients, Dirichlet(0.5))
with clients.test_fraction held out of every client: (a) the global model on the pooled test set
(10,000 images), as every evaluated round does; (b) the same model on every client's own held-out
images, per-client sums by index arithmetic (src/evaluation.py). Reported: seconds for each
(median of --repeats, alternating) and the ratio (b)/(a), beside the ratio of their sample counts.

    python benchmarks/client_eval_cost.py [--test-fraction 0.15] [--device cpu|cuda|auto] [--repeats 5]
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
from timing import build_fedavg, timed  # noqa: E402  (benchmarks/timing.py, beside this script)


def build(device: str, test_fraction: float, run_dir: Path) -> FedAvg:
    overrides = [f"device={device}", f"clients.test_fraction={test_fraction}", "logger.mode=disabled"]
    return build_fedavg(overrides, run_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--test-fraction", type=float, default=0.15)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        algo = build(args.device, args.test_fraction, Path(tmp))
        state = algo.server.global_state
        pooled = lambda: algo.evaluate(state)  # noqa: E731
        per_client = lambda: algo.client_evaluation(state, 0)  # noqa: E731
        pooled(), per_client()  # warm-up
        times = {"pooled": [], "per_client": []}
        for _ in range(args.repeats):
            times["pooled"].append(timed(pooled, algo.device))
            times["per_client"].append(timed(per_client, algo.device))
    a, b = statistics.median(times["pooled"]), statistics.median(times["per_client"])
    held_out = len(algo.client_evaluation.held_out)
    print(f"device {algo.device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"pooled test evaluation:   {a:.3f} s  ({len(algo.data.test)} images)")
    print(f"per-client evaluation:    {b:.3f} s  ({held_out} held-out images of {len(algo.client_evaluation.evaluated)} "
          f"clients, clients.test_fraction={args.test_fraction})")
    print(f"ratio per-client / pooled: {b / a:.2f}  (sample ratio {held_out / len(algo.data.test):.2f})")


if __name__ == "__main__":
    main()

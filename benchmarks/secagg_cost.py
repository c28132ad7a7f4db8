"""Secure aggregation's extra time per round against plain FedAvg aggregation (uniform weights).

The default model (LeNet-style CNN, model.channels=32, Fashion-MNIST shapes); n client updates of
G + N(0, 0.01^2) are aggregated by FairAvg's server, (a) plainly, (b) through src/secagg.py (every
client's masking, the key agreement and Shamir sharing, the server's unmasking), with and without
dropouts after masking. Reported: seconds per round (median of --repeats) for each n.

    python benchmarks/secagg_cost.py [--clients 10 50 100] [--device cpu|cuda|auto] [--repeats 3]
"""
import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from src.client.client import ClientUpdate  # noqa: E402
from src.models import LeNet  # noqa: E402
from src.secagg import SecureAggregation  # noqa: E402
from src.server import FedAvgServer  # noqa: E402
from timing import timed  # noqa: E402  (benchmarks/timing.py, beside this script)


def server_for(state, secagg: SecureAggregation = None) -> FedAvgServer:
    server = FedAvgServer(weighting="uniform")
    server.set_global_state(state)
    if secagg is not None:
        secagg.server, secagg.round, secagg.num_clients = server, lambda: 0, 1000
        server.intercept = secagg.aggregate
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    state = {k: v.to(device) for k, v in LeNet([1, 28, 28], 10, channels=32).state_dict().items()}
    size = sum(v.numel() for v in state.values() if v.is_floating_point())
    print(f"model: {size} floating-point coordinates; device {device}")
    print("clients | plain s | secagg s | secagg, 10%+10% dropouts s")
    for n in args.clients:
        gen = torch.Generator(device=device).manual_seed(n)
        updates = [ClientUpdate({k: v + 0.01 * torch.randn(v.shape, generator=gen, device=device)
                                 for k, v in state.items()}, 1, torch.zeros((), device=device), 1, sender=i)
                   for i in range(n)]
        kinds = {"plain": None,
                 "secagg": SecureAggregation(0, None, 16, 8.0, 0.0, 0.0),
                 "dropouts": SecureAggregation(0, None, 16, 8.0, 0.1, 0.1)}
        times = {}
        for kind, secagg in kinds.items():
            runs = []
            for _ in range(args.repeats):
                server = server_for(state, secagg)
                runs.append(timed(lambda: server.aggregate(iter(updates)), device))
            times[kind] = statistics.median(runs)
        print(f"{n:7d} | {times['plain']:7.3f} | {times['secagg']:8.2f} | {times['dropouts']:8.2f}", flush=True)


if __name__ == "__main__":
    main()

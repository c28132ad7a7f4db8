"""FedAvg round-loop overhead versus plain centralized training, in one process.

What is measured (wall-clock, median over --repeats alternating runs, after warm-up):

  (a) FedAvg through the framework's real code path: a DeviceDataset of random 3x32x32 inputs
      (10 classes), one shared TrainSetup (LeNet, CrossEntropy, partial SGD lr=0.01,
      local_steps=5, batch_size=10), 50 Client objects holding index tensors, and a FedAvgServer.
      Each of --rounds rounds trains every client: receive_data(server.send_data()),
      client_update(round), send_data(), fed lazily to server.aggregate(generator) -- the call
      sequence of FedBase.client_updates + FedAvg.train_step (no evaluation, no logging).
  (b) Centralized training of the same number of SGD steps (rounds * clients * local_steps) with
      the same model class and batch size: a bare torch loop over torch.randperm-based index
      batches of the same data tensor: forward, cross-entropy, zero_grad, backward, step.

Both do the same arithmetic per SGD step, so the ratio (a)/(b) is the framework's per-client
overhead (state loading, optimizer construction, generator seeding, loss bookkeeping,
aggregation). Target: ratio fedavg/centralized <= 1.10 on a 2-core CPU with the defaults.

    python benchmarks/fedavg_vs_centralized.py [--device cpu|cuda|auto] [--rounds 5] [--repeats 3]
"""
import argparse
import functools
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from src.algo.fedbase import resolve_device  # noqa: E402
from src.client.client import Client, TrainSetup  # noqa: E402
from src.data.device_data import DeviceDataset  # noqa: E402
from src.losses import CrossEntropy  # noqa: E402
from src.models import LeNet  # noqa: E402
from src.server import FedAvgServer  # noqa: E402

IN_SHAPE = [3, 32, 32]
NUM_CLASSES = 10


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_data(num_samples: int, device: torch.device, seed: int) -> DeviceDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, *IN_SHAPE, generator=g)
    y = torch.randint(0, NUM_CLASSES, (num_samples,), generator=g)
    return DeviceDataset(x.to(device), y.to(device), NUM_CLASSES)  # no crop, no flip


class FedAvgBench:
    """The pieces FedBase builds, constructed directly (no Hydra), and its round loop."""

    def __init__(self, data: DeviceDataset, args, device: torch.device):
        torch.manual_seed(args.seed)
        self.device = device
        self.model = LeNet(in_shape=IN_SHAPE, num_classes=NUM_CLASSES).to(device)
        self.setup = TrainSetup(
            model=self.model,
            data=data,
            loss_fn=CrossEntropy(),
            optimizer=functools.partial(torch.optim.SGD, lr=args.lr),
            batch_size=args.batch_size,
            local_epochs=None,
            local_steps=args.local_steps,
            amp_dtype=None,
            seed=args.seed,
        )
        n = args.samples_per_client
        self.clients = [Client(i, torch.arange(i * n, (i + 1) * n, device=device), self.setup)
                        for i in range(args.clients)]
        self.server = FedAvgServer()
        self.server.set_global_state(self.model.state_dict())
        self.round = 0
        self.train_loss = torch.zeros((), device=device)
        self.train_seen = 0

    def client_updates(self, clients):  # FedBase.client_updates, minus the stop-signal check
        for client in clients:
            client.receive_data(self.server.send_data())
            client.client_update(self.round)
            update = client.send_data()
            self.train_loss += update.loss_sum
            self.train_seen += update.samples_seen
            yield update

    def run(self, rounds: int, num_clients: int | None = None) -> None:
        selected = self.clients[:num_clients]  # all of them unless warming up
        for _ in range(rounds):
            self.train_loss.zero_()
            self.train_seen = 0
            self.server.aggregate(self.client_updates(selected))  # FedAvg.train_step
            self.round += 1


class CentralizedBench:
    def __init__(self, data: DeviceDataset, args, device: torch.device):
        torch.manual_seed(args.seed)
        self.x, self.y = data.x, data.y
        self.model = LeNet(in_shape=IN_SHAPE, num_classes=NUM_CLASSES).to(device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=args.lr)
        self.batch_size = args.batch_size
        self.gen = torch.Generator(device=device).manual_seed(args.seed)

    def run(self, steps: int) -> None:
        model, opt, x, y = self.model, self.optimizer, self.x, self.y
        model.train()
        n = y.shape[0]
        done = 0
        while done < steps:
            for idx in torch.randperm(n, device=x.device, generator=self.gen).split(self.batch_size):
                if done == steps:
                    return
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                done += 1


def timed(fn, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--samples-per-client", type=int, default=50)
    p.add_argument("--local-steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--warmup-clients", type=int, default=5, help="one FedAvg round of this many clients "
                   "(and the same number of centralized steps) run before timing")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N); unset leaves the default")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    device = resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    steps = args.rounds * args.clients * args.local_steps
    print(f"torch {torch.__version__}  device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
          + f"  threads {torch.get_num_threads()}  cpus {os.cpu_count()}")
    print(f"model LeNet{tuple(IN_SHAPE)} -> {NUM_CLASSES}  batch {args.batch_size}  SGD lr {args.lr}")
    print(f"(a) FedAvg: {args.rounds} rounds x {args.clients} clients (all selected) x {args.local_steps} "
          f"local steps, {args.samples_per_client} samples/client")
    print(f"(b) centralized: {steps} steps on the same {args.clients * args.samples_per_client} samples")
    print(f"repeats {args.repeats} (alternating), warm-up {args.warmup_clients * args.local_steps} steps each")

    data = make_data(args.clients * args.samples_per_client, device, args.seed)
    fed = FedAvgBench(data, args, device)
    cen = CentralizedBench(data, args, device)

    # warm-up: allocator, kernels, autograd graph caches
    if args.warmup_clients:
        timed(lambda: fed.run(1, args.warmup_clients), device)
        timed(lambda: cen.run(args.warmup_clients * args.local_steps), device)

    t_fed, t_cen = [], []
    for r in range(args.repeats):
        t_fed.append(timed(lambda: fed.run(args.rounds), device))
        t_cen.append(timed(lambda: cen.run(steps), device))
        print(f"repeat {r + 1}: fedavg {t_fed[-1]:.3f} s  centralized {t_cen[-1]:.3f} s  "
              f"ratio {t_fed[-1] / t_cen[-1]:.3f}")

    med_fed, med_cen = statistics.median(t_fed), statistics.median(t_cen)
    print(f"fedavg       median {med_fed:.3f} s  ({1e3 * med_fed / steps:.3f} ms/step)")
    print(f"centralized  median {med_cen:.3f} s  ({1e3 * med_cen / steps:.3f} ms/step)")
    print(f"ratio fedavg/centralized = {med_fed / med_cen:.2f}  (target <= 1.10 on a 2-core CPU)")
    # sanity: the FedAvg run actually trained something finite
    assert torch.isfinite(fed.train_loss).item()
    assert fed.train_seen == args.clients * args.local_steps * args.batch_size


if __name__ == "__main__":
    main()

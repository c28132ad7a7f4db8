"""What a checkpoint costs as the federation grows: the disk client store's resume.pt holding every
client's state (before: the store read each client's file back into host memory and wrote them all
into resume.pt) against one that references the files (now: [file name, bytes] a client).

Every client holds persisted Adam moments of an MLP on Fashion-MNIST shapes (784-64-10 by default,
50,890 parameters, about 0.4 MB a client: 10,000 clients are about 4 GB, what this machine's memory
and disk allow for the embedded case; --hidden changes it). Each case runs in its own process, so
that its peak RSS (getrusage's high-water mark) is its own:

  checkpoint  state_dict() of the store plus writing resume.pt (one checkpoint), from a store whose
              files are on disk;
  resume      reading resume.pt and checking every client's entry against the model (src/checkpoint.py),
              then loading it into the store (embedded: every file written again; references: kept).

    OMP_NUM_THREADS=1 python benchmarks/checkpoint_scale.py [--clients 1000 10000] [--hidden 64] [--dir DIR]

Prints one table (seconds, peak RSS, resume.pt size) per number of clients. Needs about
2 x clients x state of free disk (the files and the embedded resume.pt) under --dir."""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from src.checkpoint import ClientStorePart  # noqa: E402
from src.client.state_store import ClientStateStore, copy_to  # noqa: E402
from src.models import MLP  # noqa: E402
from src.utils.io import load_torch, save_torch  # noqa: E402
from timing import timed  # noqa: E402  (benchmarks/timing.py, beside this script)

CPU = torch.device("cpu")
MANIFEST = "manifest.pt"  # the store's references, as the setup process committed them


def model(hidden: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return MLP((1, 28, 28), 10, hidden=(hidden,))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def setup(directory: Path, clients: int, hidden: int) -> None:
    """`clients` clients with one round of Adam state each, committed to a disk store."""
    net = model(hidden)
    opt = torch.optim.Adam(net.parameters())
    net(torch.zeros(1, 1, 28, 28)).sum().backward()
    opt.step()
    template = opt.state_dict()
    store = ClientStateStore("disk", CPU, directory / "client_state")
    for cid in range(clients):
        store.put(cid, {"optimizer": copy_to(template, CPU)})
    store.commit()
    save_torch(store.state_dict(), directory / MANIFEST)


def store_of(directory: Path) -> ClientStateStore:
    store = ClientStateStore("disk", CPU, directory / "client_state")
    store.load_state_dict(load_torch(directory / MANIFEST))
    return store


def embedded(store: ClientStateStore) -> dict:
    """The disk store's state_dict() before references: every client's state read into host memory."""
    return {str(i): copy_to(store.get(i), "cpu") for i in store.client_ids()}


def case(directory: Path, mode: str, phase: str, hidden: int) -> dict:
    store = store_of(directory)
    path = directory / f"resume_{mode}.pt"
    base = peak_rss_mb()
    if phase == "checkpoint":
        state = embedded if mode == "embedded" else ClientStateStore.state_dict
        seconds = timed(lambda: save_torch({"round": 1, "client_states": state(store)}, path), CPU)
    else:
        net = model(hidden)
        part = ClientStorePart(store, SimpleNamespace(live_state=net.state_dict(), params=list(net.parameters())),
                               len(store.client_ids()), store.directory)

        def resume():
            saved = load_torch(path)["client_states"]
            assert not part.check_state(saved)
            part.load_state_dict(saved)
        seconds = timed(resume, CPU)
    return {"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "rss_growth_mb": peak_rss_mb() - base,
            "resume_pt_mb": path.stat().st_size / 2**20}


def run(*args) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    out = subprocess.run([sys.executable, __file__, *map(str, args)], env=env, check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout.splitlines()[-1]) if out.stdout.strip() else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--dir", type=Path, default=None, help="where the client files go (default: a temp dir)")
    parser.add_argument("--case", nargs=4, metavar=("DIR", "MODE", "PHASE", "CLIENTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        directory, mode, phase, clients = Path(args.case[0]), args.case[1], args.case[2], int(args.case[3])
        if mode == "setup":
            setup(directory, clients, args.hidden)
        else:
            print(json.dumps(case(directory, mode, phase, args.hidden)))
        return

    numel = sum(p.numel() for p in model(args.hidden).parameters())
    print(f"MLP 784-{args.hidden}-10 ({numel:,} parameters), persisted Adam state: "
          f"{2 * 4 * numel / 2**20:.2f} MB a client; torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)")
    for clients in args.clients:
        directory = Path(tempfile.mkdtemp(prefix="checkpoint_scale_", dir=args.dir))
        try:
            run("--hidden", args.hidden, "--case", directory, "setup", "-", clients)
            files_mb = sum(p.stat().st_size for p in (directory / "client_state").glob("*/*")) / 2**20
            # the embedded resume rewrites every client file, so it runs last
            rows = {(m, p): run("--hidden", args.hidden, "--case", directory, m, p, clients)
                    for p in ("checkpoint", "resume") for m in ("references", "embedded")}
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        print(f"\n{clients:,} clients, {files_mb:,.0f} MB of client files")
        print("| phase | resume.pt holds | seconds | peak RSS (MB) | RSS growth (MB) | resume.pt (MB) |")
        print("|---|---|---|---|---|---|")
        for (mode, phase), r in rows.items():
            print(f"| {phase} | {mode} | {r['seconds']:.2f} | {r['peak_rss_mb']:,.0f} | {r['rss_growth_mb']:,.0f} "
                  f"| {r['resume_pt_mb']:,.2f} |")


if __name__ == "__main__":
    main()

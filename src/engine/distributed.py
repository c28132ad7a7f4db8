"""The multi-process engine (engine=distributed): one run over several processes with torch.distributed,
launched by `torchrun --nproc_per_node=N train.py engine=distributed ...` on one machine or by `srun`
under SLURM (across nodes); gloo on the CPU, NCCL on CUDA (one GPU per process, its local rank's).

Every process builds the whole run from the same seed: data, clients, server, hooks. A round's chains
are split across the processes by their work (greedy longest-processing-time on their local steps,
a pure function of the chains), each process trains its share, and the trained updates, with the
client state their training staged (optimizer moments, EMA, control variates), are all-gathered.
Every process then has every chain's update and yields them in the chains' order, so the client
transforms, the server's aggregation (robust aggregators, attacks, secure aggregation and DP
included), the hooks and the metrics run on every process as the sequential engine runs them: the
run is bit for bit the sequential engine's whatever the number of processes, and every process
holds the same replica (which is why rank 0 alone can write the checkpoint). The price is m updates
sent to every process per round and the aggregation done on each; in a simulation, training the m
clients costs far more. The pooled test and validation sets are scored in shards of whole batches,
each batch's sums by one process, added in batch order: bit for bit the one-process figures.

Rank 0 alone writes the run directory and logs (src/run.py); the others build their replica in a
private scratch folder, write no checkpoint and log only errors. A stop signal (SIGTERM) is agreed
at the next gather or round end, so every process stops at the same boundary and rank 0's checkpoint
is the state there. A process that dies or stops answering fails every other one within `timeout_s`."""
import datetime
import os
import subprocess
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from hydra.utils import get_class
from omegaconf import DictConfig

from src.client.client import ClientUpdate
from src.client.state_store import copy_to
from src.engine.base import Chain, only
from src.engine.sequential import SequentialEngine
from src.errors import ConfigError, UserError


class PeerLost(RuntimeError):
    """A collective failed: another process of the run died or stopped answering."""


class World:
    """This process among a run's `size` processes; rank 0 leads (writes the run directory). `device`:
    where the backend reduces tensors (CUDA for NCCL)."""

    def __init__(self, rank: int = 0, size: int = 1, device: str = "cpu", timeout_s: float = 0.0):
        self.rank, self.size, self.device, self.timeout_s = rank, size, device, timeout_s

    def _collective(self, fn: Callable, *args, **kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except (RuntimeError, dist.DistError) as e:
            raise PeerLost(f"process {self.rank} of {self.size}: another process of this engine=distributed run died "
                           f"or did not answer within engine.timeout_s={self.timeout_s:g} s (its own log says why): "
                           f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e

    def share(self, obj: Any) -> Any:
        """Rank 0's `obj`, on every process."""
        if self.size == 1:
            return obj
        box = [obj]
        self._collective(dist.broadcast_object_list, box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list:
        """Every process's `obj`, by rank (CPU tensors in it arrive as they were sent)."""
        if self.size == 1:
            return [obj]
        out = [None] * self.size
        self._collective(dist.all_gather_object, out, obj)
        return out

    def reduce(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        """`tensor` reduced over the processes (a copy: the original is left as it is)."""
        if self.size == 1:
            return tensor
        on = tensor.to(self.device, copy=True)
        self._collective(dist.all_reduce, on, op=op)
        return on.to(tensor.device)

    @contextmanager
    def leading(self):
        """Rank 0's start of a run (src/run.py): `started(state)` sends the other processes the state
        the run starts from; leaving before, by a return (the run was finished) or an error (a
        refused start), tells them to exit with the code rank 0 exits with."""
        started = []

        def start(state: Optional[dict]) -> None:
            self.share((0, state))
            started.append(True)
        try:
            yield start
        except BaseException as e:
            if not started:
                try:
                    self.share((2 if isinstance(e, UserError) else 1, None))
                except PeerLost:  # they are gone already: rank 0's own error is the one to report
                    pass
            raise
        if not started:
            self.share((0, FINISHED))

    def leave(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


FINISHED = "finished"  # what rank 0 sends when the run was already finished: nothing to do
_world: Optional[World] = None


def launched() -> tuple[int, int, int]:
    """(rank, size, local rank) as torchrun sets them (RANK, WORLD_SIZE, LOCAL_RANK) or, without
    those, srun inside a job step (SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID); a process
    started otherwise is rank 0 of 1."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def slurm_rendezvous() -> None:
    """MASTER_ADDR (the step's first node) and MASTER_PORT (from the job id) for processes srun started,
    unless they are set."""
    env = os.environ
    if "MASTER_ADDR" not in env:
        nodes = subprocess.run(["scontrol", "show", "hostnames", env["SLURM_STEP_NODELIST"]], capture_output=True,
                               text=True, check=True).stdout.split()
        env["MASTER_ADDR"] = nodes[0]
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", 0)) % 20000))


def join(cfg: DictConfig) -> World:
    """This process's place in the run (src/run.py calls it before anything is built): with
    engine=distributed, the process group torchrun or srun started it in (CUDA: the GPU of its local
    rank becomes the default one); with another engine a process started as one of several is refused."""
    global _world
    if _world is not None:
        return _world
    rank, size, local_rank = launched()
    if not issubclass(get_class(cfg.engine._target_), DistributedEngine):
        if size > 1:
            raise UserError(f"this process is rank {rank} of {size} (torchrun or srun started it), but engine="
                            f"{cfg.engine._target_} trains the whole run in every process: add engine=distributed")
        return World()
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    backend = cfg.engine.backend if cfg.engine.backend != "auto" else ("nccl" if cuda else "gloo")
    problems = []
    if backend == "nccl" and not cuda:
        problems.append(f"engine.backend=nccl needs CUDA (device={cfg.device}): use engine.backend=gloo or auto")
    if cuda and cfg.client.amp == "fp16":
        problems.append("client.amp=fp16: its loss scale is shared by the clients trained one after another, "
                        "which the processes of engine=distributed cannot share: use client.amp=bf16")
    if cfg.client.state_store == "disk":
        problems.append("client.state_store=disk: every process of engine=distributed keeps a full copy of the "
                        "client state, in memory: use client.state_store=host (or device)")
    if backend == "nccl" and size > 1 and local_rank >= torch.cuda.device_count():
        problems.append(f"engine.backend=nccl: process {rank} is local process {local_rank} on a node with "
                        f"{torch.cuda.device_count()} visible GPU(s): start one process per GPU (torchrun "
                        "--nproc_per_node, srun --ntasks-per-node), or engine.backend=gloo to share them")
    if problems:
        raise ConfigError(problems)
    if size > 1:
        if "RANK" not in os.environ:
            slurm_rendezvous()
        if cuda:
            torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=size,
                                timeout=datetime.timedelta(seconds=cfg.engine.timeout_s))
    _world = World(rank, size, "cuda" if backend == "nccl" else "cpu", cfg.engine.timeout_s)
    return _world


def assign(work: Sequence[int], size: int) -> list[int]:
    """The process (rank) of each chain: longest processing time first, each chain to the least
    loaded process (ties: the lower rank; equal work: the earlier chain)."""
    load, owner = [0] * size, [0] * len(work)
    for i in sorted(range(len(work)), key=lambda i: (-work[i], i)):
        owner[i] = min(range(size), key=lambda r: (load[r], r))
        load[owner[i]] += work[i]
    return owner


def chain_steps(chain: Chain) -> int:
    """A chain's local steps: its work."""
    return sum(min(c.setup.num_steps(c.num_samples), steps if steps is not None else float("inf"))
               for c, _, steps in chain.links)


def moved(update: ClientUpdate, device) -> ClientUpdate:
    """`update` with copies of its tensors on `device`."""
    return ClientUpdate(*(copy_to(v, device) for v in update))


class DistributedEngine(SequentialEngine):
    def __init__(self, backend: str = "auto", timeout_s: float = 300.0):
        """`backend`: auto (nccl on CUDA, gloo on the CPU), gloo or nccl; `timeout_s`: how long a
        process waits for the others at a collective (and at the start) before the run fails."""
        if backend not in ("auto", "gloo", "nccl"):
            raise ValueError(f"backend must be auto, gloo or nccl, got {backend!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.backend, self.timeout_s = backend, timeout_s

    @property
    def world(self) -> World:
        return _world or World()  # built in-process without src/run.py: one process

    @property
    def rank(self) -> int:
        return self.world.rank

    def train(self, chains: Sequence[Chain], round_idx: int, send: Callable[[], dict], *, transforms: Sequence = (),
              merge: Callable[[list[Optional[dict]]], Optional[dict]] = only,
              check_stop: Callable[[], None] = lambda: None) -> Iterator[tuple[Chain, ClientUpdate]]:
        from src.algo.base import TrainingInterrupted  # here: src.algo imports the engines

        if not chains:  # every process has the same chains: none of them gathers
            return
        world = self.world
        owner = assign([chain_steps(c) for c in chains], world.size)
        mine = [i for i, r in enumerate(owner) if r == world.rank]
        store, device = chains[0].sender.setup.store, chains[0].sender.indices.device
        trained, stop = {}, None
        try:
            for i, (chain, update) in zip(mine, super().train([chains[i] for i in mine], round_idx, send, merge=merge,
                                                               check_stop=check_stop)):
                staged = {c.client_id: copy_to(store.staged(c.client_id), "cpu") for c in chain.members}
                trained[i] = (moved(update, "cpu"), staged)
        except TrainingInterrupted as e:  # stop with the others, at the gather
            stop = e.signum
        shares = world.gather((stop, trained))
        stop = max((s for s, _ in shares if s is not None), default=None)
        if stop is not None:
            raise TrainingInterrupted(stop)
        for i, chain in enumerate(chains):
            update, staged = shares[owner[i]][1][i]
            if owner[i] != world.rank:
                for client_id, state in staged.items():
                    if state is not None:
                        store.put(client_id, state)
            update = moved(update, device)
            for t in transforms:
                update = t.client(update, chain.sender.client_id, store)
            yield chain, update

    def agree_stop(self, signum: Optional[int]) -> Optional[int]:
        return int(self.world.reduce(torch.tensor([signum or 0]), dist.ReduceOp.MAX)) or None

    def batches(self, count: int) -> range:
        return range(self.world.rank, count, self.world.size)

    def combine(self, rows: torch.Tensor) -> torch.Tensor:
        return self.world.reduce(rows)

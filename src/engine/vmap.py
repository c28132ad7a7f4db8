"""The batched cohort engine (engine=vmap): a round's chains trained `width` at a time, their weights
stacked along a leading client axis and every local step one vmapped functional step
(torch.func.functional_call + vmap + grad_and_value) for all of them.

What it keeps of Client.client_update, and how:
- Batches: every client draws its own from its own generator (Client.batches), exactly as under
  the sequential engine. A short batch is zero-padded and its padding weighs 0 in the loss; a
  client whose steps are done (fewer samples, a straggler's budget, a shorter chain) takes no step:
  its weights and optimizer state are kept as they are (torch.where), whatever the others do.
- The rest of a client's round runs on the live model as before (Client.start_round and
  finish_round): the engine loads a client's start weights into it for begin_round and its trained
  weights for end_round and the update, so the hooks (SCAFFOLD's, FedDyn's, FedNova's), the state
  store and the update transforms see what they see under the sequential engine.
- The optimizer: torch's single-tensor SGD (momentum, dampening, Nesterov, weight decay), Adam and
  AdamW formulas applied to the stacked tensors, with each client's step sizes read from its own
  torch optimizer and LR scheduler, which also carry its persisted state in and out in torch's
  state_dict format (a run can resume on the sequential engine).
- penalty(): its gradient from Client.penalty_terms (FedProx, SCAFFOLD, FedDyn), added to the
  loss's before client.grad_clip (the global norm, per client).
- client.ema: each client's EMA stacked too, AveragedModel's update after each step it takes.
Results equal the sequential engine's up to float rounding (batched kernels sum in another order);
tests/test_engine_vmap.py states the tolerance. What it cannot reproduce it refuses once the run is
built, before anything is written, in one ConfigError (`problems`)."""
import logging
import os
import warnings
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn as nn
from torch.func import functional_call, grad_and_value, vmap

from src.client.client import Client, ClientUpdate, TrainSetup
from src.client.ema import ClientEMA
from src.engine.base import Chain, Engine, join, only
from src.engine.sequential import SequentialEngine
from src.errors import ConfigError

log = logging.getLogger(__name__)

MEMORY_SHARE = 0.5  # of the free device memory that the stacked clients may take
# engine.width=null on a CPU: more stacked clients fall out of the cache and do not run faster
# (benchmarks/cross_device.py, CPU seconds a round: 1.13x centralized at width 5, 1.84x at 50)
CPU_WIDTH = 8


def stacked_gradients(model: nn.Module, loss_fn: Callable) -> Callable:
    """(weights, buffers, x, y, w) -> (gradients, losses) for clients stacked along dim 0: client
    k's gradient of its mean loss over the samples its weights w[k] count (1 or 0 for padding)."""
    def client_loss(params, buffers, x, y, w):
        out = functional_call(model, {**params, **buffers}, (x,))
        per_sample = vmap(lambda o, t: loss_fn(o.unsqueeze(0), t.unsqueeze(0)))(out, y)
        return (per_sample * w).sum() / w.sum().clamp(min=1)
    return vmap(grad_and_value(client_loss), in_dims=(0, None, 0, 0, 0))


def _per_client(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A [W] vector shaped to broadcast over stacked tensors like `like` ([W, ...])."""
    return v.view(-1, *[1] * (like.dim() - 1))


def _every_step_taken(lrs: list[list[float]]) -> list[bool]:
    """Per step, whether every client takes it: then no update needs masking."""
    return [all(t < len(r) for r in lrs) for t in range(max(map(len, lrs)))]


def _masked(old: torch.Tensor, new: torch.Tensor, active: Optional[torch.Tensor]) -> torch.Tensor:
    """`new` for the clients that take the step (all when `active` is None), `old` for the others."""
    return new if active is None else torch.where(_per_client(active, old), new, old)


class StackedSGD:
    """torch.optim.SGD's single-tensor update on stacked weights. `neg_lr` [steps, W]: minus each
    client's step size at each step; `fresh` [W]: clients whose momentum buffer starts this round."""

    def __init__(self, weights: list[torch.Tensor], momentum: float = 0.0, dampening: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0, **_):
        self.momentum, self.dampening, self.nesterov, self.weight_decay = momentum, dampening, nesterov, weight_decay
        self.buffers = [torch.zeros_like(w) for w in weights] if momentum else []
        self.loaded = [False] * weights[0].shape[0]

    def load(self, k: int, states: list[dict]) -> None:
        """Client k's state from its torch optimizer (one dict per parameter)."""
        if self.momentum and states and states[0].get("momentum_buffer") is not None:
            for b, st in zip(self.buffers, states):
                b[k].copy_(st["momentum_buffer"])
            self.loaded[k] = True

    def dump(self, k: int) -> list[dict]:
        return [{"momentum_buffer": b[k].clone()} for b in self.buffers]

    def plan(self, lrs: list[list[float]], device: torch.device) -> None:
        self.full = _every_step_taken(lrs)
        self.neg_lr = torch.tensor([[-r[t] if t < len(r) else 0.0 for r in lrs] for t in range(len(self.full))],
                                   device=device)
        self.fresh = torch.tensor([not done for done in self.loaded], device=device)

    def step(self, weights: list[torch.Tensor], grads: list[torch.Tensor], t: int,
             active: Optional[torch.Tensor]) -> None:
        active = None if self.full[t] else active
        for i, (p, g) in enumerate(zip(weights, grads)):
            if self.weight_decay:
                g = g.add(p, alpha=self.weight_decay)
            if self.momentum:
                buf = self.buffers[i].mul(self.momentum).add_(g, alpha=1 - self.dampening)
                if t == 0:
                    buf = torch.where(_per_client(self.fresh, p), g, buf)
                self.buffers[i] = _masked(self.buffers[i], buf, active)
                g = g.add(buf, alpha=self.momentum) if self.nesterov else buf
            weights[i] = _masked(p, p.addcmul(g, _per_client(self.neg_lr[t], p)), active)


class StackedAdam:
    """torch.optim.Adam's single-tensor update (AdamW's with decoupled weight decay) on stacked
    weights, each client with its own step count (bias correction)."""

    def __init__(self, weights: list[torch.Tensor], betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 decoupled_weight_decay: bool = False, **_):
        (self.beta1, self.beta2), self.eps, self.weight_decay = betas, eps, weight_decay
        self.decoupled = decoupled_weight_decay
        self.exp_avg = [torch.zeros_like(w) for w in weights]
        self.exp_avg_sq = [torch.zeros_like(w) for w in weights]
        self.step0 = [0.0] * weights[0].shape[0]  # each client's steps taken before this round

    def load(self, k: int, states: list[dict]) -> None:
        if states and "step" in states[0]:
            for a, s, st in zip(self.exp_avg, self.exp_avg_sq, states):
                a[k].copy_(st["exp_avg"])
                s[k].copy_(st["exp_avg_sq"])
            self.step0[k] = float(states[0]["step"])  # a host tensor: no device sync

    def dump(self, k: int) -> list[dict]:
        step = self.step0[k] + self.taken[k]
        return [{"step": torch.tensor(step), "exp_avg": a[k].clone(), "exp_avg_sq": s[k].clone()}
                for a, s in zip(self.exp_avg, self.exp_avg_sq)]

    def plan(self, lrs: list[list[float]], device: torch.device) -> None:
        """Per step and client, computed on the host in double as torch does: minus the step size
        lr / (1 - beta1^n), sqrt(1 - beta2^n), and AdamW's decay factor 1 - lr * weight_decay."""
        self.taken = [len(r) for r in lrs]
        self.full = _every_step_taken(lrs)
        rows = []
        for t in range(len(self.full)):
            row = []
            for r, n0 in zip(lrs, self.step0):
                lr, n = (r[t], n0 + t + 1) if t < len(r) else (0.0, 1.0)
                row.append((-lr / (1 - self.beta1 ** n), (1 - self.beta2 ** n) ** 0.5, 1 - lr * self.weight_decay))
            rows.append(row)
        self.coef = torch.tensor(rows, device=device)  # [steps, W, 3]

    def step(self, weights: list[torch.Tensor], grads: list[torch.Tensor], t: int,
             active: Optional[torch.Tensor]) -> None:
        neg_step, bc2_sqrt, decay = self.coef[t].unbind(1)
        active = None if self.full[t] else active
        for i, (p, g) in enumerate(zip(weights, grads)):
            q = p
            if self.weight_decay and self.decoupled:
                q = p * _per_client(decay, p)
            elif self.weight_decay:
                g = g.add(p, alpha=self.weight_decay)
            avg = self.exp_avg[i].lerp(g, 1 - self.beta1)
            sq = self.exp_avg_sq[i].mul(self.beta2).addcmul_(g, g, value=1 - self.beta2)
            denom = (sq.sqrt() / _per_client(bc2_sqrt, p)).add_(self.eps)
            self.exp_avg[i] = _masked(self.exp_avg[i], avg, active)
            self.exp_avg_sq[i] = _masked(self.exp_avg_sq[i], sq, active)
            weights[i] = _masked(p, q.addcmul(avg / denom, _per_client(neg_step, p)), active)


class StackedEMA:
    """The clients' EMA weights (src/client/ema.py), stacked: AveragedModel's update
    (ema.lerp_(w, 1 - decay)) after each step a client takes. The run's one ClientEMA holds a
    client's EMA where the trainer reads and persists it: `load` takes it from there after the
    client's round began, `dump` puts it back."""

    def __init__(self, ema: ClientEMA, names: list[str], weights: list[torch.Tensor]):
        self.ema, self.params = ema, [ema.params[n] for n in names]
        self.stack = [torch.empty_like(w) for w in weights]
        self.begun: dict[int, torch.Tensor] = {}  # per slot: n_averaged when its round began

    def load(self, k: int) -> None:
        torch._foreach_copy_([e[k] for e in self.stack], self.params)
        self.begun[k] = self.ema.averaged.n_averaged.clone()

    def step(self, weights: list[torch.Tensor], active: Optional[torch.Tensor]) -> None:
        """`active`: the slots that took the step; None: all of them (in place, no copies)."""
        if active is None:
            torch._foreach_lerp_(self.stack, weights, 1 - self.ema.decay)
            return
        moved = torch._foreach_lerp(self.stack, weights, 1 - self.ema.decay)
        self.stack = [_masked(e, m, active) for e, m in zip(self.stack, moved)]

    def dump(self, k: int, steps: Optional[int] = None) -> None:
        """Slot k's EMA into the ClientEMA; `steps`: the steps it took this round (its n_averaged)."""
        with torch.no_grad():
            torch._foreach_copy_(self.params, [e[k] for e in self.stack])
            if steps is not None:
                self.ema.averaged.n_averaged.copy_(self.begun[k] + steps)


def stacked_optimizer(optimizer: torch.optim.Optimizer, weights: list[torch.Tensor]):
    """The stacked counterpart of a client's torch optimizer, with its hyperparameters."""
    group = optimizer.param_groups[0]
    kind = StackedAdam if isinstance(optimizer, torch.optim.Adam) else StackedSGD
    return kind(weights, **{k: v for k, v in group.items() if k != "params"})


def problems(setup: TrainSetup, clients: Sequence[Client]) -> list[str]:
    """What engine=vmap cannot reproduce in these settings, as 'setting: why and the fix'."""
    fix = "or use engine=sequential"
    found = []
    optimizer = setup.optimizer([torch.zeros(1, requires_grad=True)])
    group = optimizer.param_groups[0]
    if type(optimizer) not in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW):
        found.append(f"optimizer: engine=vmap applies SGD, Adam and AdamW to stacked clients, not "
                     f"{type(optimizer).__name__}: use one of them {fix}")
    else:
        found += [f"optimizer.{k}: engine=vmap does not implement {k}=true: set it to false {fix}"
                  for k in ("amsgrad", "maximize", "differentiable", "capturable", "fused") if group.get(k)]
        if any(isinstance(group[k], torch.Tensor) for k in ("lr", "betas") if k in group):
            found.append(f"optimizer.lr: engine=vmap needs a number, not a tensor {fix}")
    if setup.amp_dtype is not None:
        found.append(f"client.amp: engine=vmap trains in fp32 (no autocast, no fp16 loss scaling): use "
                     f"client.amp=off {fix}")
    if setup.local_dp is not None:
        found.append(f"local_dp.enabled: DP-SGD clips per-sample gradients of clients trained one by one: "
                     f"use local_dp.enabled=false {fix}")
    for m in setup.model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase):
            found.append(f"model: {type(m).__name__} normalises over the batch, which padding changes, and "
                         f"updates running statistics in training: use a model without it (model.norm=group "
                         f"for resnet20) {fix}")
            break
        if isinstance(m, nn.modules.dropout._DropoutNd):
            found.append(f"model: {type(m).__name__} draws from the global RNG, which engine=vmap cannot replay "
                         f"per client: use a model without dropout {fix}")
            break
    for cls in {type(c) for c in clients}:
        if cls.client_update is not Client.client_update:
            found.append(f"algo.client: {cls.__name__} overrides client_update, whose steps engine=vmap does not "
                         f"take {fix}")
        elif not issubclass(_definer(cls, "penalty_terms"), _definer(cls, "penalty")):
            found.append(f"algo.client: {cls.__name__} overrides penalty() but not penalty_terms(), its gradient "
                         f"that engine=vmap applies: add it {fix}")
    return found


def _definer(cls: type, name: str) -> type:
    return next(c for c in cls.__mro__ if name in vars(c))


def fitting_width(setup: TrainSetup, state_copies: int) -> int:
    """How many clients fit in MEMORY_SHARE of the free device memory (host memory on a CPU), each
    with about 4 + `state_copies` model-sized tensors (weights, gradients, update temporaries,
    optimizer and penalty state) and a batch's activations, counted as 3x the outputs of every
    leaf module on one sample (forward values kept for backward, and their gradients)."""
    model, x = setup.model, setup.data.x[:1]
    sizes = [x.numel()]
    hooks = [m.register_forward_hook(lambda m, i, o: sizes.append(o.numel() if torch.is_tensor(o) else 0))
             for m in model.modules() if not any(True for _ in m.children())]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    bytes_per = x.element_size()
    per_client = bytes_per * ((4 + state_copies) * sum(p.numel() for p in setup.params)
                              + 3 * setup.batch_size * sum(sizes))
    if x.device.type == "cuda":
        free = torch.cuda.mem_get_info(x.device)[0]
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return max(1, int(MEMORY_SHARE * free // per_client))


class VmapEngine(Engine):
    def __init__(self, width: Optional[int] = None):
        """`width`: how many chains train at once; None: as many as fit in memory (fitting_width,
        which also caps a given width), at most CPU_WIDTH on a CPU."""
        if width is not None and width < 1:
            raise ValueError(f"width must be >= 1 (or null: from the free memory), got {width}")
        self.width = width
        self.fits: Optional[int] = None  # fitting_width, found at the first round

    def prepare(self, setup: TrainSetup, clients: Sequence[Client]) -> None:
        """Once the run is built (or at the first round of a bare engine): refuse what cannot be
        reproduced, and size the width."""
        found = problems(setup, clients)
        if found:
            raise ConfigError(found)
        adam = isinstance(setup.optimizer([torch.zeros(1, requires_grad=True)]), torch.optim.Adam)
        # optimizer state, penalty anchor and linear term, EMA
        self.fits = fitting_width(setup, (2 if adam else 1) + 2 + (setup.ema is not None))
        if self.width is not None and self.width > self.fits:
            log.warning("engine.width=%d clients do not fit in memory: training %d at a time", self.width, self.fits)

    def train(self, chains: Sequence[Chain], round_idx: int, send: Callable[[], dict], *, transforms: Sequence = (),
              merge: Callable[[list[Optional[dict]]], Optional[dict]] = only,
              check_stop: Callable[[], None] = lambda: None) -> Iterator[tuple[Chain, ClientUpdate]]:
        if not chains:
            return
        setup = chains[0].links[0].client.setup
        if self.fits is None:
            self.prepare(setup, [link.client for chain in chains for link in chain.links])
        default = self.fits if setup.data.x.device.type == "cuda" else min(self.fits, CPU_WIDTH)
        width = min(self.width or default, self.fits, len(chains))
        setup.model.train()
        live = [setup.live_state[n] for n in setup.param_names]
        for start in range(0, len(chains), width):
            group = chains[start:start + width]
            weights, ema, updates = self.train_group(setup, group, [send() for _ in group], round_idx, check_stop)
            for k, chain in enumerate(group):
                torch._foreach_copy_(live, [w[k] for w in weights])  # the update is a view of the live model
                if ema is not None:
                    ema.dump(k)  # and of the EMA's
                update = join(updates[k], chain, merge)
                for t in transforms:
                    update = t.client(update, chain.sender.client_id, chain.sender.setup.store)
                yield chain, update

    def train_group(self, s: TrainSetup, group: Sequence[Chain], received: list[dict], round_idx: int,
                    check_stop: Callable[[], None]
                    ) -> tuple[list[torch.Tensor], Optional[StackedEMA], list[list[ClientUpdate]]]:
        """Train the chains of `group` together, link j of every chain at stage j; returns their
        final stacked weights and EMA (if on) and, per chain, its links' updates (for join)."""
        live = [s.live_state[n] for n in s.param_names]
        weights = [torch.empty((len(group), *p.shape), dtype=p.dtype, device=p.device) for p in live]
        ema = StackedEMA(s.ema, s.param_names, weights) if s.ema is not None else None
        updates: list[list[ClientUpdate]] = [[] for _ in group]
        for j in range(max(len(chain.links) for chain in group)):
            check_stop()
            started = {}
            for k, chain in enumerate(group):
                if j >= len(chain.links):
                    continue
                client, stream, max_steps = chain.links[j]
                if j == 0:  # the first link loads the global weights, the later ones continue the chain's
                    client.receive_data(received[k])
                else:
                    torch._foreach_copy_(live, [w[k] for w in weights])
                    client.received = received[k]
                optimizer, scheduler, steps = client.start_round(round_idx, max_steps)
                lrs = []
                with warnings.catch_warnings():  # the steps are taken stacked, never by optimizer.step()
                    warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step")
                    for _ in range(steps):  # the step sizes client_update takes, and its scheduler's end state
                        lrs.append(optimizer.param_groups[0]["lr"])
                        if scheduler is not None:
                            scheduler.step()
                torch._foreach_copy_([w[k] for w in weights], live)  # the start weights, as begin_round left them
                if ema is not None:
                    ema.load(k)
                started[k] = (client, optimizer, lrs, client.batches(round_idx, stream, steps))
            loss_sums, seen, opt = self.steps(s, weights, started, len(group), ema)
            for k, (client, optimizer, lrs, _) in started.items():
                torch._foreach_copy_(live, [w[k] for w in weights])
                if ema is not None:
                    ema.dump(k, len(lrs))
                client.step_lrs = lrs
                if lrs:
                    optimizer.state.update(zip(s.params, opt.dump(k)))
                client.finish_round(optimizer, loss_sums[k], seen[k])
                updates[k].append(client.send_data())
        return weights, ema, updates

    def steps(self, s: TrainSetup, weights: list[torch.Tensor], started: dict, width: int,
              ema: Optional[StackedEMA] = None):
        """The stage's local steps of the `started` clients (slot k: client, torch optimizer, step
        sizes, batches); the other slots keep their weights (and EMA). Returns the loss sums [W], the
        samples seen per slot and the stacked optimizer (for the state it persists)."""
        device = weights[0].device
        first = next(iter(started.values()))
        opt = stacked_optimizer(first[1], weights)
        for k, (_, optimizer, _, _) in started.items():
            opt.load(k, [optimizer.state[p] for p in s.params] if optimizer.state else [])
        lrs = [started[k][2] if k in started else [] for k in range(width)]
        opt.plan(lrs, device)
        active = torch.tensor([[t < len(r) for r in lrs] for t in range(max(map(len, lrs)))], device=device)
        quadratic, anchor, linear = self.penalty(s, weights, started, width)
        grad_fn = stacked_gradients(s.model, s.loss_fn)
        buffers = {n: b.detach() for n, b in s.model.named_buffers()}
        loss_sums = torch.zeros(width, device=device)
        seen = [0] * width
        blank, masks = None, {}  # zero padding; per batch size n, the mask of its first n samples
        for t in range(active.shape[0]):
            batch = {k: next(started[k][3]) for k in range(width) if t < len(lrs[k])}
            size = max(y.shape[0] for _, y in batch.values())
            if blank is None:
                x0, y0 = next(iter(batch.values()))
                blank = (x0.new_zeros((size, *x0.shape[1:])), y0.new_zeros((size,)))
            xs, ys, ws = [], [], []
            for k in range(width):
                x, y = batch.get(k, (blank[0][:0], blank[1][:0]))
                n = y.shape[0]
                seen[k] += n
                xs.append(x if n == size else torch.cat([x, blank[0][:size - n]]))
                ys.append(y if n == size else torch.cat([y, blank[1][:size - n]]))
                if (n, size) not in masks:
                    masks[n, size] = torch.arange(size, device=device) < n
                ws.append(masks[n, size])
            w = torch.stack(ws).to(xs[0].dtype)
            grads, losses = grad_fn(dict(zip(s.param_names, weights)), buffers, torch.stack(xs), torch.stack(ys), w)
            grads = [grads[n] for n in s.param_names]
            if quadratic is not None:
                grads = [g + _per_client(quadratic, p) * (p - a) for g, p, a in zip(grads, weights, anchor)]
            if linear is not None:
                grads = torch._foreach_add(grads, linear)
            if s.grad_clip is not None:  # torch.nn.utils.clip_grad_norm_'s arithmetic, per client
                norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads]).norm(dim=0)
                factor = (s.grad_clip / (norms + 1e-6)).clamp(max=1.0)
                grads = [g * _per_client(factor, g) for g in grads]
            opt.step(weights, grads, t, active[t])
            if ema is not None:
                ema.step(weights, None if opt.full[t] else active[t])
            loss_sums += losses.detach().float() * w.sum(1)
        return loss_sums, seen, opt

    @staticmethod
    def penalty(s: TrainSetup, weights: list[torch.Tensor], started: dict, width: int):
        """The started clients' PenaltyTerms, stacked: quadratic [W] (None if all 0), the anchors
        (the received global weights; one broadcast copy when all clients share them) and linear
        (None if no client has one); absent slots get zeros."""
        terms = {k: client.penalty_terms() for k, (client, *_) in started.items()}
        quadratic = anchor = linear = None
        if any(t.quadratic for t in terms.values()):
            quadratic = torch.tensor([terms[k].quadratic if k in terms else 0.0 for k in range(width)],
                                     device=weights[0].device)
            anchors = {k: [client.received["global_state"][n] for n in s.param_names]
                       for k, (client, *_) in started.items()}
            sets = list(anchors.values())
            if all(a is b for other in sets for a, b in zip(other, sets[0])):
                anchor = [a.unsqueeze(0) for a in sets[0]]
            else:
                anchor = [torch.stack([anchors[k][i] if k in anchors else sets[0][i] for k in range(width)])
                          for i in range(len(weights))]
        if any(t.linear is not None for t in terms.values()):
            linear = [torch.stack([terms[k].linear[i] if k in terms and terms[k].linear is not None
                                   else torch.zeros_like(w[0]) for k in range(width)])
                      for i, w in enumerate(weights)]
        return quadratic, anchor, linear


class AutoEngine(Engine):
    """engine=auto: the vmap engine on a CUDA device when it can reproduce the settings, the
    sequential engine otherwise (on a CPU the batched step is no faster: benchmarks/cross_device.py)."""

    def __init__(self, width: Optional[int] = None):
        self.vmap = VmapEngine(width)
        self.chosen: Optional[Engine] = None

    def train(self, chains: Sequence[Chain], round_idx: int, send: Callable[[], dict],
              **kwargs) -> Iterator[tuple[Chain, ClientUpdate]]:
        if self.chosen is None and chains:
            setup = chains[0].links[0].client.setup
            on_cuda = setup.data.x.device.type == "cuda"
            fits = on_cuda and not problems(setup, [link.client for chain in chains for link in chain.links])
            self.chosen = self.vmap if fits else SequentialEngine()
            log.info("engine=auto: %s engine", "vmap" if fits else "sequential")
        return self.chosen.train(chains, round_idx, send, **kwargs) if chains else iter(())

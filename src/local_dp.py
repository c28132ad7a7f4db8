"""Local differential privacy on every client, the `local_dp:` settings: DP-SGD (Abadi, Chu,
Goodfellow, McMahan, Mironov, Talwar, Zhang, "Deep Learning with Differential Privacy", CCS 2016) as
each client's local training, through opacus (Yousefpour et al., "Opacus: User-Friendly Differential
Privacy Library in PyTorch", 2021): per-sample gradients from its GradSampleModule, clipping and noise
from its DPOptimizer. Off by default: a run is then bit for bit what it was without this module.

A step of client i (n_i samples, batch size B, the working model's parameters as one vector):
- Poisson sampling, what the accountant assumes: every sample of the client is in the batch with
  probability q_i = min(1, B / n_i), independently, drawn from the client's (seed, round, client)
  CLIENT_DATA generator. A batch may be empty: the step is then noise alone.
- Each sample's gradient g_j is clipped to norm C, and the step's gradient is
  (sum_j g_j min(1, C / ||g_j||) + N(0, (z C)^2 I)) / (q_i n_i): the sum over the expected batch
  size, not the drawn one (which would depend on the data).
- A penalty that does not see the data (FedProx's proximal term, SCAFFOLD's correction, FedDyn's
  terms) adds its gradient to that noisy one: it costs no privacy.
The steps per round are those without DP (client.local_epochs of ceil(n_i / B), or
client.local_steps), the optimizer the run's (the noisy gradient is what it steps on).

Accounting. The guarantee is each client's, about its own samples (one sample added or removed):
client i's k_i steps are k_i compositions of dp_accounting's PoissonSampledDpEvent(q_i,
GaussianDpEvent(z)) in its RDP accountant (as src/privacy.py uses it), epsilon_i at local_dp.delta;
the RDP curve of one step is computed once per distinct q_i. local_dp_epsilon in metrics.jsonl
(every round) and results.json is the worst client's, max_i epsilon_i over the steps each has taken
so far (a straggler's cut steps are not counted, an update dropped later still is). Whatever a client
sends is computed from its noisy steps and data-independent state: post-processing. n_i is taken as
public, as DP-SGD implementations take the dataset size: it sets q_i, the steps and FedAvg's weight.
Client selection is not credited (no amplification by sampling clients). local_dp.target_epsilon
refuses to start a run whose schedule could spend more, and names the rounds that fit: the bound it
takes is every client training in every round, honest for any client selection (clients that sit
out rounds spend less than it says).

Noise comes from generators of (seed, round, client[, pass]) on the LOCAL_DP_NOISE stream, so a
resumed run draws what the uninterrupted one did; the clients' step counts are the resume
checkpoint's part `local_dp`, committed at the end of each round as the client state is. Not
private, as diagnostics of the simulation: train_loss in the metrics."""
import collections
import logging
import warnings
from typing import Callable, Iterator, Optional

import torch
from hydra.utils import get_class
from omegaconf import DictConfig

from src.errors import ConfigError
from src.hooks import RoundHook
from src.privacy import Accountant
from src.utils.seeding import LOCAL_DP_NOISE, torch_generator


def config_problems(cfg: DictConfig) -> list[str]:
    """Where local_dp.enabled cannot compose with the run's other settings (src/config.py validate)."""
    problems = []
    if cfg.client.amp == "fp16":
        problems.append("client.amp: fp16 loss scaling multiplies the per-sample gradients that DP-SGD clips to "
                        "local_dp.clip_norm, and skips steps: use client.amp=bf16 or client.amp=off with "
                        "local_dp.enabled")
    if cfg.client.grad_clip is not None:
        problems.append("client.grad_clip: DP-SGD clips every sample's gradient to local_dp.clip_norm already: "
                        "set client.grad_clip=null with local_dp.enabled")
    # engine=auto falls back to the sequential engine under local DP (the vmap engine refuses it)
    if cfg.engine._target_ not in ("src.engine.SequentialEngine", "src.engine.AutoEngine"):
        problems.append(f"engine: local DP trains the clients one at a time, with per-sample gradients, and counts "
                        f"their steps in this process, which {cfg.engine._target_} does not: use engine=sequential "
                        "with local_dp.enabled")
    try:
        algo = get_class(cfg.algo._target_)
        client = get_class(cfg.algo.client._target_) if "client" in cfg.algo else None
    except Exception:  # the algo group reports it
        return problems
    if issubclass(algo, get_class("src.algo.fedseq.FedSeq")):
        problems.append("algo: FedSeq groups the clients by a model pre-trained on each one's data (or by its label "
                        "histogram) without noise, which local DP does not cover: use another algorithm with "
                        "local_dp.enabled")
    if (client is not None and issubclass(client, get_class("src.algo.scaffold.ScaffoldClient"))
            and cfg.algo.client.get("option", "II") == "I"):
        problems.append("algo.client.option: SCAFFOLD's option I sends a full gradient over the client's data, "
                        "without noise: use algo.client.option=II with local_dp.enabled")
    return problems


class LocalAccountant(Accountant):
    """Each client's epsilon at `delta` after its DP-SGD steps (above), from dp_accounting's RDP
    accountant. epsilon(rounds) is the planned bound, the worst client's if every client took its
    steps in every round: what rounds_within (privacy.Accountant's) searches for the target."""

    def __init__(self, rates: list[float], steps_per_round: list[int], noise_multiplier: float, delta: float):
        self.rates, self.steps_per_round, self.z, self.delta = rates, steps_per_round, noise_multiplier, delta
        self.orders = None
        self._step_rdp: dict[float, object] = {}

    def step_rdp(self, rate: float):
        """The RDP curve of one step at sampling rate `rate` (about 0.1 s each: cached)."""
        if rate not in self._step_rdp:
            import dp_accounting  # here: runs without local DP need not install it
            from dp_accounting.rdp import RdpAccountant

            event = dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(self.z))
            # the library leaves out the fractional orders whose series does not converge, with a warning
            # per order: epsilon stays an upper bound, from the other orders
            absl = logging.getLogger("absl")
            level = absl.level
            absl.setLevel(logging.ERROR)
            try:
                one = RdpAccountant().compose(event)  # add-or-remove-one, the relation of Poisson sampling
            finally:
                absl.setLevel(level)
            self.orders, self._step_rdp[rate] = one.orders, one.rdp
        return self._step_rdp[rate]

    def client_epsilon(self, client: int, steps: int) -> float:
        from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

        if not steps:
            return 0.0
        rdp = self.step_rdp(self.rates[client])
        return float(compute_epsilon(self.orders, steps * rdp, self.delta)[0])

    def worst(self, steps: list[int]) -> float:
        """max_i epsilon_i after client i's `steps[i]` steps."""
        return max((self.client_epsilon(i, k) for i, k in enumerate(steps)), default=0.0)

    def epsilon(self, rounds: int) -> float:
        return self.worst([rounds * k for k in self.steps_per_round])


class LocalDP(RoundHook):
    """DP-SGD for every client's local training (Client.client_update asks for the batches, the
    optimizer and each step's backward), and the round hook that counts the steps and reports epsilon."""

    key = "local_dp"

    def __init__(self, setup, sizes: list[int], noise_multiplier: float, clip_norm: float, delta: float,
                 seed: int):
        """`setup` is the run's TrainSetup, `sizes` the clients' numbers of training samples."""
        from opacus import GradSampleModule  # here: runs without local DP need not install it

        try:  # hooks on the working model's layers, wrapped once per run
            self.grad_sampler = GradSampleModule(setup.model)
        except NotImplementedError:
            buffered = [name for name, m in setup.model.named_modules() if list(m.buffers(recurse=False))]
            raise ConfigError([f"model: opacus computes no per-sample gradients through layers with buffers "
                               f"({', '.join(buffered[:3])}): under BatchNorm a sample's gradient depends on the "
                               "whole batch, and its running statistics are not private: use a model without "
                               "BatchNorm (model.norm=group for resnet20)"])
        self.grad_sampler.disable_hooks()  # on only while a DP step computes its per-sample gradients
        # the first layer's input never requires a gradient, which torch warns about at every run
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
        self.setup, self.z, self.clip_norm, self.seed = setup, noise_multiplier, clip_norm, seed
        self.rates = [min(1.0, setup.batch_size / n) for n in sizes]
        self.sizes = sizes
        self.accountant = LocalAccountant(self.rates, [setup.num_steps(n) for n in sizes], noise_multiplier, delta)
        self.steps = [0] * len(sizes)  # every client's DP-SGD steps in the completed rounds
        self._pending: collections.Counter = collections.Counter()  # the round's, until it ends
        self._penalty_grads: Optional[tuple] = None  # the current step's data-independent gradient

    # ---- a client's local training ---------------------------------------------------------------
    def batches(self, client, num_steps: int, gen: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """`num_steps` Poisson batches of `client`'s samples (each one in with probability q_i), drawn
        and augmented from `gen`. The batch's size is read on the host (one sync per step)."""
        data, indices, rate = self.setup.data, client.indices, self.rates[client.client_id]
        for _ in range(num_steps):
            batch = indices[torch.rand(indices.shape[0], device=indices.device, generator=gen) < rate]
            yield data.augment(data.x[batch], gen), data.y[batch]

    def optimizer(self, optimizer: torch.optim.Optimizer, client, round_idx: int, stream: int):
        """`optimizer` (the run's, for this client's round) as opacus's DPOptimizer: its step clips,
        sums, adds the noise (from the (seed, round, client[, pass]) generator) and divides by q_i n_i."""
        from opacus.optimizers import DPOptimizer

        cid = client.client_id
        keys = (round_idx, cid) + ((stream,) if stream else ())
        device = self.setup.params[0].device
        private = DPOptimizer(optimizer, noise_multiplier=self.z, max_grad_norm=self.clip_norm,
                              expected_batch_size=min(self.setup.batch_size, self.sizes[cid]),  # q_i n_i
                              generator=torch_generator(device, self.seed, LOCAL_DP_NOISE, *keys))
        private.attach_step_hook(lambda _: self._noised(cid))
        return private

    def backward(self, x: torch.Tensor, y: torch.Tensor, penalty: Callable[[], Optional[torch.Tensor]]
                 ) -> torch.Tensor:
        """The batch's mean loss, its per-sample gradients in the parameters' grad_sample (an empty
        batch: none, zero of them) and the penalty's gradient kept for the step."""
        s = self.setup
        extra = penalty()
        self._penalty_grads = None if extra is None else torch.autograd.grad(extra, s.params, allow_unused=True)
        if not y.shape[0]:
            for p in s.params:
                p.grad_sample = p.new_zeros((0, *p.shape))
            return torch.zeros((), device=y.device)
        self.grad_sampler.enable_hooks()
        with s.autocast():
            loss = s.loss_fn(s.model(x), y)
        loss.backward()
        self.grad_sampler.disable_hooks()
        return loss

    def _noised(self, client_id: int) -> None:
        """DPOptimizer's hook, after the noise and before the step: the penalty's gradient joins
        the noisy one, the per-sample gradients are freed (not kept until the next client's first
        step) and the step counts."""
        for i, p in enumerate(self.setup.params):
            if self._penalty_grads is not None and self._penalty_grads[i] is not None:
                p.grad += self._penalty_grads[i]
            p.grad_sample = p.summed_grad = None
        self._pending[client_id] += 1

    # ---- the round hook ----------------------------------------------------------------------
    def on_round_start(self) -> None:
        self._pending.clear()

    def on_round_end(self, metrics: dict) -> None:
        for cid, k in self._pending.items():
            self.steps[cid] += k
        self._pending.clear()
        metrics["local_dp_epsilon"] = self.accountant.worst(self.steps)

    def results(self) -> dict:
        return {"local_dp_epsilon": self.accountant.worst(self.steps), "local_dp_delta": self.accountant.delta,
                "local_dp_noise_multiplier": self.z, "local_dp_clip_norm": self.clip_norm}

    def state_dict(self) -> dict:
        return {"steps": list(self.steps)}

    def check_state(self, saved) -> list[str]:
        steps = saved.get("steps") if isinstance(saved, dict) else None
        ok = isinstance(steps, list) and len(steps) == len(self.steps) and all(isinstance(k, int) for k in steps)
        return [] if ok else [f"local_dp.steps: expected the DP-SGD step counts of {len(self.steps)} clients"]

    def load_state_dict(self, saved) -> None:
        self.steps = list(saved["steps"])


def install(algo, settings: DictConfig) -> Optional[LocalDP]:
    """The `local_dp:` settings into FedBase `algo` (None with local_dp.enabled=false). Refuses, before
    anything is written, a run whose schedule could spend more than local_dp.target_epsilon."""
    if not settings.enabled:
        return None
    sizes = [c.num_samples for c in algo.clients]
    if not settings.delta < 1 / max(sizes):
        raise ConfigError([f"local_dp.delta: {settings.delta:g} is not below 1 / {max(sizes)}, the largest client's "
                           "number of samples, a level at which one sample could be published outright: lower it "
                           "(e.g. local_dp.delta=1e-5)"])
    local = LocalDP(algo.setup, sizes, settings.noise_multiplier, settings.clip_norm, settings.delta, algo.cfg.seed)
    target, rounds, acc = settings.target_epsilon, algo.num_rounds, local.accountant
    if target is not None and acc.epsilon(rounds) > target:
        fit = acc.rounds_within(target, rounds)
        raise ConfigError([
            f"local_dp.target_epsilon: {rounds} rounds of DP-SGD at local_dp.noise_multiplier={local.z:g} spend "
            f"epsilon up to {acc.epsilon(rounds):.4g} at local_dp.delta={acc.delta:g} for the worst client if it "
            f"trains in every round (the bound this check takes), over the target {target:g}; "
            + (f"{fit} rounds fit: set num_rounds={fit}, or raise" if fit else "not even one round fits: raise")
            + " local_dp.noise_multiplier (or local_dp.target_epsilon)"])
    algo.setup.local_dp = local
    algo.hooks.insert(0, local)  # before the recorder writes the round's metrics
    return local

"""FedBase: the round loop shared by federated algorithms. It builds the data partition, the
clients (index tensors over one on-device dataset), the shared working model and the server;
subclasses define train_step()."""
import csv
import io
import logging
import math
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from src.algo.base import Algo, TrainingDiverged
from src.checkpoint import Checkpoint, ClientStorePart, ListPart, RngPart, ScalerPart, ServerPart
from src.client.client import Client, ClientUpdate, TrainSetup
from src.client.ema import ClientEMA
from src.client.state_store import ClientStateStore
from src.data.partition import class_histogram
from src.engine import Chain
from src.engine.base import only
from src.errors import ConfigError, UserError
from src.hooks import CheckpointCadence, EMAEvaluation, MetricsRecorder, RoundHook
from src.losses.proximal import ProximalTerm
from src.utils.io import save_json, save_text, save_torch
from src.utils.seeding import INIT, PARTITION, SELECTION, derive_seed, numpy_rng

log = logging.getLogger(__name__)

DIVERGED_ADVICE = ("Lower optimizer.lr (or algo.server.lr) or set client.grad_clip, and start again in a new run "
                   "directory (hydra.run.dir=...). results.json marks the run as diverged; no accuracy is reported "
                   "and no checkpoint of the diverged state was written.")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda but no CUDA device is visible: use device=auto or device=cpu")
    return torch.device(name)


class FedBase(Algo):
    def __init__(self, cfg: DictConfig, run_dir: Path, server: DictConfig, client: Optional[DictConfig] = None,
                 prox_mu: float = 0.0):
        """`server` and `client` are the algorithm's config nodes (config/algo/); `prox_mu` > 0 adds
        FedProx's proximal term to every client's loss, whatever the algorithm."""
        super().__init__(run_dir)
        if prox_mu < 0:
            raise ConfigError([f"algo.prox_mu: must be >= 0, got {prox_mu}"])
        self.cfg = cfg
        self.prox_mu = prox_mu
        self.client_factory = instantiate(client) if client is not None else Client
        self.device = resolve_device(cfg.device)
        self.num_rounds = cfg.num_rounds
        self.spec = instantiate(cfg.dataset)
        self.data = self.spec.load(self.device)
        torch.manual_seed(derive_seed(cfg.seed, INIT))
        self.model = instantiate(cfg.model, in_shape=list(self.data.in_shape), num_classes=self.spec.num_classes)
        self.model.to(self.device)
        self.setup = self.build_setup()
        self.clients = self.build_clients(self.partition())
        self.server = instantiate(server)
        self.server.set_global_state(self.model.state_dict())
        self.server.attach(self.setup.param_names, len(self.clients))
        self.engine = instantiate(cfg.engine)
        self.transforms: list = []  # update transforms (src/transforms.py), shared with the server
        self.server.transforms = self.transforms
        self.logger = instantiate(cfg.logger)
        self.round = 0
        self._train_loss = torch.zeros((), device=self.device)
        self._train_seen = 0
        # With client.ema.evaluate, the sample-weighted mean of the round's client EMAs is evaluated.
        e = cfg.client.ema
        self.ema_eval = EMAEvaluation(lambda: self.server.global_state) if (
            e.decay is not None and e.evaluate and e.send == "raw") else None
        self.recorder = MetricsRecorder(run_dir, self.logger, self.num_rounds)
        self.hooks: list[RoundHook] = [*([self.ema_eval] if self.ema_eval else []), self.recorder,
                                       CheckpointCadence(cfg.checkpoint.every, self.num_rounds, self.save_checkpoint)]
        self.scaler = ScalerPart(self.setup.scaler)

    # ---- building --------------------------------------------------------------------------
    def build_setup(self) -> TrainSetup:
        c = self.cfg.client
        on_cuda = self.device.type == "cuda"
        amp = c.amp if on_cuda else "off"  # CPU autocast would slow training down: fp32 there
        return TrainSetup(
            model=self.model,
            data=self.data.train,
            loss_fn=instantiate(self.cfg.loss),
            optimizer=instantiate(self.cfg.optimizer),
            batch_size=c.batch_size,
            local_epochs=c.local_epochs,
            local_steps=c.local_steps,
            seed=self.cfg.seed,
            num_rounds=self.cfg.num_rounds,
            schedule=instantiate(self.cfg.schedule),
            store=ClientStateStore(c.state_store, self.device, self.run_dir / "client_state"),
            persist_optimizer=c.persist_optimizer,
            ema=ClientEMA(self.model, c.ema.decay, c.ema.persist, c.ema.send) if c.ema.decay is not None else None,
            grad_clip=c.grad_clip,
            amp_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp),
            scaler=torch.amp.GradScaler("cuda") if amp == "fp16" else None,
            prox=ProximalTerm(self.prox_mu) if self.prox_mu > 0 else None,
        )

    def partition(self) -> list[torch.Tensor]:
        """Client index tensors on the device; the per-client class histogram goes to the run dir."""
        if self.data.natural_clients is not None:
            clients = self.data.natural_clients
            log.info("%s is naturally federated: %d clients, partition settings unused",
                     type(self.spec).__name__, len(clients))
        else:
            labels = self.data.train.y.cpu().numpy()
            try:
                parts = instantiate(self.cfg.partition).split(
                    labels, self.cfg.clients.total, self.spec.num_classes, numpy_rng(self.cfg.seed, PARTITION))
            except ValueError as e:
                raise ConfigError([f"partition: {e}"]) from None
            clients = [torch.as_tensor(p, dtype=torch.long, device=self.device) for p in parts]
        self.client_indices = clients
        return clients

    def save_histogram(self) -> None:
        labels = self.data.train.y.cpu().numpy()
        indices = [idx.cpu().numpy() for idx in self.client_indices]
        rows = class_histogram(labels, indices, self.spec.num_classes).tolist()
        text = io.StringIO()
        w = csv.writer(text)
        w.writerow(["client"] + [f"class_{c}" for c in range(self.spec.num_classes)])
        w.writerows([i] + row for i, row in enumerate(rows))
        save_text(text.getvalue(), self.run_dir / "client_class_histogram.csv")

    def build_clients(self, indices: list[torch.Tensor]) -> list[Client]:
        return [self.client_factory(i, idx, self.setup) for i, idx in enumerate(indices)]

    # ---- one round ---------------------------------------------------------------------------
    def draw(self, round_idx: int, population: int) -> list[int]:
        """`clients.per_round` of `population` (or `clients.num_per_round` of them), drawn without
        replacement from an RNG that depends only on (seed, round)."""
        c = self.cfg.clients
        count = c.num_per_round if c.num_per_round is not None else max(1, round(c.per_round * population))
        return numpy_rng(self.cfg.seed, SELECTION, round_idx).choice(population, count, replace=False).tolist()

    def select_clients(self, round_idx: int) -> list[Client]:
        return [self.clients[i] for i in self.draw(round_idx, len(self.clients))]

    def client_updates(self, clients: list[Client]):
        """Train each client as a chain of one, yielding each admitted update as it is ready."""
        return self.chain_updates([Chain.of(c) for c in clients])

    def chain_updates(self, chains: list[Chain], merge=only):
        """Train the chains on the engine, yielding each admitted update as it is ready."""
        for chain, update in self.engine.train(chains, self.round, self.server.send_data, transforms=self.transforms,
                                               merge=merge, check_stop=self.check_stop):
            if self.admit(update, chain):
                yield update

    # per-round counts of the updates admit() let in and dropped
    _admitted = _dropped = 0

    def admit(self, update: ClientUpdate, chain: Chain) -> bool:
        """Whether `chain`'s update joins the round. One with a non-finite loss or tensor never
        reaches the server: on_nonfinite=drop leaves it out of the round with its clients' staged
        state, on_nonfinite=fail stops the run."""
        if all_finite(update):
            self.account(update)
            self._admitted += 1
            return True
        n = self.round + 1
        problem = f"round {n}: {chain.label} has a non-finite training loss or update"
        if self.cfg.on_nonfinite == "fail":
            raise TrainingDiverged(n, f"{problem} (on_nonfinite=fail; on_nonfinite=drop leaves such clients out "
                                      f"of their round). {DIVERGED_ADVICE}")
        for client in chain.members:
            self.setup.store.discard(client.client_id)
        self._dropped += 1
        log.warning("%s: left out of the round (on_nonfinite=drop)", problem)
        return False

    def account(self, update: ClientUpdate) -> None:
        """Add an update to the round's training loss; the hooks see it."""
        for hook in self.hooks:
            hook.on_update(update)
        self._train_loss += update.loss_sum
        self._train_seen += update.samples_seen

    # ---- the loop ----------------------------------------------------------------------------
    def _fit(self) -> None:
        self.logger.start(self.run_dir, OmegaConf.to_container(self.cfg, resolve=True))
        if self.round:
            log.info("resuming after round %d of %d", self.round, self.num_rounds)
        while self.round < self.num_rounds:
            start = time.perf_counter()
            self._train_loss.zero_()
            self._train_seen = 0
            self._admitted = self._dropped = 0
            for hook in self.hooks:
                hook.on_round_start()
            self.train_step()
            self.check_diverged()
            self.commit_round()
            self.round += 1
            metrics = {"round": self.round, "train_loss": self._train_loss.item() / max(self._train_seen, 1),
                       "dropped_clients": self._dropped}
            if self.round % self.cfg.eval_every == 0 or self.round == self.num_rounds:
                metrics.update(self.evaluate())
                if not math.isfinite(metrics["test_loss"]):  # finite weights whose outputs overflow
                    raise TrainingDiverged(self.round, f"round {self.round}: the global model's test loss is not "
                                                       f"finite: training diverged. {DIVERGED_ADVICE}")
            metrics["round_time_s"] = time.perf_counter() - start
            self.record(metrics)
            self.check_stop()
        self.logger.finish()
        save_torch(self.server.global_state, self.run_dir / "FINAL_MODEL.pt")

    def check_diverged(self) -> None:
        """After the server update (one host sync): a round that had nothing but dropped updates,
        or whose global model is not finite, stops the run before anything is evaluated or saved."""
        n = self.round + 1
        if self._dropped and not self._admitted:
            raise TrainingDiverged(n, f"round {n}: all {self._dropped} client updates had a non-finite training loss "
                                      f"or update, so there was nothing to aggregate: training diverged. "
                                      f"{DIVERGED_ADVICE}")
        if not all_finite(self.server.state_dict()):
            raise TrainingDiverged(n, f"round {n}: the global model is not finite after the server update: training "
                                      f"diverged. {DIVERGED_ADVICE}")

    def commit_round(self) -> None:
        """Make the round's client state (and the fp16 loss scale) what a checkpoint saves: one
        taken mid-round holds the state from the start of that round, matching its global model."""
        self.setup.store.commit()
        self.scaler.commit()

    def record(self, metrics: dict) -> None:
        """The round is over with these metrics: every hook's on_round_end (the recorder writes
        them, the cadence saves a checkpoint)."""
        for hook in self.hooks:
            hook.on_round_end(metrics)

    @property
    def history(self) -> list[dict]:
        return self.recorder.history

    @property
    def ema_eval_state(self) -> Optional[dict[str, torch.Tensor]]:
        return self.ema_eval.state if self.ema_eval is not None else None

    @torch.no_grad()
    def evaluate(self, state: Optional[dict[str, torch.Tensor]] = None) -> dict:
        """Hard-label cross-entropy and accuracy of `state` (default: the global model, or the
        clients' mean EMA with client.ema.evaluate) on the test set; with tta=hflip the prediction
        is the mean of the softmax outputs for x and its mirror image."""
        if state is None:
            state = self.ema_eval_state if self.ema_eval_state is not None else self.server.global_state
        self.setup.load(state)
        self.model.eval()
        test = self.data.test
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device)
        for x, y in zip(test.x.split(self.cfg.eval_batch_size), test.y.split(self.cfg.eval_batch_size)):
            log_probs = predict_log_probs(self.model, x, self.cfg.tta)
            loss_sum += F.nll_loss(log_probs, y, reduction="sum")
            correct += (log_probs.argmax(1) == y).sum()
        loss, acc = (torch.stack([loss_sum, correct]) / len(test)).tolist()
        return {"test_loss": loss, "test_accuracy": acc}

    # ---- state -------------------------------------------------------------------------------
    def checkpoint_parts(self) -> dict:
        """The resume checkpoint's parts, by key (src/checkpoint.py); the keys are today's file format."""
        hooks = {h.key: h for h in self.hooks if h.key is not None}
        return {"server": ServerPart(self.server, self.device), **hooks, "rng": RngPart(),
                "client_states": ClientStorePart(self.setup.store, self.setup, len(self.clients)),
                "scaler": self.scaler, "transforms": ListPart("transforms", self.transforms)}

    @property
    def checkpoint(self) -> Checkpoint:
        """Built on use, so that hooks and transforms added after construction are parts too."""
        return Checkpoint(type(self).__name__, self.cfg, self.checkpoint_parts(), optional=("transforms",))

    def state_dict(self) -> dict:
        return self.checkpoint.state_dict(self.round)

    def check_state(self, state: dict) -> None:
        """Refuse a checkpoint that is not one of this run before anything is loaded or written."""
        self.checkpoint.check(state)

    def load_state_dict(self, state: dict) -> None:
        """Everything is checked and loaded in memory before the run directory is written."""
        self.checkpoint.load(state)
        self.round = state["round"]

    def start(self, state: Optional[dict]) -> None:
        """The run is accepted (src/run.py): its first writes into the run directory. A fresh start
        begins with an empty metrics.jsonl and client state store."""
        self.save_histogram()
        if state is None:
            self.setup.store.reset()
            self.recorder.reset()
        else:
            self.load_state_dict(state)

    def save_checkpoint(self) -> None:
        super().save_checkpoint()
        save_torch(self.server.global_state, self.run_dir / "GLOBAL_MODEL.pt")
        # what src/evaluate.py needs, beside config.yaml, to rebuild the model
        save_json({"in_shape": list(self.data.in_shape), "num_classes": self.spec.num_classes},
                  self.run_dir / "model.json")
        if self.cfg.checkpoint.keep_round_models:
            save_torch(self.server.global_state, self.run_dir / f"GLOBAL_MODEL_round_{self.round}.pt")

    def results(self) -> dict:
        """The run's summary; a diverged run has no final model and null accuracies."""
        diverged = self.diverged_round is not None
        evaluated = [] if diverged else [m for m in self.history if "test_accuracy" in m]
        final = evaluated[-1] if evaluated else {}
        return {
            "algo": type(self).__name__,
            "rounds": self.diverged_round - 1 if diverged else self.round,  # completed rounds
            "diverged": diverged,
            "diverged_round": self.diverged_round,
            "dropped_clients": sum(m.get("dropped_clients", 0) for m in self.history),
            "final_test_accuracy": final.get("test_accuracy"),
            "final_test_loss": final.get("test_loss"),
            "best_test_accuracy": max((m["test_accuracy"] for m in evaluated), default=None),
            "train_time_s": sum(m["round_time_s"] for m in self.history),
        }


def all_finite(obj) -> bool:
    """Whether every floating-point tensor in `obj` (a tensor or nested dicts, lists and tuples,
    e.g. a ClientUpdate) is finite, with one host sync. The largest magnitude per tensor is
    NaN or inf exactly when the tensor holds one, and cannot overflow as a sum would."""
    tensors = [t for t in _tensors(obj) if t.is_floating_point() and t.numel()]  # no inf-norm of an empty one
    peaks = torch._foreach_norm(tensors, ord=math.inf)
    return bool(torch.stack([p.float() for p in peaks]).isfinite().all())


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def predict_log_probs(model: torch.nn.Module, x: torch.Tensor, tta: str) -> torch.Tensor:
    """Log of the predicted class probabilities; with tta=hflip, of the mean of the softmax
    outputs for x and x mirrored along its width."""
    log_probs = F.log_softmax(model(x).float(), dim=1)
    if tta == "hflip":
        flipped = F.log_softmax(model(x.flip(-1)).float(), dim=1)
        log_probs = torch.logsumexp(torch.stack([log_probs, flipped]), dim=0) - math.log(2.0)
    return log_probs

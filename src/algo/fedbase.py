"""FedBase: the round loop shared by federated algorithms. It builds the data partition, the
clients (index tensors over one on-device dataset), the shared working model and the server;
subclasses define train_step()."""
import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Optional

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from src.algo.base import Algo, TrainingDiverged, TrainingInterrupted
from src.checkpoint import Checkpoint, ClientStorePart, ListPart, RngPart, ScalerPart, ServerPart
from src.client.client import Client, ClientUpdate, TrainSetup
from src.client.ema import ClientEMA
from src.client.state_store import ClientStateStore
from src.data.device_data import DeviceDataset
from src.data.federation import histogram_csv, split_federation
from src.engine import Chain
from src.engine.base import only
from src.errors import ConfigError, UserError
from src.evaluation import ClientEvaluation, pooled_scores
from src.hooks import CheckpointCadence, EMAEvaluation, JsonlTable, MetricsRecorder, ModelSelection, RoundHook
from src.losses.proximal import ProximalTerm
from src import compression, privacy
from src import local_dp, secagg
from src.system import SystemModel
from src.utils.io import save_json, save_text, save_torch
from src.utils.seeding import INIT, SELECTION, derive_seed, numpy_rng

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
    # Whether a chain is one device, so that system.* (src/system.py: dropout, stragglers) applies;
    # FedSeq's superclients and Centralized's union of all data are not.
    clients_are_devices = True

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
        self.val_data = None if self.val_indices is None else DeviceDataset(
            self.data.train.x[self.val_indices], self.data.train.y[self.val_indices], self.spec.num_classes)
        self.client_evaluation = None if self.client_test_indices is None else ClientEvaluation(
            self.setup, self.client_indices, self.client_test_indices, cfg.eval_batch_size, cfg.tta,
            cfg.evaluation.finetune_steps)
        self.client_table = JsonlTable(run_dir / "client_metrics.jsonl")
        self.overrides: list[str] = []  # the command line's overrides, for results.json (src/run.py sets them)
        self.resume_from: Optional[Path] = None  # the resume.pt continued, if not this run's own (src/run.py sets it)
        self._checked_state: Optional[dict] = None
        self.stopped_early = False
        self.server = instantiate(server)
        self.server.aggregator = instantiate(cfg.aggregator)  # the weighted mean or a robust rule (server/robust.py)
        self.check_round_size()
        self.server.set_global_state(self.model.state_dict())
        self.server.attach(self.setup.param_names, len(self.clients))
        self.engine = instantiate(cfg.engine)
        self.transforms: list = []  # update transforms (src/transforms.py), shared with the server
        self.server.transforms = self.transforms
        # a distributed run's other processes (rank > 0) log nothing and write no checkpoint: rank 0 does
        self.logger = instantiate(cfg.logger, **({"mode": "disabled"} if self.engine.rank else {}))
        self.round = 0
        self._train_loss = torch.zeros((), device=self.device)
        self._train_seen = 0
        # With client.ema.evaluate, the sample-weighted mean of the round's client EMAs is evaluated.
        e = cfg.client.ema
        self.ema_eval = EMAEvaluation(lambda: self.server.global_state) if (
            e.decay is not None and e.evaluate and e.send == "raw") else None
        self.recorder = MetricsRecorder(run_dir, self.logger, self.num_rounds)
        self.selection = ModelSelection(run_dir, lambda: self.recorder.history, self.evaluated_state,
                                        cfg.early_stopping.metric, cfg.early_stopping.patience) if (
            self.val_data is not None) else None
        self.hooks: list[RoundHook] = [*([self.ema_eval] if self.ema_eval else []),
                                       *([self.selection] if self.selection else []), self.recorder,
                                       CheckpointCadence(cfg.checkpoint.every, self.num_rounds, self.save_checkpoint)]
        self.scaler = ScalerPart(self.setup.scaler)
        self.system = SystemModel(cfg.seed, len(self.clients), lambda chain: self.setup.num_steps(chain.num_samples),
                                  **cfg.system)
        if self.system.enabled:
            if not self.clients_are_devices:
                raise ConfigError([f"system: {type(self).__name__} does not train one device per update, so client "
                                   "dropout and stragglers do not apply: use system.dropout=0 system.deadline_steps=null"])
            self.hooks.insert(0, self.system)  # before the recorder writes the round's metrics
        self.attack = instantiate(cfg.attack)  # simulated attackers (src/attacks.py); attack=none adds nothing
        self.attack.install(self)
        # update compression (src/compression.py): after the attack, before DP's clipping; none adds nothing
        self.compression = instantiate(cfg.compression)
        self.compression.install(self)
        # what a client receives: the server's data, or with broadcast.bits a quantized global model
        self.send_data = self.server.send_data
        compression.install_broadcast(self, cfg.broadcast.bits)
        # central differential privacy (src/privacy.py): the last client transform; None with dp.enabled=false
        self.dp = privacy.install(self, cfg.dp)
        # local DP-SGD on every client (src/local_dp.py): a round hook; None with local_dp.enabled=false
        self.local_dp = local_dp.install(self, cfg.local_dp)
        # secure aggregation (src/secagg.py): the server's intercept; None with secagg.enabled=false
        self.secagg = secagg.install(self, **cfg.secagg)
        self.engine.prepare(self.setup, self.clients)  # the engine refuses what it cannot train, before any write

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
        """Client index tensors on the device (src/data/federation.py), with the validation split
        and each client's own test data beside them."""
        federation = split_federation(self.data, self.spec, self.cfg)
        as_tensor = lambda a: torch.as_tensor(a, dtype=torch.long, device=self.device)  # noqa: E731
        self.val_indices = None if federation.val is None else as_tensor(federation.val)
        self.client_test_indices = None if federation.test is None else [as_tensor(p) for p in federation.test]
        self.client_indices = [as_tensor(p) for p in federation.train]
        return self.client_indices

    def save_histogram(self) -> None:
        indices = [idx.cpu().numpy() for idx in self.client_indices]
        save_text(histogram_csv(self.data.train.y.cpu().numpy(), indices, self.spec.num_classes),
                  self.run_dir / "client_class_histogram.csv")

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

    def updates_per_round(self) -> Optional[int]:
        """How many updates a round sends the server before any is dropped (None: not known yet)."""
        return len(self.select_clients(0))

    def check_round_size(self) -> None:
        """Refuse an aggregator that no round has enough updates for (Krum's n > 2f+2) as soon as the
        count is known: when built, before the run directory is written (FedSeq: once grouped)."""
        count = self.updates_per_round()
        problem = None if count is None else self.server.aggregator.too_few(count)
        if problem:
            raise ConfigError([problem])

    def client_updates(self, clients: list[Client]):
        """Train each client as a chain of one, yielding each admitted update as it is ready."""
        return self.chain_updates([Chain.of(c) for c in clients])

    def chain_updates(self, chains: list[Chain], merge=only):
        """Train the chains on the engine, yielding each admitted update as it is ready. The system
        model leaves out the clients that fail to report and cuts the stragglers' work."""
        self._selected += [c.client_id for chain in chains for c in chain.members]
        chains = self.system.plan(self.round, chains)
        for chain, update in self.engine.train(chains, self.round, self.send_data, transforms=self.transforms,
                                               merge=merge, check_stop=self.check_stop):
            if self.admit(update, chain):
                yield update

    # per-round counts of the updates admit() let in and dropped
    _admitted = _dropped = 0
    _selected: list[int] = []  # the clients selected this round (those that drop out included)

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
            self._selected = []
            for hook in self.hooks:
                hook.on_round_start()
            self.train_step()
            self.check_diverged()
            self.commit_round()
            self.round += 1
            metrics = {"round": self.round, "train_loss": self._train_loss.item() / max(self._train_seen, 1),
                       "dropped_clients": self._dropped, **self.server.aggregator.metrics()}
            if self.due(self.cfg.eval_every):
                metrics.update(self.evaluate())
                if not math.isfinite(metrics["test_loss"]):  # finite weights whose outputs overflow
                    raise TrainingDiverged(self.round, f"round {self.round}: the global model's test loss is not "
                                                       f"finite: training diverged. {DIVERGED_ADVICE}")
            if self.client_evaluation is not None and self.due(self.cfg.evaluation.clients_every or self.cfg.eval_every):
                client_metrics, table = self.client_evaluation(self.evaluated_state(), self.round)
                metrics.update(client_metrics)
                self.client_table.append({"round": self.round, **table})
            metrics["round_time_s"] = time.perf_counter() - start
            metrics["clients"] = sorted(self._selected)
            self.record(metrics)
            stop = self.engine.agree_stop(self._stop_signal)  # every process of a distributed run stops here
            if stop is not None:
                raise TrainingInterrupted(stop)
            if self.selection is not None and self.selection.stop:
                self.stopped_early = True
                log.info("early stopping after round %d: %s has not improved for %d rounds", self.round,
                         self.selection.metric, self.selection.patience)
                self.save_checkpoint()
                break
        self.logger.finish()
        save_torch(self.server.global_state, self.run_dir / "FINAL_MODEL.pt")

    def due(self, every: int) -> bool:
        """Whether the round just completed is one of every `every` rounds, or the last."""
        return self.round % every == 0 or self.round == self.num_rounds

    def evaluated_state(self) -> dict[str, torch.Tensor]:
        """The model that evaluation scores: the global model, or the clients' mean EMA with client.ema.evaluate."""
        return self.ema_eval_state if self.ema_eval_state is not None else self.server.global_state

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

    def evaluate(self, state: Optional[dict[str, torch.Tensor]] = None) -> dict:
        """Hard-label cross-entropy and accuracy of `state` (default: the global model, or the
        clients' mean EMA with client.ema.evaluate) on the test set and, with dataset.val_fraction,
        on the validation split; with tta=hflip the prediction is the mean of the softmax outputs
        for x and its mirror image."""
        self.setup.load(self.evaluated_state() if state is None else state)
        batch, tta = self.cfg.eval_batch_size, self.cfg.tta
        loss, acc = pooled_scores(self.model, self.data.test, batch, tta, self.engine)
        metrics = {"test_loss": loss, "test_accuracy": acc}
        if self.val_data is not None:
            metrics["val_loss"], metrics["val_accuracy"] = pooled_scores(self.model, self.val_data, batch, tta,
                                                                         self.engine)
        return metrics

    # ---- state -------------------------------------------------------------------------------
    def checkpoint_parts(self) -> dict:
        """The resume checkpoint's parts, by key (src/checkpoint.py); the keys are today's file format."""
        hooks = {h.key: h for h in self.hooks if h.key is not None}
        return {"server": ServerPart(self.server, self.device), **hooks, "rng": RngPart(),
                "client_states": ClientStorePart(self.setup.store, self.setup, len(self.clients),
                                                 self.client_state_source),
                "scaler": self.scaler, "transforms": ListPart("transforms", self.transforms)}

    @property
    def client_state_source(self) -> Path:
        """Where the disk store's files that a checkpoint references lie: beside its resume.pt."""
        return (self.resume_from or self.checkpoint_path).parent / self.setup.store.directory.name

    @property
    def checkpoint(self) -> Checkpoint:
        """Built on use, so that hooks and transforms added after construction are parts too."""
        return Checkpoint(type(self).__name__, self.cfg, self.checkpoint_parts(), optional=("transforms",))

    def state_dict(self) -> dict:
        return self.checkpoint.state_dict(self.round)

    def check_state(self, state: dict) -> None:
        """Refuse a checkpoint that is not one of this run before anything is loaded or written."""
        self.checkpoint.check(state)
        self._checked_state = state  # loading it checks no file twice (disk-store clients: one read each)

    def load_state_dict(self, state: dict) -> None:
        """Everything is checked and loaded in memory before the run directory is written."""
        self.checkpoint.load(state, checked=state is self._checked_state)
        self._checked_state = None
        self.round = state["round"]

    def start(self, state: Optional[dict]) -> None:
        """The run is accepted (src/run.py): its first writes into the run directory. A fresh start
        begins with an empty metrics.jsonl and client state store."""
        self.save_histogram()
        if state is None:
            self.setup.store.reset()
            self.recorder.reset()
            self.client_table.keep_rounds(0)
        else:
            self.load_state_dict(state)
            self.client_table.keep_rounds(self.round)  # rounds after the checkpoint are trained again

    def save_checkpoint(self) -> None:
        if self.engine.rank:
            return
        if len(self.history) != self.round:  # stopped after a round's aggregation, before its record (e.g. a
            # process of a distributed run died during evaluation): that state would not resume
            log.warning("round %d stopped before its metrics were recorded: the last resume checkpoint stays", self.round)
            return
        super().save_checkpoint()
        self.setup.store.prune()  # client files only the replaced resume.pt referenced
        save_torch(self.server.global_state, self.run_dir / "GLOBAL_MODEL.pt")
        # what src/evaluate.py needs, beside config.yaml, to rebuild the model
        save_json({"in_shape": list(self.data.in_shape), "num_classes": self.spec.num_classes},
                  self.run_dir / "model.json")
        if self.cfg.checkpoint.keep_round_models:
            save_torch(self.server.global_state, self.run_dir / f"GLOBAL_MODEL_round_{self.round}.pt")

    def results(self) -> dict:
        """The run's summary; a diverged run has no final model and null accuracies. With a
        validation split, the best round is selected on validation (never on test) and its test
        accuracy reported; without one, best_test_accuracy is the highest test accuracy seen, a
        figure selected on test (optimistic)."""
        diverged = self.diverged_round is not None
        evaluated = [] if diverged else [m for m in self.history if "test_accuracy" in m]
        final = evaluated[-1] if evaluated else {}
        per_client = [] if diverged else [m for m in self.history if "client_acc_mean" in m]
        results = {
            "algo": type(self).__name__,
            "seed": self.cfg.seed,
            "overrides": list(self.overrides),
            "config_sha256": config_hash(self.cfg),
            "rounds": self.diverged_round - 1 if diverged else self.round,  # completed rounds
            "diverged": diverged,
            "diverged_round": self.diverged_round,
            "stopped_early": self.stopped_early,
            "dropped_clients": sum(m.get("dropped_clients", 0) for m in self.history),
            "final_test_accuracy": final.get("test_accuracy"),
            "final_test_loss": final.get("test_loss"),
        }
        if self.selection is None:
            results["best_test_accuracy"] = max((m["test_accuracy"] for m in evaluated), default=None)
        else:
            best = self.selection.best(evaluated) or {}
            metric = self.selection.metric
            results.update({"selection_metric": metric, "best_round": best.get("round"),
                            f"best_{metric}": best.get(metric), "best_val_test_accuracy": best.get("test_accuracy"),
                            "final_val_accuracy": final.get("val_accuracy")})
        if per_client:
            results.update({f"final_{k}": v for k, v in per_client[-1].items()
                            if k.startswith(("client_acc_", "finetuned_acc_"))})
        if self.dp is not None:
            results.update(self.dp.results(results["rounds"]))
        if self.local_dp is not None:
            results.update(self.local_dp.results())
        results.update(self.compression.totals(self.history))  # bytes up and down, summed
        results["train_time_s"] = sum(m["round_time_s"] for m in self.history)
        return results


def config_hash(cfg: DictConfig) -> str:
    """sha256 of the resolved config as canonical JSON: equal for runs with the same settings."""
    text = json.dumps(OmegaConf.to_container(cfg, resolve=True), sort_keys=True, separators=(",", ":"),
                      allow_nan=False)  # validated configs hold finite numbers only
    return hashlib.sha256(text.encode()).hexdigest()


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

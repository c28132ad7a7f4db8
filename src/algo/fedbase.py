"""FedBase: the round loop shared by federated algorithms. It builds the data partition, the
clients (index tensors over one on-device dataset), the shared working model and the server;
subclasses define train_step()."""
import csv
import io
import json
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
from src.client.client import Client, ClientUpdate, TrainSetup
from src.client.ema import ClientEMA
from src.client.state_store import ClientStateStore, copy_to
from src.data.partition import class_histogram
from src.errors import ConfigError, UserError
from src.losses.proximal import ProximalTerm
from src.server.fedavg import WeightedMean
from src.utils.io import save_json, save_text, save_torch
from src.utils.seeding import INIT, PARTITION, SELECTION, derive_seed, numpy_rng, rng_state, set_rng_state

log = logging.getLogger(__name__)

DIVERGED_ADVICE = ("Lower optimizer.lr (or algo.server.lr) or set client.grad_clip, and start again in a new run "
                   "directory (hydra.run.dir=...). results.json marks the run as diverged; no accuracy is reported "
                   "and no checkpoint of the diverged state was written.")

# Settings added since checkpoints were first written, with the value that reproduces those runs:
# a checkpoint without them still resumes.
ADDED_SETTINGS = {"algo.prox_mu": 0.0}
CHECKPOINT_PARTS = ("round", "server", "client_states", "scaler", "ema_eval_state", "rng", "history", "config")
# Settings that may differ between a checkpoint and the run resuming it: they do not change what
# the completed rounds computed.
# on_nonfinite decides only what happens once an update is not finite, which metrics.jsonl records.
RESUMABLE_CHANGES = ("num_rounds", "eval_every", "eval_batch_size", "device", "checkpoint", "logger", "resume", "name",
                     "on_nonfinite")


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
        self.logger = instantiate(cfg.logger)
        # With client.ema.evaluate, the sample-weighted mean of the round's client EMAs is evaluated.
        self.eval_ema = cfg.client.ema.decay is not None and cfg.client.ema.evaluate and cfg.client.ema.send == "raw"
        self.ema_eval_state: Optional[dict[str, torch.Tensor]] = None
        self._scaler_state = self.setup.scaler.state_dict() if self.setup.scaler is not None else None
        self._ema_mean: Optional[WeightedMean] = None
        self.round = 0
        self.history: list[dict] = []
        self._train_loss = torch.zeros((), device=self.device)
        self._train_seen = 0

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
        """Train the clients one after another, yielding each admitted update as it is ready."""
        for client in clients:
            self.check_stop()
            client.receive_data(self.server.send_data())
            client.client_update(self.round)
            update: ClientUpdate = client.send_data()
            if self.admit(update, [client], f"client {client.client_id}"):
                yield update

    # per-round counts of the updates admit() let in and dropped
    _admitted = _dropped = 0

    def admit(self, update: ClientUpdate, clients: list[Client], who: str) -> bool:
        """Whether `update` (trained by `clients`, described as `who`) joins the round. One with a
        non-finite loss or tensor never reaches the server: on_nonfinite=drop leaves it out of the
        round with its clients' staged state, on_nonfinite=fail stops the run."""
        if all_finite(update):
            self.account(update)
            self._admitted += 1
            return True
        n = self.round + 1
        problem = f"round {n}: {who} has a non-finite training loss or update"
        if self.cfg.on_nonfinite == "fail":
            raise TrainingDiverged(n, f"{problem} (on_nonfinite=fail; on_nonfinite=drop leaves such clients out "
                                      f"of their round). {DIVERGED_ADVICE}")
        for client in clients:
            self.setup.store.discard(client.client_id)
        self._dropped += 1
        log.warning("%s: left out of the round (on_nonfinite=drop)", problem)
        return False

    def account(self, update: ClientUpdate) -> None:
        """Add an update to the round's training loss (and to the clients' mean EMA, if evaluated)."""
        if self._ema_mean is not None:
            self._ema_mean.add(update.ema_state, float(update.num_samples))
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
            if self.eval_ema:
                self._ema_mean = WeightedMean(self.server.global_state)
            self.train_step()
            self.check_diverged()
            self.commit_round()
            if self._ema_mean is not None:
                self.ema_eval_state = self._ema_mean.result() or self.ema_eval_state
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
            if self.round % self.cfg.checkpoint.every == 0 or self.round == self.num_rounds:
                self.save_checkpoint()
            self.check_stop()
        self.logger.finish()

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
        if self.setup.scaler is not None:
            self._scaler_state = self.setup.scaler.state_dict()

    def record(self, metrics: dict) -> None:
        strict = strict_metrics(metrics)
        self.history.append(strict)
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(strict, allow_nan=False) + "\n")
        self.logger.log(metrics, step=self.round)
        line = f"round {self.round}/{self.num_rounds}  train_loss {metrics['train_loss']:.4f}"
        if "test_accuracy" in metrics:
            line += f"  test_loss {metrics['test_loss']:.4f}  test_acc {100 * metrics['test_accuracy']:.2f}%"
        if metrics.get("dropped_clients"):
            line += f"  dropped {metrics['dropped_clients']} non-finite"
        log.info("%s  (%.2f s)", line, metrics["round_time_s"])

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Hard-label cross-entropy and accuracy of the global model (or the clients' mean EMA,
        with client.ema.evaluate) on the test set; with tta=hflip the prediction is the mean of
        the softmax outputs for x and its mirror image."""
        self.setup.load(self.ema_eval_state if self.ema_eval_state is not None else self.server.global_state)
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
    def state_dict(self) -> dict:
        return {
            "round": self.round,
            "server": self.server.state_dict(),
            "client_states": self.setup.store.state_dict(),
            "scaler": self._scaler_state,
            "ema_eval_state": self.ema_eval_state,
            "rng": rng_state(),
            "history": self.history,
            "config": OmegaConf.to_container(self.cfg, resolve=True),
        }

    def check_state(self, state: dict) -> None:
        """Refuse a checkpoint that is not one of this run before anything is loaded or written:
        its settings, then the keys, shapes and dtypes of every part."""
        missing = [k for k in CHECKPOINT_PARTS if k not in state]
        if missing:
            raise UserError(f"the resume checkpoint lacks {', '.join(missing)}: it was not written by this framework's "
                            f"{type(self).__name__}. Pass resume= a checkpoint of this run, or start afresh in a new "
                            "directory (hydra.run.dir=NEW_DIR). Nothing was changed.")
        check_resumable(state["config"], OmegaConf.to_container(self.cfg, resolve=True), self.cfg)
        problems = mismatches(state["server"], self.server.state_dict(), "server")
        if state["ema_eval_state"] is not None:
            problems += mismatches(state["ema_eval_state"], self.server.global_state, "ema_eval_state")
        problems += mismatches(state["rng"].get("torch") if isinstance(state["rng"], dict) else state["rng"],
                               torch.get_rng_state(), "rng.torch")
        if not isinstance(state["client_states"], dict):
            problems.append("client_states: not a mapping")
        else:
            for cid, client_state in state["client_states"].items():
                if not (str(cid).isdigit() and int(cid) < len(self.clients)):
                    problems.append(f"client_states: client {cid!r} is not one of this run's {len(self.clients)}")
                else:
                    problems += self.client_state_mismatches(client_state, f"client_states.{cid}")
        if not isinstance(state["history"], list) or not all(isinstance(m, dict) for m in state["history"]):
            problems.append("history: not a list of per-round metrics")
        if not 0 <= state["round"] or len(state["history"]) != state["round"]:
            problems.append(f"round {state['round']}: does not match the {len(state['history'])} rounds of its history")
        if problems:
            shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
            raise UserError(f"the resume checkpoint does not fit this run's model and algorithm ({shown}): it was "
                            "written by another model or code version. Pass resume= a checkpoint of this run, or "
                            "start afresh in a new directory (hydra.run.dir=NEW_DIR). Nothing was changed.")

    def client_state_mismatches(self, state, path: str) -> list[str]:
        """A client's persisted state against this model: per-parameter tensors (EMA, controls,
        gradient state) by name, optimizer moments by parameter index."""
        if not isinstance(state, dict):
            return [f"{path}: not a mapping"]
        live, params = self.setup.live_state, self.setup.params
        problems = []
        for part, value in state.items():
            if part == "optimizer" and isinstance(value, dict):
                for idx, moments in value.get("state", {}).items():
                    if not (isinstance(idx, int) and 0 <= idx < len(params)):
                        problems.append(f"{path}.optimizer: parameter {idx!r} is not one of the model's {len(params)}")
                        continue
                    for name, t in moments.items():
                        if isinstance(t, torch.Tensor) and t.dim() and t.shape != params[idx].shape:
                            problems.append(f"{path}.optimizer.{idx}.{name}: shape {tuple(t.shape)}, "
                                            f"the model's parameter has {tuple(params[idx].shape)}")
            elif isinstance(value, dict):
                for name, t in value.items():
                    if name in live and isinstance(t, torch.Tensor):
                        problems += mismatches(t, live[name], f"{path}.{part}.{name}", dtype=False)
                    elif name not in live and name != "n_averaged":
                        problems.append(f"{path}.{part}.{name}: the model has no such entry")
        return problems

    def load_state_dict(self, state: dict) -> None:
        """Everything is checked and loaded in memory before the run directory is written."""
        self.check_state(state)
        self.round = state["round"]
        self.server.load_state_dict(copy_to(state["server"], self.device))  # checkpoints load on the CPU
        if self.setup.scaler is not None and state["scaler"] is not None:
            self.setup.scaler.load_state_dict(state["scaler"])
            self._scaler_state = state["scaler"]
        if state["ema_eval_state"] is not None:
            self.ema_eval_state = {k: v.to(self.device) for k, v in state["ema_eval_state"].items()}
        set_rng_state(state["rng"])
        self.history = [strict_metrics(m) for m in state["history"]]  # older checkpoints may hold NaN
        self.setup.store.load_state_dict(state["client_states"])  # the disk store writes its files
        # metrics.jsonl may hold rounds after the checkpoint: rewrite it from the checkpoint
        save_text("".join(json.dumps(m, allow_nan=False) + "\n" for m in self.history), self.run_dir / "metrics.jsonl")

    def start(self, state: Optional[dict]) -> None:
        """The run is accepted (src/run.py): its first writes into the run directory. A fresh start
        begins with an empty metrics.jsonl and client state store."""
        self.save_histogram()
        if state is None:
            self.setup.store.reset()
            save_text("", self.run_dir / "metrics.jsonl")
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
        if not diverged:
            save_torch(self.server.global_state, self.run_dir / "FINAL_MODEL.pt")
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


def strict_metrics(metrics: dict) -> dict:
    """`metrics` for strict JSON: a non-finite number (e.g. a float32 loss sum that overflowed) becomes None."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}


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


def settings_differences(saved: dict, current: dict, fixed: tuple[str, ...] = ()) -> list[str]:
    """The settings that shape training and differ between two configs, as 'key: checkpoint a, now b'."""
    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            key = f"{prefix}{k}"
            out.update(flat(v, key + ".") if isinstance(v, dict) else {key: v})
        return out

    a, b = {**ADDED_SETTINGS, **flat(saved)}, flat(current)
    differ = sorted(k for k in a.keys() | b.keys()
                    if a.get(k) != b.get(k) and (k.split(".")[0] not in RESUMABLE_CHANGES or k in fixed))
    return [f"{k}: checkpoint {a.get(k)!r}, now {b.get(k)!r}" for k in differ]


def check_resumable(saved: dict, current: dict, cfg: DictConfig) -> None:
    """A checkpoint continues only the run it came from: compare every setting that shapes training."""
    schedule = instantiate(cfg.schedule)
    # a continuous non-constant LR schedule spans num_rounds: changing it changes the LR
    fixed = ("num_rounds",) if schedule.continuous and not schedule.is_constant else ()
    differ = settings_differences(saved, current, fixed)
    if differ:
        raise UserError(
            f"the resume checkpoint was written by a run with other settings ({'; '.join(differ[:10])}). "
            "Start the new settings in a new run directory (hydra.run.dir=...), or restore the old values "
            "to continue. The checkpoint was left untouched.")


def mismatches(saved, reference, path: str, dtype: bool = True) -> list[str]:
    """Where `saved` differs from `reference` in structure: keys of mappings, lengths of sequences,
    shapes (and dtypes) of tensors. Other values are not compared."""
    if isinstance(reference, torch.Tensor):
        if not isinstance(saved, torch.Tensor):
            return [f"{path}: {type(saved).__name__}, expected a tensor"]
        if saved.shape != reference.shape:
            return [f"{path}: shape {tuple(saved.shape)}, expected {tuple(reference.shape)}"]
        return [f"{path}: dtype {saved.dtype}, expected {reference.dtype}"] if dtype and saved.dtype != reference.dtype else []
    if isinstance(reference, dict):
        if not isinstance(saved, dict):
            return [f"{path}: {type(saved).__name__}, expected a mapping"]
        problems = [f"{path}.{k}: missing" for k in reference if k not in saved]
        problems += [f"{path}.{k}: not in this model" for k in saved if k not in reference]
        return problems + [p for k in reference if k in saved for p in mismatches(saved[k], reference[k], f"{path}.{k}", dtype)]
    if isinstance(reference, (list, tuple)):
        if not isinstance(saved, (list, tuple)) or len(saved) != len(reference):
            return [f"{path}: expected a sequence of {len(reference)}"]
        return [p for i, (s, r) in enumerate(zip(saved, reference)) for p in mismatches(s, r, f"{path}.{i}", dtype)]
    return []

"""FedSeq (Zaccone et al., "Speeding up Heterogeneous Federated Learning with Sequentially Trained
Superclients", ICPR 2022, arXiv:2201.10899; Sec. 3, Algorithm 1).

Before training, every client is described by a C-vector (the confidence vector of a small model it
pre-trains on its own data, or, as an oracle, its label histogram) and the clients are grouped into
*superclients* whose pooled data is close to uniform over the classes (src/algo/fedseq_grouping.py).
Each round the server samples a fraction `clients.per_round` of the superclients; a sampled
superclient receives the global model, passes it through its clients one after another (each runs
the ordinary local training, so every client-trainer switch and FedProx apply) in a freshly shuffled
order, `superclient_passes` times, and returns the final weights. The server aggregates superclients
as FedAvg aggregates clients (weight: the superclient's number of samples).

Choices the paper leaves open, and where this implementation departs from the authors' code:
- Exemplars. The confidence vectors score one shared, class-balanced set of `exemplars_per_class`
  samples per class. The authors take them out of the test set; here they are drawn (seeded) from
  the pooled training data, so the test set stays the one every algorithm is evaluated on and no
  test sample shapes training. A class with fewer samples contributes all it has, and its entry is
  the mean (not the sum) of its exemplars' confidences, so short classes are not under-weighted.
- Pre-training model. `pretrain_model=linear` (default) is a softmax-linear classifier on the
  flattened inputs; `pretrain_model=model` pre-trains the run's own architecture (the authors use
  LeNet for CIFAR), which must be buffer-free (no BatchNorm). All clients are pre-trained at once on
  the training device (fedseq_grouping.pretrain_confidence) with plain SGD (the authors' code adds
  weight decay 4e-4; their defaults: 10 epochs, lr 0.01, the clients' batch size).
- FedProx (and any client that anchors at `received["global_state"]`, e.g. FedDyn): every client of
  the chain receives the global model the superclient received, so its anchor is that model, not
  the weights handed over by the previous client; the weights themselves are not reloaded.
- FedDyn: the server counts clients, not superclients (its m), and a superclient sends the sum of
  its clients' gradient-state changes, so h stays the mean of every client's state and FedDyn
  keeps its fixed point. Updated from the superclients' models alone, h is not that mean, and a toy
  (tests/test_feddyn.py) settled at 3.5 where the optimum is 2.
- Passes. Pass p > 0 draws its batches from a stream of its own (Client.client_update's
  `stream`); pass 0 uses the batches FedAvg would. The round index given to the clients (LR schedule position, persisted state) is
  the real round. Within a round a client's persisted state is staged until the round ends, so with
  several passes every pass starts from the state committed at the end of the previous round.
- EMA (client.ema): the chain hands over the raw weights; the superclient sends what its last
  client sends.

Randomness is a pure function of the seed: pre-training, exemplars, grouping, superclient sampling
(the SELECTION stream, as FedBase) and chain order (seed, round, superclient, pass). The groups are
built when training starts and stored in the resume checkpoint; a resumed run takes them from there
(no second pre-training)."""
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from src.algo.fedbase import FedBase
from src.algo.fedseq_grouping import (MEASURES, METHODS, balanced_exemplars, confidence_vectors, label_histogram,
                                      make_superclients, pretrain_confidence)
from src.client.client import Client
from src.engine import Chain, Link, SequentialEngine
from src.errors import ConfigError, UserError
from src.utils.io import save_json
from src.utils.seeding import numpy_rng, torch_generator

log = logging.getLogger(__name__)

# Purposes of FedSeq's random streams (src.utils.seeding uses 0-3); far from them so they never coincide.
FEDSEQ_PRETRAIN, FEDSEQ_EXEMPLARS, FEDSEQ_GROUPING, FEDSEQ_ORDER = 1001, 1002, 1003, 1004

SUPERCLIENTS_FILE = "superclients.json"
REPRESENTATIONS = ("confidence", "label_histogram")
PRETRAIN_MODELS = ("linear", "model")


@dataclass
class Superclient:
    """A group of clients trained in sequence; `index` is its position in FedSeq.superclients."""

    index: int
    clients: list[Client]

    @property
    def num_samples(self) -> int:
        return sum(c.num_samples for c in self.clients)

    @property
    def client_ids(self) -> list[int]:
        return [c.client_id for c in self.clients]


def check_settings(representation, grouping, measure, min_examples, max_clients, num_clusters, superclient_passes,
                   pretrain_model, pretrain_epochs, pretrain_lr, pretrain_batch_size, exemplars_per_class) -> None:
    problems = []

    def need(ok: bool, key: str, text: str) -> None:
        if not ok:
            problems.append(f"algo.{key}: {text}")

    need(representation in REPRESENTATIONS, "representation",
         f"choose one of {REPRESENTATIONS}, got {representation!r}")
    need(grouping in METHODS, "grouping", f"choose one of {METHODS}, got {grouping!r}")
    need(measure in MEASURES, "measure", f"choose one of {MEASURES}, got {measure!r}")
    need(min_examples >= 0, "min_examples", f"must be >= 0 (samples a superclient holds at least), got {min_examples}")
    need(max_clients >= 1, "max_clients", f"must be >= 1, got {max_clients}")
    need(num_clusters is None or num_clusters >= 1, "num_clusters",
         f"must be >= 1 or null (= classes), got {num_clusters}")
    need(num_clusters is None or grouping == "kmeans", "num_clusters",
         f"only algo.grouping=kmeans uses it (grouping is {grouping!r}): set algo.num_clusters=null")
    need(superclient_passes >= 1, "superclient_passes", f"must be >= 1, got {superclient_passes}")
    need(pretrain_model in PRETRAIN_MODELS, "pretrain_model",
         f"choose one of {PRETRAIN_MODELS}, got {pretrain_model!r}")
    need(pretrain_epochs >= 1, "pretrain_epochs", f"must be >= 1, got {pretrain_epochs}")
    need(pretrain_lr > 0, "pretrain_lr", f"must be > 0, got {pretrain_lr}")
    need(pretrain_batch_size is None or pretrain_batch_size >= 1, "pretrain_batch_size",
         f"must be >= 1 or null (= client.batch_size), got {pretrain_batch_size}")
    need(exemplars_per_class >= 1, "exemplars_per_class", f"must be >= 1, got {exemplars_per_class}")
    if problems:
        raise ConfigError(problems)


class FedSeq(FedBase):
    clients_are_devices = False  # an update is a superclient's: system.* (dropout, stragglers) is refused
    _superclients: Optional[list[Superclient]] = None  # built on first use (superclients), or by a checkpoint

    def __init__(self, cfg: DictConfig, run_dir: Path, server: DictConfig, client: Optional[DictConfig] = None,
                 prox_mu: float = 0.0,
                 representation: Literal["confidence", "label_histogram"] = "confidence",
                 grouping: Literal["random", "greedy", "kmeans"] = "greedy",
                 measure: Literal["kl", "gini", "cosine"] = "kl",
                 min_examples: int = 800, max_clients: int = 11, num_clusters: Optional[int] = None,
                 superclient_passes: int = 1,
                 pretrain_model: Literal["linear", "model"] = "linear", pretrain_epochs: int = 10,
                 pretrain_lr: float = 0.01, pretrain_batch_size: Optional[int] = None,
                 exemplars_per_class: int = 10):
        """representation: how clients are described for grouping ("label_histogram" is the
        oracle); grouping / measure / min_examples / max_clients / num_clusters: see
        fedseq_grouping.make_superclients; superclient_passes: passes through a superclient's
        clients per round; pretrain_*: the pre-training that gives the confidence vectors
        (pretrain_batch_size null: client.batch_size); exemplars_per_class: size of the exemplar
        set they are scored on."""
        check_settings(representation, grouping, measure, min_examples, max_clients, num_clusters, superclient_passes,
                       pretrain_model, pretrain_epochs, pretrain_lr, pretrain_batch_size, exemplars_per_class)
        super().__init__(cfg, run_dir, server, client, prox_mu)
        self.representation = representation
        self.grouping = grouping
        self.measure = measure
        self.min_examples = min_examples
        self.max_clients = max_clients
        self.num_clusters = num_clusters
        self.superclient_passes = superclient_passes
        self.pretrain_model = pretrain_model
        self.pretrain_epochs = pretrain_epochs
        self.pretrain_lr = pretrain_lr
        self.pretrain_batch_size = pretrain_batch_size or cfg.client.batch_size
        self.exemplars_per_class = exemplars_per_class
        self.pretrain_time_s: Optional[float] = None

    # ---- grouping (Sec. 3) -------------------------------------------------------------------
    @property
    def superclients(self) -> list[Superclient]:
        """The superclients, built on first use (pre-training included) unless a checkpoint set them."""
        if self._superclients is None:
            self._set_groups(self.build_groups())
        return self._superclients

    def build_groups(self) -> list[list[int]]:
        """Client ids of every superclient, from the clients' representation."""
        sizes = np.array([c.num_samples for c in self.clients])
        start = time.perf_counter()
        if self.grouping == "random":
            rep = np.full((len(self.clients), self.spec.num_classes), 1.0 / self.spec.num_classes)  # unused
        elif self.representation == "label_histogram":
            rep = label_histogram(self.data.train.y.cpu().numpy(), [c.indices.cpu().numpy() for c in self.clients],
                                  self.spec.num_classes)
        else:
            rep = self.confidence_representation()
            self.pretrain_time_s = time.perf_counter() - start
            log.info("FedSeq pre-training: %d clients, %d epochs of a %s model in %.2f s", len(self.clients),
                     self.pretrain_epochs, self.pretrain_model, self.pretrain_time_s)
        try:
            groups = make_superclients(rep, sizes, self.grouping, self.measure, self.min_examples, self.max_clients,
                                       self.num_clusters, numpy_rng(self.cfg.seed, FEDSEQ_GROUPING))
        except ValueError as e:
            raise ConfigError([f"algo.min_examples / algo.max_clients: {e}"]) from None
        return [[int(k) for k in g] for g in groups]

    def confidence_representation(self) -> np.ndarray:
        """Every client pre-trains the same small model on its own data; its confidence vector is
        its mean true-class probability per class on the shared exemplars (Sec. 3)."""
        train, num_classes = self.data.train, self.spec.num_classes
        labels = train.y.cpu().numpy()
        ex = balanced_exemplars(labels, self.exemplars_per_class, numpy_rng(self.cfg.seed, FEDSEQ_EXEMPLARS),
                                num_classes, allow_short=True)
        counts = np.bincount(labels[ex], minlength=num_classes)
        if counts.min() < self.exemplars_per_class:
            short = {c: int(n) for c, n in enumerate(counts) if n < self.exemplars_per_class}
            log.warning("FedSeq exemplars: classes %s have fewer than %d training samples (class: exemplars)",
                        short, self.exemplars_per_class)
        ex_t = torch.as_tensor(ex, device=self.device)
        in_shape, cfg_model = list(self.data.in_shape), self.cfg.model
        if self.pretrain_model == "linear":
            def make_model():
                return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(in_shape), num_classes))
        else:
            def make_model():
                return instantiate(cfg_model, in_shape=in_shape, num_classes=num_classes)
        try:
            probs = pretrain_confidence(
                make_model, train.x, train.y, [c.indices for c in self.clients], train.x[ex_t], train.y[ex_t],
                self.pretrain_epochs, self.pretrain_batch_size, self.pretrain_lr,
                torch_generator(self.device, self.cfg.seed, FEDSEQ_PRETRAIN))
        except ValueError as e:
            raise ConfigError([f"algo.pretrain_model: {e} (use algo.pretrain_model=linear)"]) from None
        # per-class means: divide every exemplar's probability by its class's exemplar count
        weight = torch.as_tensor(1.0 / np.maximum(counts, 1), dtype=probs.dtype, device=probs.device)
        return confidence_vectors(probs * weight[train.y[ex_t]], labels[ex], num_classes)

    def _set_groups(self, groups: list[list[int]]) -> None:
        self._superclients = [Superclient(i, [self.clients[k] for k in g]) for i, g in enumerate(groups)]
        c = self.cfg.clients
        if c.num_per_round is not None and c.num_per_round > len(groups):
            raise ConfigError([f"clients.num_per_round: FedSeq samples superclients, and {c.num_per_round} per round "
                               f"is more than the {len(groups)} superclients made from {len(self.clients)} clients: "
                               "lower it or use clients.per_round"])
        log.info("FedSeq: %d superclients from %d clients (%s grouping, %s), %s samples each",
                 len(groups), len(self.clients), self.grouping,
                 "random" if self.grouping == "random" else f"{self.representation} / {self.measure}",
                 f"{min(s.num_samples for s in self._superclients)}-{max(s.num_samples for s in self._superclients)}")
        self.save_groups()

    def save_groups(self) -> None:
        labels = self.data.train.y
        save_json({
            "representation": self.representation, "grouping": self.grouping, "measure": self.measure,
            "min_examples": self.min_examples, "max_clients": self.max_clients,
            "num_clients": len(self.clients), "num_superclients": len(self._superclients),
            "pretrain_time_s": self.pretrain_time_s,
            "superclients": [{
                "clients": s.client_ids,
                "num_samples": s.num_samples,
                "class_counts": torch.bincount(labels[torch.cat([c.indices for c in s.clients])],
                                               minlength=self.spec.num_classes).tolist(),
            } for s in self._superclients],
        }, self.run_dir / SUPERCLIENTS_FILE)

    # ---- one round ---------------------------------------------------------------------------
    def select_superclients(self, round_idx: int) -> list[Superclient]:
        """Drawn as FedBase draws clients: clients.per_round is a fraction of the superclients."""
        return [self.superclients[i] for i in self.draw(round_idx, len(self.superclients))]

    def updates_per_round(self) -> Optional[int]:
        return None if self._superclients is None else len(self.select_superclients(0))

    def chain(self, superclient: Superclient, round_idx: int, pass_idx: int) -> list[Client]:
        """The order in which the superclient's clients train in this pass (shuffled every pass)."""
        rng = numpy_rng(self.cfg.seed, FEDSEQ_ORDER, round_idx, superclient.index, pass_idx)
        return [superclient.clients[i] for i in rng.permutation(len(superclient.clients))]

    def train_step(self) -> None:
        chains = [self.superclient_chain(sc, self.round) for sc in self.select_superclients(self.round)]
        self.server.aggregate(self.chain_updates(chains, self.merge_payloads))

    def superclient_chain(self, superclient: Superclient, round_idx: int) -> Chain:
        """Its clients, pass after pass, each pass in its own order and drawing from its own stream."""
        links = [Link(c, p) for p in range(self.superclient_passes) for c in self.chain(superclient, round_idx, p)]
        return Chain(links, superclient.num_samples,
                     f"superclient {superclient.index} (clients {superclient.client_ids})")

    hand_over = SequentialEngine.hand_over  # the chain's hand-over, under the name tests/test_feddyn.py uses

    def merge_payloads(self, payloads: list[Optional[dict]]) -> Optional[dict]:
        """One server payload from those of the superclient's clients (in training order, pass after
        pass). Clients that send none (FedAvg, FedProx) are supported, and so are clients whose
        payload is a change of their own persisted state that the server sums (`payload_adds_up`,
        FedDyn's): the superclient sends the sum over its clients' last pass, whose state is the one
        committed. A subclass combining FedSeq with an algorithm whose clients send another kind
        (SCAFFOLD's option II control change assumes the client started from the global model)
        defines how they add up."""
        if all(p is None for p in payloads):
            return None
        if getattr(type(self.clients[0]), "payload_adds_up", False):
            last_pass = payloads[len(payloads) - len(payloads) // self.superclient_passes:]
            total = {key: {n: t.clone() for n, t in part.items()} for key, part in last_pass[0].items()}
            for payload in last_pass[1:]:
                for key, part in total.items():
                    torch._foreach_add_(list(part.values()), [payload[key][n] for n in part])
            return total
        raise UserError(f"algo.client ({type(self.clients[0]).__name__}) sends the server a payload "
                        f"({sorted(next(p for p in payloads if p is not None))}), and FedSeq does not know how to "
                        "merge those of a superclient's clients: use a client without one, or subclass FedSeq and "
                        "define merge_payloads")

    # ---- the loop, state, results ------------------------------------------------------------
    def fit(self) -> dict:
        # Group (and pre-train) before the round loop: a grouping that the settings make impossible
        # (or too few superclients per round for the aggregator) is reported as a ConfigError
        # before any resume checkpoint is written, and pre-training
        # stays out of the first round's time.
        self.superclients  # noqa: B018
        self.check_round_size()
        return super().fit()

    def checkpoint_parts(self) -> dict:
        return {**super().checkpoint_parts(), "superclients": SuperclientsPart(self),
                "pretrain_time_s": PretrainTimePart(self)}

    def results(self) -> dict:
        return {**super().results(), "num_superclients": len(self.superclients),
                "pretrain_time_s": self.pretrain_time_s}


class SuperclientsPart:
    """The checkpoint's superclients: a resumed run takes its groups from there (no second pre-training)."""

    def __init__(self, algo: FedSeq):
        self.algo = algo

    def state_dict(self):
        return None if self.algo._superclients is None else [s.client_ids for s in self.algo._superclients]

    def check_state(self, groups) -> list[str]:
        n = len(self.algo.clients)
        ids = [k for g in groups for k in g] if isinstance(groups, list) and all(isinstance(g, list) for g in groups) else None
        if groups is not None and (ids is None or len(set(ids)) != len(ids)
                                   or not all(isinstance(k, int) and 0 <= k < n for k in ids)):
            return [f"superclients: they do not group this run's {n} clients"]
        return []

    def load_state_dict(self, groups) -> None:
        if groups is None:
            return
        groups = [[int(k) for k in g] for g in groups]
        if self.algo._superclients is not None and groups != [s.client_ids for s in self.algo._superclients]:
            log.warning("FedSeq: the superclients built here differ from the checkpoint's; continuing "
                        "with the checkpoint's")
        self.algo._set_groups(groups)  # writes superclients.json: after every part is checked


class PretrainTimePart:
    def __init__(self, algo: FedSeq):
        self.algo = algo

    def state_dict(self):
        return self.algo.pretrain_time_s

    def check_state(self, saved) -> list[str]:
        return []

    def load_state_dict(self, saved) -> None:
        self.algo.pretrain_time_s = saved

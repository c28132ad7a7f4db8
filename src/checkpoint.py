"""The resume checkpoint as a dict of parts. Besides the round and the run's settings (which
src/run.py reads), every entry is one part's state: the server, the client state store, the fp16
loss scale, the RNG, the round hooks' (history, EMA evaluation), the update transforms', FedSeq's
superclients. A part saves (state_dict), checks (check_state: problems as 'path: what') and loads
(load_state_dict) itself; Checkpoint checks every part before it loads any, so a refused
checkpoint changes nothing. Files written before the parts existed have the same entries and load
as they are; a part added since (`optional`) stays as a fresh run starts it when its entry is missing."""
from pathlib import Path
from typing import Optional, Protocol, Sequence

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from src.client.client import TrainSetup
from src.client.state_store import ClientStateStore, copy_to, is_reference
from src.errors import UserError
from src.utils.seeding import rng_state, set_rng_state

# Settings added since checkpoints were first written, with the value that reproduces those runs:
# a checkpoint without them still resumes.
ADDED_SETTINGS = {"algo.prox_mu": 0.0, "engine._target_": "src.engine.SequentialEngine", "clients.test_fraction": 0.0,
                  "dataset.val_fraction": 0.0, "attack._target_": "src.attacks.NoAttack", "system.dropout": 0.0,
                  "system.speed_sigma": 0.0, "system.speed": "fixed", "system.deadline_steps": None,
                  "system.stragglers": "drop", "aggregator._target_": "src.server.robust.Mean",
                  "compression._target_": "src.compression.NoCompression",
                  "dp.enabled": False, "dp.noise_multiplier": 1.0, "dp.clip_norm": 1.0, "dp.adaptive": False,
                  "dp.target_quantile": 0.5, "dp.clip_lr": 0.2, "dp.clip_count_stddev": None, "dp.delta": 1.0e-5,
                  "dp.target_epsilon": None, "local_dp.enabled": False, "local_dp.noise_multiplier": 1.0,
                  "local_dp.clip_norm": 1.0, "local_dp.delta": 1.0e-5, "local_dp.target_epsilon": None,
                  "secagg.enabled": False, "secagg.threshold": None,
                  "secagg.scale_bits": 16, "secagg.clip": 8.0, "secagg.dropout_upload": 0.0,
                  "secagg.dropout_unmask": 0.0, "broadcast.bits": None}
# Partition settings written before issue 11's schemes: `Dirichlet` with alpha and size_sigma only
# meant Hsu et al.'s Dir(alpha * p), now `HsuDirichlet` (partition=hsu); IID had size_sigma only.
# They read as today's settings that reproduce those splits.
LEGACY_PARTITIONS = {"src.data.partition.Dirichlet": "src.data.partition.HsuDirichlet",
                     "src.data.partition.IID": "src.data.partition.IID"}
LEGACY_PARTITION_KEYS = {"_target_", "alpha", "size_sigma"}
LEGACY_PARTITION_ADDED = {"size_beta": None, "min_size": 10}


def legacy_partition(saved: dict) -> dict:
    """`saved` (a checkpoint's config) with an old partition node read as its partition=hsu / iid equivalent."""
    node = saved.get("partition")
    legacy = isinstance(node, dict) and node.get("_target_") in LEGACY_PARTITIONS and set(node) <= LEGACY_PARTITION_KEYS
    if not legacy:
        return saved
    return {**saved, "partition": {**node, **LEGACY_PARTITION_ADDED, "_target_": LEGACY_PARTITIONS[node["_target_"]]}}


# Settings that may differ between a checkpoint and the run resuming it: they do not change what
# the completed rounds computed.
# on_nonfinite decides only what happens once an update is not finite, which metrics.jsonl records;
# evaluation and early_stopping decide what is measured and when to stop, not what a round trains.
RESUMABLE_CHANGES = ("num_rounds", "eval_every", "eval_batch_size", "device", "checkpoint", "logger", "resume", "name",
                     "on_nonfinite", "evaluation", "early_stopping")
HISTORY = "history"  # the part whose length is the round


class Part(Protocol):
    def state_dict(self): ...

    def check_state(self, saved) -> list[str]: ...

    def load_state_dict(self, saved) -> None: ...


class Checkpoint:
    def __init__(self, owner: str, cfg: DictConfig, parts: dict[str, Part], optional: Sequence[str] = ()):
        """`owner` names the algorithm in messages; `optional`: keys of parts an older checkpoint may lack."""
        self.owner, self.cfg, self.parts, self.optional = owner, cfg, parts, set(optional)

    def state_dict(self, round_idx: int) -> dict:
        return {"round": round_idx, **{k: p.state_dict() for k, p in self.parts.items()},
                "config": OmegaConf.to_container(self.cfg, resolve=True)}

    def check(self, state: dict) -> None:
        """Refuse a checkpoint that is not one of this run before anything is loaded or written:
        its settings, then the keys, shapes and dtypes of every part."""
        missing = [k for k in ("round", *self.parts, "config") if k not in state and k not in self.optional]
        if missing:
            raise UserError(f"the resume checkpoint lacks {', '.join(missing)}: it was not written by this framework's "
                            f"{self.owner}. Pass resume= a checkpoint of this run, or start afresh in a new "
                            "directory (hydra.run.dir=NEW_DIR). Nothing was changed.")
        check_resumable(state["config"], OmegaConf.to_container(self.cfg, resolve=True), self.cfg)
        problems, refusals = [], []
        for key, part in self.parts.items():
            try:
                problems += part.check_state(state[key]) if key in state else []
            except UserError as e:  # a part's own refusal (a missing client file) comes after any mismatch
                refusals.append(e)
        rounds = len(state[HISTORY]) if isinstance(state.get(HISTORY), list) else None
        if not 0 <= state["round"] or (HISTORY in self.parts and rounds != state["round"]):
            problems.append(f"round {state['round']}: does not match the {rounds} rounds of its history")
        if problems:
            shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
            raise UserError(f"the resume checkpoint does not fit this run's model and algorithm ({shown}): it was "
                            "written by another model or code version. Pass resume= a checkpoint of this run, or "
                            "start afresh in a new directory (hydra.run.dir=NEW_DIR). Nothing was changed.")
        if refusals:
            raise refusals[0]

    def load(self, state: dict, checked: bool = False) -> None:
        """`checked`: `state` passed check() already (src/run.py checks before it writes anything)."""
        if not checked:
            self.check(state)
        for key, part in self.parts.items():
            if key in state:
                part.load_state_dict(state[key])


# ---- the parts every federated run has ------------------------------------------------------
class ServerPart:
    def __init__(self, server, device: torch.device):
        self.server, self.device = server, device

    def state_dict(self):
        return self.server.state_dict()

    def check_state(self, saved) -> list[str]:
        return mismatches(saved, self.server.state_dict(), "server")

    def load_state_dict(self, saved) -> None:
        self.server.load_state_dict(copy_to(saved, self.device))  # checkpoints load on the CPU


class ClientStorePart:
    """Every client's committed state; the disk store's as references to its files, which lie in
    `source` (the client_state folder beside the resume.pt being continued)."""

    def __init__(self, store: ClientStateStore, setup: TrainSetup, num_clients: int, source: Path):
        self.store, self.setup, self.num_clients, self.source = store, setup, num_clients, source

    def state_dict(self):
        return self.store.state_dict()

    def check_state(self, saved) -> list[str]:
        if not isinstance(saved, dict):
            return ["client_states: not a mapping"]
        references = sum(map(is_reference, saved.values()))
        if references and (self.store.where != "disk" or references < len(saved)):
            return [f"client_states: {references} of its {len(saved)} clients are file references, which only "
                    "client.state_store=disk writes, for every client"]
        problems = []
        for cid, client_state in saved.items():
            if not (str(cid).isdigit() and int(cid) < self.num_clients):
                problems.append(f"client_states: client {cid!r} is not one of this run's {self.num_clients}")
            elif is_reference(client_state):  # one file at a time, memory-mapped: never all in memory
                path = self.store.referenced_file(int(cid), client_state, self.source)
                problems += self.client_mismatches(self.store.read_referenced(path), str(path))
            else:
                problems += self.client_mismatches(client_state, f"client_states.{cid}")
        return problems

    def client_mismatches(self, state, path: str) -> list[str]:
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

    def load_state_dict(self, saved) -> None:
        self.store.load_state_dict(saved, self.source)


class ScalerPart:
    """The fp16 loss scale as of the last committed round (one taken mid-round matches its global model)."""

    def __init__(self, scaler: Optional[torch.amp.GradScaler]):
        self.scaler = scaler
        self.committed = scaler.state_dict() if scaler is not None else None

    def commit(self) -> None:
        if self.scaler is not None:
            self.committed = self.scaler.state_dict()

    def state_dict(self):
        return self.committed

    def check_state(self, saved) -> list[str]:
        return []

    def load_state_dict(self, saved) -> None:
        if self.scaler is not None and saved is not None:
            self.scaler.load_state_dict(saved)
            self.committed = saved


class RngPart:
    def state_dict(self):
        return rng_state()

    def check_state(self, saved) -> list[str]:
        return mismatches(saved.get("torch") if isinstance(saved, dict) else saved, torch.get_rng_state(), "rng.torch")

    def load_state_dict(self, saved) -> None:
        set_rng_state(saved)


class ListPart:
    """A list of objects with state_dict / load_state_dict (the update transforms)."""

    def __init__(self, key: str, items: list):
        self.key, self.items = key, items

    def state_dict(self):
        return [t.state_dict() for t in self.items]

    def check_state(self, saved) -> list[str]:
        ok = isinstance(saved, list) and len(saved) == len(self.items)
        return [] if ok else [f"{self.key}: expected the states of {len(self.items)}"]

    def load_state_dict(self, saved) -> None:
        for t, s in zip(self.items, saved):
            t.load_state_dict(s)


# ---- settings and structure ------------------------------------------------------------------
def settings_differences(saved: dict, current: dict, fixed: tuple[str, ...] = ()) -> list[str]:
    """The settings that shape training and differ between two configs, as 'key: checkpoint a, now b'."""
    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            key = f"{prefix}{k}"
            out.update(flat(v, key + ".") if isinstance(v, dict) else {key: v})
        return out

    a, b = {**ADDED_SETTINGS, **flat(legacy_partition(saved))}, flat(current)
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

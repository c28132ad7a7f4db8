"""Start-up validation of the composed config: every problem (unknown key, wrong type, value out of
range, component that refuses its arguments) is collected and reported in one error.

Plain settings have typed schemas below; the `_target_` groups (algo, dataset, model, ...) are
checked against their target's signature and then built once on dummy inputs, so each component's
own argument checks (torch.optim's included) are reported here rather than mid-run, naming the
setting they refuse where one can be singled out."""
import collections.abc
import copy
import functools
import importlib
import inspect
import math
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any, Callable, Literal, Optional

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from src.client.client import TrainSetup
from src.data.device_data import DeviceDataset
from src.errors import ConfigError
from src.local_dp import config_problems as local_dp_problems
from src.privacy import config_problems as dp_problems
from src.secagg import config_problems as secagg_problems

HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}


def check(predicate: Callable[[Any], bool], requirement: str):
    return {"check": predicate, "requirement": requirement}


@dataclass
class ClientsSchema:
    total: int = field(metadata=check(lambda v: v >= 1, ">= 1"))
    per_round: float = field(metadata=check(lambda v: 0 < v <= 1, "a fraction in (0, 1]"))
    num_per_round: Optional[int] = field(metadata=check(lambda v: v >= 1, ">= 1"))
    test_fraction: float = field(metadata=check(lambda v: 0 <= v < 1, "in [0, 1)"))


@dataclass
class EMASchema:
    decay: Optional[float] = field(metadata=check(lambda v: 0 < v < 1, "in (0, 1)"))
    persist: bool
    send: Literal["ema", "raw"]
    evaluate: bool


@dataclass
class ClientSchema:
    batch_size: int = field(metadata=check(lambda v: v >= 1, ">= 1"))
    local_epochs: Optional[int] = field(metadata=check(lambda v: v >= 1, ">= 1"))
    local_steps: Optional[int] = field(metadata=check(lambda v: v >= 1, ">= 1"))
    amp: Literal["bf16", "fp16", "off"]
    grad_clip: Optional[float] = field(metadata=check(lambda v: v > 0, "> 0"))
    persist_optimizer: bool
    state_store: Literal["device", "host", "disk"]
    ema: EMASchema


@dataclass
class EvaluationSchema:
    clients_every: Optional[int] = field(metadata=check(lambda v: v >= 1, ">= 1"))
    finetune_steps: int = field(metadata=check(lambda v: v >= 0, ">= 0"))


@dataclass
class EarlyStoppingSchema:
    metric: Literal["val_accuracy", "val_loss"]
    patience: Optional[int] = field(metadata=check(lambda v: v >= 1, ">= 1"))


@dataclass
class SystemSchema:
    dropout: float = field(metadata=check(lambda v: 0 <= v <= 1, "a probability in [0, 1]"))
    speed_sigma: float = field(metadata=check(lambda v: v >= 0, ">= 0"))
    speed: Literal["fixed", "round"]
    deadline_steps: Optional[int] = field(metadata=check(lambda v: v >= 1, ">= 1"))
    stragglers: Literal["drop", "partial"]


@dataclass
class DPSchema:
    enabled: bool
    noise_multiplier: float = field(metadata=check(lambda v: v > 0, "> 0"))
    clip_norm: float = field(metadata=check(lambda v: v > 0, "> 0"))
    adaptive: bool
    target_quantile: float = field(metadata=check(lambda v: 0 < v < 1, "in (0, 1)"))
    clip_lr: float = field(metadata=check(lambda v: v > 0, "> 0"))
    clip_count_stddev: Optional[float] = field(metadata=check(lambda v: v > 0, "> 0"))
    delta: float = field(metadata=check(lambda v: 0 < v < 1, "in (0, 1)"))
    target_epsilon: Optional[float] = field(metadata=check(lambda v: v > 0, "> 0"))


@dataclass
class LocalDPSchema:
    enabled: bool
    noise_multiplier: float = field(metadata=check(lambda v: v > 0, "> 0"))
    clip_norm: float = field(metadata=check(lambda v: v > 0, "> 0"))
    delta: float = field(metadata=check(lambda v: 0 < v < 1, "in (0, 1)"))
    target_epsilon: Optional[float] = field(metadata=check(lambda v: v > 0, "> 0"))


@dataclass
class SecAggSchema:
    enabled: bool
    threshold: Optional[int] = field(metadata=check(lambda v: v >= 2, ">= 2"))
    scale_bits: int = field(metadata=check(lambda v: 0 <= v <= 30, "in [0, 30]"))
    clip: float = field(metadata=check(lambda v: v > 0, "> 0"))
    dropout_upload: float = field(metadata=check(lambda v: 0 <= v < 1, "a probability in [0, 1)"))
    dropout_unmask: float = field(metadata=check(lambda v: 0 <= v < 1, "a probability in [0, 1)"))


@dataclass
class BroadcastSchema:
    bits: Optional[int] = field(metadata=check(lambda v: 2 <= v <= 32, "in [2, 32]"))


@dataclass
class CheckpointSchema:
    every: int = field(metadata=check(lambda v: v >= 1, ">= 1"))
    keep_round_models: bool


@dataclass
class Target:
    """A `_target_` group. `runtime` names the arguments the framework passes itself; `probe`
    builds the component on dummy inputs (None: signature check only); `checks` are rules for
    arguments that the targets' annotations do not express (they replace the annotation's check);
    `nested` the specs of nested `_target_` nodes, by key."""
    runtime: tuple[str, ...] = ()
    probe: Optional[Callable[[DictConfig, DictConfig], Any]] = None
    checks: dict[str, dict] = field(default_factory=dict)
    nested: dict[str, "Target"] = field(default_factory=dict)


def _probe_model(node, cfg):
    try:
        ds = instantiate(cfg.dataset)  # cheap: datasets read their files only in load()
    except Exception:
        return None  # the dataset group reports its own problem
    return instantiate(node, in_shape=list(ds.in_shape), num_classes=ds.num_classes)


def _probe_optimizer(node, cfg):
    return instantiate(node)([torch.zeros(1, requires_grad=True)])


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# torch.optim indexes betas without checking their number (a short list fails with an IndexError)
OPTIMIZER_CHECKS = {"betas": check(
    lambda v: isinstance(v, (list, tuple, ListConfig)) and len(v) == 2 and all(_is_number(b) and 0 <= b < 1 for b in v),
    "two numbers in [0, 1), e.g. [0.9, 0.999]")}


def _probe_client(node, cfg):
    """The algorithm's client class (a `_partial_` target) on a one-sample setup with the run's
    optimizer, so that its constructor's own checks run, those against the optimizer included."""
    try:
        _probe_optimizer(cfg.optimizer, cfg)
        optimizer = instantiate(cfg.optimizer)
    except Exception:  # the optimizer group reports its own problem
        optimizer = functools.partial(torch.optim.SGD, lr=0.1)
    one = torch.zeros(1, dtype=torch.long)
    setup = TrainSetup(model=torch.nn.Linear(1, 2), data=DeviceDataset(torch.zeros(1, 1), one, 2),
                       loss_fn=torch.nn.CrossEntropyLoss(), optimizer=optimizer,
                       batch_size=1, local_epochs=1, local_steps=None, seed=0)
    return instantiate(node)(0, one, setup)


def _probe_checked(node, cfg):
    """A component with check(cfg) (the aggregator, the attack, the compression): its own argument
    checks, then its checks against the run's other settings (the algorithm, the client settings)."""
    problems = instantiate(node).check(cfg)
    if problems:
        raise ConfigError(problems)


@dataclass
class RunSchema:
    name: str
    seed: int = field(metadata=check(lambda v: v >= 0, ">= 0"))
    device: Literal["auto", "cpu", "cuda"]
    num_rounds: int = field(metadata=check(lambda v: v >= 1, ">= 1"))
    eval_every: int = field(metadata=check(lambda v: v >= 1, ">= 1"))
    eval_batch_size: int = field(metadata=check(lambda v: v >= 1, ">= 1"))
    tta: Literal["none", "hflip"]
    resume: Optional[str]
    on_nonfinite: Literal["drop", "fail"]
    clients: ClientsSchema
    client: ClientSchema
    evaluation: EvaluationSchema
    early_stopping: EarlyStoppingSchema
    system: SystemSchema
    checkpoint: CheckpointSchema
    dp: DPSchema
    local_dp: LocalDPSchema
    secagg: SecAggSchema
    broadcast: BroadcastSchema
    algo: Target = field(default_factory=lambda: Target(
        ("cfg", "run_dir"), nested={"client": Target(("client_id", "indices", "setup"), _probe_client)}))
    dataset: Target = field(default_factory=lambda: Target(probe=lambda n, c: instantiate(n)))
    model: Target = field(default_factory=lambda: Target(("in_shape", "num_classes"), _probe_model))
    partition: Target = field(default_factory=lambda: Target(probe=lambda n, c: instantiate(n)))
    optimizer: Target = field(default_factory=lambda: Target(("params",), _probe_optimizer, OPTIMIZER_CHECKS))
    schedule: Target = field(default_factory=lambda: Target(probe=lambda n, c: instantiate(n)))
    loss: Target = field(default_factory=lambda: Target(probe=lambda n, c: instantiate(n)))
    logger: Target = field(default_factory=lambda: Target(probe=lambda n, c: instantiate(n)))
    engine: Target = field(default_factory=lambda: Target(probe=lambda n, c: instantiate(n)))
    attack: Target = field(default_factory=lambda: Target(probe=_probe_checked))
    compression: Target = field(default_factory=lambda: Target(probe=_probe_checked))
    aggregator: Target = field(default_factory=lambda: Target(probe=_probe_checked))


# Nested targets inside a group (the algo's server) are probed on their own.
NESTED_TARGET_PROBE = Target(probe=lambda n, c: instantiate(n))


def _target(node) -> Callable:
    module, _, name = str(node._target_).rpartition(".")
    return getattr(importlib.import_module(module), name)


def _type_ok(value: Any, annotation: Any) -> bool | None:
    """True/False when the annotation is one we understand, None otherwise (then not checked)."""
    if annotation is Any or annotation is inspect.Parameter.empty:
        return None
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _type_ok(value, typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        results = [_type_ok(value, a) for a in typing.get_args(annotation)]
        return True if any(r for r in results) else (None if None in results else False)
    if origin is Literal:
        return value in typing.get_args(annotation)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if _never_configured(annotation):
        return False
    if origin in (list, tuple, collections.abc.Sequence) or annotation in (list, tuple):
        if not isinstance(value, (list, tuple, ListConfig)):
            return False
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        if len(args) == 1:
            return all(_type_ok(v, args[0]) is not False for v in value)
        if origin is tuple and args and Ellipsis not in typing.get_args(annotation):  # tuple[X, Y]: fixed length
            return len(value) == len(args) and all(_type_ok(v, a) is not False for v, a in zip(value, args))
        return True
    return None


def _never_configured(annotation: Any) -> bool:
    """A type no config value can be (torch.optim's `lr: float | Tensor`)."""
    return isinstance(annotation, type) and issubclass(annotation, torch.Tensor)


def _describe(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_describe(a) for a in args if not _never_configured(a))
    if origin is tuple and args and Ellipsis not in args:
        return f"[{', '.join(_describe(a) for a in args)}]"
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _not_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    return isinstance(value, (list, tuple, ListConfig)) and any(_not_finite(v) for v in value)


def _check_value(path: str, value: Any, annotation: Any, meta: dict, problems: list[str]) -> None:
    if _type_ok(value, annotation) is False:
        problems.append(f"{path}: expected {_describe(annotation)}, got {type(value).__name__} {value!r}")
    elif _not_finite(value):  # inf passes one-sided range checks (> 0), torch.optim's included
        what = "a finite number" if isinstance(value, float) else "finite numbers"
        problems.append(f"{path}: must be {what}, got {value!r}")
    elif value is not None and "check" in meta and not meta["check"](value):
        problems.append(f"{path}: must be {meta['requirement']}, got {value!r}")


def _check_schema(node: Any, schema: type, path: str, cfg: DictConfig, problems: list[str]) -> None:
    if not isinstance(node, DictConfig):
        problems.append(f"{path}: expected a group of settings, got {node!r}")
        return
    known = {f.name for f in fields(schema)}
    for key in node.keys():
        if key not in known and not (path == "" and key == "hydra"):
            problems.append(f"{path}{key}: unknown key (known: {', '.join(sorted(known))})")
    hints = typing.get_type_hints(schema)
    for f in fields(schema):
        sub = f"{path}{f.name}"
        if f.name not in node:
            problems.append(f"{sub}: missing")
            continue
        value = node[f.name] if not OmegaConf.is_missing(node, f.name) else MISSING
        if value is MISSING:
            problems.append(f"{sub}: has no value (???): set it on the command line, {sub}=...")
        elif hints[f.name] is Target:
            _check_target(value, sub, f.default_factory(), cfg, problems)
        elif is_dataclass(hints[f.name]):
            _check_schema(value, hints[f.name], sub + ".", cfg, problems)
        else:
            _check_value(sub, value, hints[f.name], f.metadata, problems)


def _check_target(node: Any, path: str, spec: Target, cfg: DictConfig, problems: list[str]) -> None:
    if not isinstance(node, DictConfig) or "_target_" not in node:
        problems.append(f"{path}: expected a config group with a _target_, got {node!r}")
        return
    try:
        target = _target(node)
    except (ImportError, AttributeError, ValueError) as e:
        problems.append(f"{path}._target_: cannot import {node._target_!r} ({e})")
        return
    params = inspect.signature(target).parameters
    takes_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
    try:
        hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target, include_extras=True)
    except Exception:  # third-party annotations that do not resolve: check names only
        hints = {}
    before = len(problems)
    for key in node.keys():
        if key in HYDRA_KEYS:
            continue
        if key not in params and not takes_any:
            allowed = sorted(set(params) - set(spec.runtime) - {"self"})
            problems.append(f"{path}.{key}: unknown key for {node._target_} (known: {', '.join(allowed)})")
        elif key in spec.runtime:
            problems.append(f"{path}.{key}: set by the framework, remove it from the config")
        elif isinstance(node[key], DictConfig) and "_target_" in node[key]:
            _check_target(node[key], f"{path}.{key}", spec.nested.get(key, NESTED_TARGET_PROBE), cfg, problems)
        elif key in params:
            annotation = Any if key in spec.checks else hints.get(key, params[key].annotation)
            _check_value(f"{path}.{key}", node[key], annotation, spec.checks.get(key, {}), problems)
    partial = node.get("_partial_", False)
    for name, p in params.items():
        required = p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        if required and name not in node and name not in spec.runtime and name != "self" and not partial:
            problems.append(f"{path}.{name}: missing (required by {node._target_})")
    if spec.probe is not None and len(problems) == before:
        try:
            spec.probe(node, cfg)
        except ConfigError as e:  # a component that names the keys itself
            problems.extend(e.problems)
        except Exception as e:  # the component's own argument checks
            cause = e.__cause__ or e
            refused = _refused_keys(node, params, spec, cfg)
            if len(refused) == 1:
                key = refused[0]
                problems.append(f"{path}.{key}: {node._target_} refuses {key}={node[key]!r}: {cause}")
            else:
                problems.append(f"{path}: {node._target_} refuses these settings: {cause}")


def _refused_keys(node: DictConfig, params, spec: Target, cfg: DictConfig) -> list[str]:
    """The settings whose return to their default alone lets the probe pass: the ones refused."""
    refused = []
    for key in node.keys():
        if key in HYDRA_KEYS or key not in params or params[key].default is inspect.Parameter.empty:
            continue
        trial = copy.copy(node)  # keeps its parent: interpolations still resolve
        with open_dict(trial):
            del trial[key]
        try:
            spec.probe(trial, cfg)
        except Exception:
            continue
        refused.append(key)
    return refused


def validate(cfg: DictConfig) -> None:
    """Raise one ConfigError listing every problem found in `cfg`."""
    problems: list[str] = []
    _check_schema(cfg, RunSchema, "", cfg, problems)
    if not problems:
        c = cfg.clients
        if c.num_per_round is not None and c.num_per_round > c.total:
            problems.append(f"clients.num_per_round: {c.num_per_round} clients per round but only "
                            f"clients.total={c.total} clients")
        if (cfg.client.local_epochs is None) == (cfg.client.local_steps is None):
            problems.append("client.local_epochs / client.local_steps: set exactly one of them "
                            "(e.g. client.local_epochs=null client.local_steps=5)")
        val_fraction = cfg.dataset.get("val_fraction", 0.0)
        if cfg.early_stopping.patience is not None and not val_fraction:
            problems.append("early_stopping.patience: early stopping selects on the validation split, and there is "
                            "none: set dataset.val_fraction (e.g. dataset.val_fraction=0.1)")
        if cfg.evaluation.finetune_steps and not c.test_fraction:
            problems.append("evaluation.finetune_steps: the fine-tuned clients are scored on their own held-out data, "
                            "and there is none: set clients.test_fraction (e.g. clients.test_fraction=0.2)")
        if cfg.system.speed_sigma and cfg.system.deadline_steps is None:
            problems.append("system.speed_sigma: client speeds only matter against a round deadline: set "
                            "system.deadline_steps (e.g. system.deadline_steps=10), or system.speed_sigma=0")
        if cfg.tta == "hflip" and not getattr(_target(cfg.dataset), "flip_invariant", False):
            problems.append(f"tta: hflip averages over mirror images, but {cfg.dataset._target_} is not "
                            "flip-invariant (a mirrored sample can change its label): use tta=none")
        if cfg.dp.enabled:
            problems += dp_problems(cfg)
        if cfg.local_dp.enabled:
            problems += local_dp_problems(cfg)
        problems += secagg_problems(cfg)
    if problems:
        raise ConfigError(problems)

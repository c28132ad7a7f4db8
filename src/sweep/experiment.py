"""Sweep declarations. An experiment is a name, a description, parameter grids whose Cartesian product
gives the runs, overrides shared by every run, and seeds. Every run is composed and validated with the
project's own config before anything is launched, so a misspelt key fails the sweep, not run 37."""
import itertools
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from src.errors import UserError
from src.sweep.protocol import ROOT
from src.utils.io import save_text

EXPERIMENTS_DIR = ROOT / "experiments"
DEFAULT_ROOT = ROOT / "results"          # where runs are written: results/<experiment>/<run>/seed<S>
DECLARATION_FILE = "experiment.yaml"   # the declaration as launched, kept next to its runs


class SweepError(UserError):
    """A sweep that cannot start; the message lists every problem."""

    def __init__(self, problems: list[str], headline: str = "sweep not started"):
        super().__init__(f"{headline}:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass(frozen=True)
class Run:
    experiment: str
    name: str
    seed: Optional[int]   # None: unknown (collect met a run directory whose config cannot be read)
    overrides: tuple[str, ...]
    run_dir: Path

    @property
    def key(self) -> str:
        return self.name if self.seed is None else f"{self.name}/seed{self.seed}"

    def train_args(self) -> list[str]:
        """train.py's arguments. The run directory is fixed, so a requeued or re-launched job
        finds its own resume.pt (src/run.py continues from it). W&B names the run <run>/seed<S> in the
        group <experiment>/<run> (before the overrides, so that the experiment's own values win)."""
        return [override("logger.name", self.key), override("logger.group", f"{self.experiment}/{self.name}"),
                *self.overrides, f"seed={self.seed}", f"hydra.run.dir={hydra_value(str(self.run_dir))}"]


@dataclass
class Experiment:
    name: str
    description: str = ""
    # one grid {key: [values]} or a list of them; the runs are the union of their Cartesian products
    grid: Any = field(default_factory=dict)
    shared: dict[str, Any] = field(default_factory=dict)   # overrides every run gets
    seeds: list[int] = field(default_factory=lambda: [0])
    # for `collect`: rounds to reach this test accuracy (a fraction), and the gap the report measures
    target_accuracy: Optional[float] = None
    baseline: Optional[str] = None     # run name of the plain federated recipe ...
    reference: Optional[str] = None    # ... and of the centralized reference it is compared with
    parents: dict[str, str] = field(default_factory=dict)   # run -> the run it adds one change to
    slurm: dict[str, Any] = field(default_factory=dict)     # SBATCH options for this experiment

    def __post_init__(self):
        problems = []
        if not isinstance(self.name, str) or not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*", self.name):
            problems.append(f"name {self.name!r}: use letters, digits, '.', '_' and '-', not first '.' (it names a folder)")
        if not isinstance(self.description, str):
            problems.append(f"description {self.description!r}: give text")
        if (not isinstance(self.seeds, list) or not self.seeds
                or not all(isinstance(s, int) and not isinstance(s, bool) for s in self.seeds)):
            problems.append(f"seeds {self.seeds!r}: give a non-empty list of integers")
        elif len(set(self.seeds)) != len(self.seeds):
            problems.append(f"seeds {self.seeds!r}: a seed is listed twice")
        for key in ("shared", "parents", "slurm"):
            if not isinstance(getattr(self, key), dict):
                problems.append(f"{key} {getattr(self, key)!r}: give a mapping (key: value)")
        if isinstance(self.shared, dict) and "seed" in self.shared:
            problems.append("shared key 'seed': list the seeds under `seeds:` instead")
        grids = self.grids()
        if not grids:
            problems.append("grid: give at least one mapping of override keys to lists of values")
        for grid in grids:
            if not isinstance(grid, dict) or not grid:
                problems.append(f"grid {grid!r}: give a non-empty mapping of override keys to lists of values")
                continue
            for key, values in grid.items():
                if key == "seed":
                    problems.append("grid key 'seed': list the seeds under `seeds:` instead")
                if not isinstance(values, list) or not values:
                    problems.append(f"grid key {key!r}: give a non-empty list of values, not {values!r}")
                if isinstance(self.shared, dict) and key in self.shared:
                    problems.append(f"key {key!r} is both in the grid and in shared: keep one")
        if self.target_accuracy is not None and not (
                isinstance(self.target_accuracy, (int, float)) and 0 < self.target_accuracy <= 1):
            problems.append(f"target_accuracy {self.target_accuracy!r}: give a fraction in (0, 1], e.g. 0.7")
        if problems:
            raise SweepError([f"experiment {self.name}: {p}" for p in problems])
        names = {name for name, _ in self.variants()}
        named = [self.baseline, self.reference, *self.parents.keys(), *self.parents.values()]
        unknown = sorted({str(n) for n in named if n is not None and n not in names})
        if unknown:
            raise SweepError([f"experiment {self.name}: baseline/reference/parents name {unknown}, which are not "
                              f"runs of it; its runs are {sorted(names)}"])

    def grids(self) -> list:
        return self.grid if isinstance(self.grid, list) else [self.grid]

    def variants(self) -> list[tuple[str, tuple[str, ...]]]:
        """(run name, overrides) for every point of every grid, in declaration order."""
        shared = tuple(override(k, v) for k, v in self.shared.items())
        variants, seen = [], {}
        for grid in self.grids():
            keys = list(grid)
            by_value = len(keys) == 1 and all(isinstance(v, str) for v in grid[keys[0]])
            for values in itertools.product(*(grid[k] for k in keys)):
                name = run_name(keys, values, by_value)
                overrides = shared + tuple(override(k, v) for k, v in zip(keys, values))
                if name in seen and seen[name] != overrides:
                    raise SweepError([f"experiment {self.name}: two runs are both named {name!r} "
                                      f"({list(seen[name])} and {list(overrides)}): make the values distinct"])
                if name not in seen:
                    seen[name] = overrides
                    variants.append((name, overrides))
        return variants

    def runs(self, root: Path) -> list[Run]:
        return self.runs_in(Path(root) / self.name)

    def runs_in(self, folder: Path) -> list[Run]:
        """The runs, in <folder>/<run>/seed<S>."""
        folder = Path(folder).resolve()
        return [Run(self.name, name, seed, overrides, folder / name / f"seed{seed}")
                for name, overrides in self.variants() for seed in self.seeds]

    @classmethod
    def from_dict(cls, data: dict, origin: str) -> "Experiment":
        if not isinstance(data, dict) or "name" not in data:
            raise SweepError([f"{origin}: expected a mapping with at least a name and a grid"])
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise SweepError([f"{origin}: unknown key(s) {unknown}; an experiment has {sorted(known)}"])
        return cls(**data)

    def to_dict(self) -> dict:
        return asdict(self)


def load_experiment(spec: str) -> Experiment:
    """`spec` is the name of experiments/NAME.yaml, a path to a yaml declaration, or the results folder
    of a launched experiment (which keeps the declaration it was launched with)."""
    path = Path(spec)
    candidates = [path / DECLARATION_FILE, path, EXPERIMENTS_DIR / f"{spec}.yaml"]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        known = sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml"))
        raise SweepError([f"no experiment {spec!r}: give a name from experiments/ ({', '.join(known)}), "
                          "a yaml file, or a results folder holding experiment.yaml"])
    try:
        data = yaml.safe_load(found.read_text())
    except yaml.YAMLError as e:
        raise SweepError([f"{found} is not valid yaml: {e}"]) from None
    return Experiment.from_dict(data, str(found))


def override(key: str, value: Any) -> str:
    """A Hydra override for a python value, as the command line would spell it."""
    return f"{key}={hydra_value(value)}"


def hydra_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    plain = re.fullmatch(r"[A-Za-z0-9_./+@-]+", text) and yaml.safe_load(text) == text
    return text if plain else "'" + text.replace("'", "\\'") + "'"   # quoted: stays a string


def run_name(keys: list[str], values: tuple, by_value: bool) -> str:
    """A folder-safe name, never '.' or '..': by its value for a one-key grid of names
    (experiment=playbook/tta -> 'tta'), else key-value pairs joined by '_' (algo-fedprox_lr-0.01)."""
    def label(value):
        text = hydra_value(value).strip("'")
        return re.sub(r"[^A-Za-z0-9._-]+", "-", text.rstrip("/").split("/")[-1]).strip("-.") or "empty"
    if by_value:
        return label(values[0])
    return "_".join(f"{k.lstrip('+~').split('.')[-1]}-{label(v)}" for k, v in zip(keys, values))


def compose_run(overrides: list[str]):
    """The config train.py would see for these overrides (Hydra must be initialised)."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig
    cfg = compose("config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)   # so that ${hydra:...} values resolve
    return cfg


def check_runs(runs: list[Run]) -> None:
    """Compose and validate every distinct run with Hydra's compose API; raise one SweepError naming
    each run and what is wrong with it. Hydra is imported here, not above: `list` and `collect` need none of it."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from src.cli import unknown_keys_message
    from src.config import validate

    problems: dict[str, list[str]] = {}   # message -> the runs it concerns
    checked: set[tuple] = set()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "config"), version_base="1.3"):
        for run in runs:
            if run.overrides in checked:   # seeds share a config shape: one check per variant
                continue
            checked.add(run.overrides)
            overrides = [*run.overrides, f"seed={run.seed}"]
            try:
                validate(compose_run(overrides))
            except (HydraException, OmegaConfBaseException, UserError) as e:
                message = unknown_keys_message(e, overrides) or str(e).strip()
                problems.setdefault(message.replace("\n", "\n      "), []).append(f"{run.experiment}/{run.name}")
    if problems:   # a bad shared override is reported once, with the runs it spoils
        raise SweepError([f"run {runs[0]}: {message}" if len(runs) == 1 else
                          f"runs {', '.join(runs[:3])}{' ...' if len(runs) > 3 else ''} ({len(runs)} runs): {message}"
                          for message, runs in problems.items()])


def save_declaration(experiment: Experiment, root: Path) -> Path:
    """Keep the declaration next to its runs, with every seed launched so far, for collect."""
    path = Path(root) / experiment.name / DECLARATION_FILE
    data = experiment.to_dict()
    if path.is_file():
        earlier = yaml.safe_load(path.read_text()).get("seeds", [])
        data["seeds"] = earlier + [s for s in experiment.seeds if s not in earlier]
    save_text(yaml.safe_dump(data, sort_keys=False), path)
    return path

"""Every yaml in config/ composes, validates and instantiates; bad settings give one error listing
every problem."""
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from src.client.client import Client
from src.config import validate
from src.errors import ConfigError

from conftest import CONFIG_DIR

GROUPS = {p.name: sorted(f.stem for f in p.glob("*.yaml")) for p in Path(CONFIG_DIR).iterdir() if p.is_dir()}
OPTIONS = [(g, o) for g, opts in sorted(GROUPS.items()) for o in opts]


def test_config_groups_exist():
    assert {"algo", "dataset", "model", "partition", "optimizer", "loss", "logger"} <= GROUPS.keys()


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_validates_and_instantiates(compose_cfg, group, option):
    overrides = [f"{group}={option}"]
    if group == "dataset" and option == "synthetic" or group == "model" and option == "mlp":
        overrides.append("model=mlp")  # the CNNs need image input
    if group == "model" and option != "mlp":
        overrides.append("dataset=cifar10")
    cfg = compose_cfg(*overrides)
    validate(cfg)
    node = cfg[group]
    if group == "model":
        shape = [60] if cfg.dataset._target_.endswith("Synthetic") else [3, 32, 32]
        model = instantiate(node, in_shape=shape, num_classes=10)
        assert model(torch.zeros(2, *shape)).shape == (2, 10)
    elif group == "optimizer":
        assert isinstance(instantiate(node)([torch.zeros(1, requires_grad=True)]), torch.optim.Optimizer)
    elif group == "algo":
        assert "global_state" in instantiate(node.server).send_data()
    else:
        assert instantiate(node) is not None


def problems_of(cfg) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    return info.value.problems


def test_all_problems_are_listed_in_one_error(compose_cfg):
    cfg = compose_cfg("clients.per_round=1.5", "optimizer.lr=-0.1", "partition.alpha=-1", "seed=abc",
                      "num_rounds=0", "+model.depth=3", "+clients.extra=1")
    problems = problems_of(cfg)
    text = "\n".join(problems)
    assert "clients.per_round: must be a fraction in (0, 1], got 1.5" in text
    assert "optimizer.lr: torch.optim.SGD refuses lr=-0.1: Invalid learning rate" in text
    assert "partition.alpha: src.data.partition.Dirichlet refuses alpha=-1" in text
    assert "seed: expected int, got str 'abc'" in text
    assert "num_rounds: must be >= 1, got 0" in text
    assert "model.depth: unknown key for src.models.LeNet" in text
    assert "clients.extra: unknown key" in text
    assert len(problems) == 7
    with pytest.raises(ConfigError, match=r"invalid configuration \(7 problem\(s\)\)"):
        validate(cfg)


def test_more_clients_per_round_than_clients(compose_cfg):
    assert problems_of(compose_cfg("clients.total=5", "clients.num_per_round=6")) == [
        "clients.num_per_round: 6 clients per round but only clients.total=5 clients"]


def test_local_epochs_and_steps_are_exclusive(compose_cfg):
    assert "set exactly one" in problems_of(compose_cfg("client.local_steps=5"))[0]
    validate(compose_cfg("client.local_steps=5", "client.local_epochs=null"))


def test_wrong_choice_values(compose_cfg):
    problems = problems_of(compose_cfg("device=gpu", "model=resnet20", "model.norm=layer", "dataset=cifar10",
                                       "logger.mode=sometimes", "algo.server.weighting=median"))
    text = "\n".join(problems)
    assert "device: expected 'auto' | 'cpu' | 'cuda', got str 'gpu'" in text
    assert "model.norm: expected 'group' | 'batch'" in text
    assert "logger.mode: src.utils.wandb_logger.WandbLogger refuses mode='sometimes'" in text
    assert "algo.server.weighting: expected 'samples' | 'uniform'" in text


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_numbers_are_refused(compose_cfg, value):
    """Schema settings (a range check alone lets inf through), target arguments, nested ones and lists."""
    problems = problems_of(compose_cfg(f"optimizer.lr={value}", f"client.grad_clip={value}", "algo=fedadam",
                                       f"algo.server.tau={value}"))
    assert sorted(problems) == sorted(f"{key}: must be a finite number, got {float(value)}"
                                      for key in ("optimizer.lr", "client.grad_clip", "algo.server.tau"))
    assert problems_of(compose_cfg("optimizer=adam", f"optimizer.betas=[0.9,{value}]")) == [
        f"optimizer.betas: must be finite numbers, got [0.9, {float(value)}]"]


def test_problems_name_the_key(compose_cfg):
    assert problems_of(compose_cfg("optimizer.lr=fast")) == ["optimizer.lr: expected float, got str 'fast'"]
    for betas, shown in (("[0.9]", "[0.9]"), ("[0.9,1.5]", "[0.9, 1.5]"), ("0.9", "0.9")):
        assert problems_of(compose_cfg("optimizer=adam", f"optimizer.betas={betas}")) == [
            f"optimizer.betas: must be two numbers in [0, 1), e.g. [0.9, 0.999], got {shown}"]
    # a component's own check, traced to the one setting whose default it accepts
    assert problems_of(compose_cfg("optimizer.momentum=-1")) == [
        "optimizer.momentum: torch.optim.SGD refuses momentum=-1: Invalid momentum value: -1"]


class PickyClient(Client):
    """A client whose constructor checks a setting its annotation cannot express, and the optimizer."""

    def __init__(self, client_id, indices, setup, level: int = 1):
        super().__init__(client_id, indices, setup)
        if level > 3:
            raise ValueError(f"level must be <= 3, got {level}")
        if not isinstance(setup.optimizer([torch.zeros(1, requires_grad=True)]), torch.optim.SGD):
            raise ConfigError(["optimizer: PickyClient trains with SGD only, use optimizer=sgd"])


def test_a_client_class_that_refuses_its_settings_is_a_config_problem(compose_cfg):
    client = ["algo=feddyn", f"algo.client._target_={__name__}.PickyClient"]
    assert problems_of(compose_cfg(*client, "+algo.client.level=5")) == [
        f"algo.client.level: {__name__}.PickyClient refuses level=5: level must be <= 3, got 5"]
    validate(compose_cfg(*client, "+algo.client.level=2"))
    assert problems_of(compose_cfg(*client, "optimizer=adam")) == [
        "optimizer: PickyClient trains with SGD only, use optimizer=sgd"]
    assert problems_of(compose_cfg("algo=scaffold", "algo.client.option=III")) == [
        "algo.client.option: expected 'I' | 'II', got str 'III'"]


@pytest.mark.parametrize("algo", GROUPS["algo"])
def test_every_algorithm_takes_prox_mu(compose_cfg, algo):
    """The README's promise: algo.prox_mu (no `+`) works with every algorithm."""
    cfg = compose_cfg(f"algo={algo}", "algo.prox_mu=0.1")
    validate(cfg)
    assert cfg.algo.prox_mu == 0.1


def test_cnn_on_vector_data_is_refused(compose_cfg):
    text = "\n".join(problems_of(compose_cfg("dataset=synthetic", "model=lenet")))
    assert "needs image input" in text and "model=mlp" in text


def test_bad_target_is_reported(compose_cfg):
    text = "\n".join(problems_of(compose_cfg("model._target_=src.models.NoSuchNet")))
    assert "model._target_: cannot import 'src.models.NoSuchNet'" in text


def test_no_eval_of_config_strings():
    src = Path(CONFIG_DIR).parent / "src"
    offenders = [p for p in src.rglob("*.py") if "eval(" in p.read_text().replace("model.eval(", "").replace(".eval()", "")]
    assert offenders == []

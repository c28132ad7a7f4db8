"""The playbook presets (config/experiment/playbook/) and their sweeps (experiments/playbook*.yaml):
every run composes and validates, and the presets are the playbook's cross-silo setting."""
import pytest

from src.sweep.experiment import check_runs, load_experiment

PRESETS = ["literal", "continuous_lr", "persist_optimizer", "tta", "ema_0999_reset", "ema_0999_persist",
           "ema_095", "label_smoothing", "double_batch", "double_rounds", "centralized"]


@pytest.mark.parametrize("name", ["playbook", "playbook_partial"])
def test_playbook_experiments_compose_and_validate(name, tmp_path):
    check_runs(load_experiment(name).runs(tmp_path))   # raises SweepError naming any bad run


def test_the_playbook_sweep_runs_every_preset(tmp_path):
    assert [r.name for r in load_experiment("playbook").runs(tmp_path)] == PRESETS


def test_presets_are_the_playbooks_setting(compose_cfg):
    """4 sites, all trained every round, on flipped (never cropped) images; the partial sweep
    keeps the older 4-of-10 setting."""
    for name in ("literal", "tta", "centralized"):
        cfg = compose_cfg(f"experiment=playbook/{name}")
        assert (cfg.clients.total, cfg.clients.per_round, cfg.dataset.augment) == (4, 1.0, "flip")
    partial = load_experiment("playbook_partial")
    assert partial.shared == {"clients.total": 10, "clients.per_round": 0.4}

"""train.py's command line, checked before Hydra runs it: a misspelt key gets one message naming the
closest known keys, instead of Hydra's bare "Could not override" whose hint (`+key`, which adds a
new key) is rarely what was meant. The sweep runner explains its runs' misspelt keys with the same
function. No torch here: this runs before every `train.py`, `--help` and `--cfg` included."""
import difflib
import re
import sys
from pathlib import Path
from typing import Optional

from hydra import compose, initialize_config_dir
from hydra._internal.utils import get_args_parser
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"
CONFIG_NAME = "config"


def _unknown_key(error: Exception) -> Optional[str]:
    """The key of Hydra's "Could not override 'KEY'" when KEY is not in the config, else None."""
    match = re.match(r"Could not override '(.+?)'\.", str(error))
    missing = isinstance(error.__cause__, (ConfigAttributeError, ConfigKeyError))
    return match.group(1) if isinstance(error, ConfigCompositionException) and missing and match else None


def _known_keys(node: dict, prefix: str = "") -> list[str]:
    """Every key of the composed config (as a container), dotted, groups of settings included."""
    keys = []
    for key, value in node.items():
        keys.append(f"{prefix}{key}")
        if isinstance(value, dict):
            keys += _known_keys(value, f"{prefix}{key}.")
    return keys


def unknown_keys_message(error: Exception, overrides: list[str]) -> Optional[str]:
    """For Hydra's error composing `overrides` when it is about a key the config lacks: one message
    naming every such key of `overrides` and the known keys closest to each. None for any other
    error. Hydra must be initialised with the project's config."""
    parser = OverridesParser.create()
    unknown, cfg = [], None
    key = _unknown_key(error)
    while key is not None:
        unknown.append(key)
        rest = [o for o in overrides if parser.parse_override(o).key_or_group != key]
        if len(rest) == len(overrides):
            break
        overrides = rest
        try:
            cfg, key = compose(CONFIG_NAME, overrides=overrides), None
        except ConfigCompositionException as e:
            key = _unknown_key(e)
    if not unknown:
        return None
    if cfg is None:  # another mistake is left for Hydra to report: suggest from the defaults
        cfg = compose(CONFIG_NAME)
    known = _known_keys(OmegaConf.to_container(cfg))  # unresolved: ${hydra:...} needs a running app
    hints = {k: difflib.get_close_matches(k, known, n=1) for k in unknown}
    tail = "`python train.py --cfg job` lists every key"
    if len(unknown) == 1:
        close = hints[unknown[0]]
        guess = f": did you mean {close[0]}?" if close else ""
        return f"unknown key '{unknown[0]}'{guess} (check its spelling: {tail})"
    listed = ", ".join(f"'{k}'" + (f" (did you mean {c[0]}?)" if c else "") for k, c in hints.items())
    return f"unknown keys {listed}: check their spelling ({tail})"


def missing_option_message(error: Exception) -> Optional[str]:
    """For Hydra's error when an override picks an option a config group does not have (logger=none):
    one message naming the file that is missing and the group's options. None for any other error."""
    if not isinstance(error, MissingConfigException) or not error.missing_cfg_file:
        return None
    missing = error.missing_cfg_file
    group = missing.rpartition("/")[0]
    choices = f"the options of {group} are {', '.join(error.options)}" if error.options else (
        f"see the files under config/{group}/ for the options")
    return f"there is no config/{missing}.yaml: {choices}"


def _first_job(overrides: list[str]) -> Optional[list[str]]:
    """The overrides of the first job a sweep (`-m`) would launch, without Hydra's own settings
    (its keys are its to check); None when a sweep cannot be enumerated here (glob, interval)."""
    job = []
    for o in OverridesParser.create().parse_overrides(overrides):
        if o.is_hydra_override():
            continue
        if not o.is_sweep_override():
            job.append(o.input_line)
        elif o.is_discrete_sweep():
            job.append(f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}")
        else:
            return None
    return job


def check_command_line(argv: Optional[list[str]] = None) -> None:
    """Exit with status 2 and one message if train.py's overrides name keys the config lacks.
    or pick an option a config group lacks. Everything else (bad syntax, a custom --config-*) is left
    to Hydra."""
    args = get_args_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.help or args.hydra_help or args.shell_completion or args.experimental_rerun or \
            args.config_path or args.config_name or args.config_dir:
        return
    try:
        overrides = _first_job(args.overrides)
    except HydraException:
        return
    if overrides is None:
        return
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        try:
            compose(CONFIG_NAME, overrides=overrides)
            return
        except HydraException as e:
            message = unknown_keys_message(e, overrides) or missing_option_message(e)
    if message is not None:
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)

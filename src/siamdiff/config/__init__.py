"""Training configs: YAML files merged over ``base.yaml``, then ``key=value`` overrides.

The merged config is struct-locked, so a misspelt key in a file or on the command
line is an error instead of a silently ignored setting.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from siamdiff.errors import SiamdiffError

CONFIG_DIR = Path(__file__).parent
BUILTIN = ("tiny", "scratch", "sd15")


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _invalid(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None)
    return (
        f"invalid setting {key}: {_first_line(exc)}"
        if key
        else f"invalid setting: {_first_line(exc)}"
    )


def _read_yaml(path: Path) -> DictConfig:
    try:
        cfg = OmegaConf.load(path)
    except (OSError, OmegaConfBaseException, ValueError, yaml.YAMLError) as exc:
        raise SiamdiffError(f"cannot read config ({_first_line(exc)})", path) from exc
    if not isinstance(cfg, DictConfig):
        raise SiamdiffError("config must be a YAML mapping", path)
    return cfg


def config_path(name_or_path: str | Path) -> Path:
    """A built-in config name (``tiny``) or a path to a YAML file."""
    if str(name_or_path) in BUILTIN:
        return CONFIG_DIR / f"{name_or_path}.yaml"
    path = Path(name_or_path)
    if not path.is_file():
        raise SiamdiffError(f"no such config (built-in names: {', '.join(BUILTIN)})", path)
    return path


def load_config(name_or_path: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """``base.yaml`` <- the named config <- ``key=value`` overrides; unknown keys are errors."""
    base = _read_yaml(CONFIG_DIR / "base.yaml")
    OmegaConf.set_struct(base, True)
    # Open-ended on purpose: diffusers' constructors check these arguments themselves.
    for free_form in (base.backbone.unet, base.backbone.dhi):
        OmegaConf.set_struct(free_form, False)
    path = config_path(name_or_path)
    for bad in (o for o in overrides if "=" not in o):
        raise SiamdiffError(f"override {bad!r} is not key=value")
    try:
        cfg = OmegaConf.merge(base, _read_yaml(path))
    except OmegaConfBaseException as exc:
        raise SiamdiffError(_invalid(exc), path) from exc
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        raise SiamdiffError(f"command line: {_invalid(exc)}") from exc
    return cfg

"""Training configs: YAML files merged over ``base.yaml``, then ``key=value`` overrides.

The merged config is struct-locked, so a misspelt key in a file or on the command
line is an error instead of a silently ignored setting.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from siamdiff.errors import SiamdiffError

CONFIG_DIR = Path(__file__).parent
BUILTIN = ("tiny", "scratch", "sd15")
MIXED_PRECISION = ("no", "bf16", "fp16")


def _integer(smallest: int) -> tuple[Callable[[Any], bool], str]:
    def ok(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= smallest

    return ok, f"an integer >= {smallest}"


def _number(
    low: float, high: float | None = None, low_open: bool = False
) -> tuple[Callable[[Any], bool], str]:
    def ok(value: Any) -> bool:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
            return False
        above = value > low if low_open else value >= low
        return above and (high is None or value <= high)

    bounds = f"> {low:g}" if low_open else f">= {low:g}"
    return ok, f"a number {bounds}" + (f" and <= {high:g}" if high is not None else "")


# Numbers the training loop divides by, counts with or schedules on: a wrong one would only
# surface steps later, as a traceback.
VALUE_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    **dict.fromkeys(
        (
            "train.max_steps",
            "train.batch_size",
            "train.log_every",
            "train.checkpoint_every",
            "train.sample_every",
            "train.keep_last",
            "train.sample_count",
            "train.sample_steps",
            "train.max_nonfinite",
            "optim.grad_accum",
            "data.transforms.size",
        ),
        _integer(1),
    ),
    **dict.fromkeys(
        ("optim.warmup_steps", "model.consistency_warmup_steps", "data.num_workers"), _integer(0)
    ),
    **dict.fromkeys(("optim.lr", "optim.max_grad_norm"), _number(0, low_open=True)),
    **dict.fromkeys(
        ("optim.weight_decay", "model.consistency_weight", "train.guidance"), _number(0)
    ),
    **dict.fromkeys(("model.prompt_dropout", "model.aug_start"), _number(0, 1)),
}


def _check_values(cfg: DictConfig, path: Path) -> None:
    """One-line errors naming the config in use (the value may come from its command line)."""
    if cfg.train.mixed_precision is False:  # YAML reads a bare `no` as false
        cfg.train.mixed_precision = "no"
    if cfg.train.mixed_precision not in MIXED_PRECISION:
        raise SiamdiffError(
            f"train.mixed_precision must be one of {', '.join(MIXED_PRECISION)}, "
            f"got {cfg.train.mixed_precision!r}",
            path,
        )
    for key, (ok, expected) in VALUE_CHECKS.items():
        value = OmegaConf.select(cfg, key)
        if not ok(value):
            raise SiamdiffError(f"{key} must be {expected}, got {value!r}", path)


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
    _check_values(cfg, path)
    return cfg

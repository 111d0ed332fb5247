"""Training configs: YAML files merged over ``base.yaml``, then ``key=value`` overrides.

The merged config is struct-locked, so a misspelt key in a file or on the command
line is an error instead of a silently ignored setting.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from siamdiff.errors import SiamdiffError, first_line
from siamdiff.runtime import notice

CONFIG_DIR = Path(__file__).parent
RUN_CONFIG = "config.yaml"  # the resolved config a training run saves in its folder
BUILTIN = ("tiny", "scratch", "sd15")
MIXED_PRECISION = ("no", "bf16", "fp16")
OPTIMIZERS = ("adamw", "adamw8bit")
# The choices the model and data code accept (tests keep them equal to those modules' own
# lists), checked here so that a wrong one fails before a run directory is looked at.
CHOICES = {
    "model.mode": ("siamese", "mask-only"),
    "backbone.kind": ("tiny", "scratch", "sd15"),
    "backbone.text": ("learned", "clip"),
    "backbone.prediction_type": ("auto", "epsilon", "v_prediction"),
    "autoencoder.kind": ("taef2", "diffusers-kl", "diffusers-tiny", "random", "dct"),
    "data.transforms.crop": ("crop", "pad"),
    "data.transforms.colour": ("rgb", "lab"),
}


def whole_number(value: Any, smallest: int = 0) -> bool:
    """Whether ``value`` is a JSON or YAML integer (not a bool) of at least ``smallest``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= smallest


def _integer(smallest: int, largest: int | None = None) -> tuple[Callable[[Any], bool], str]:
    def ok(value: Any) -> bool:
        return whole_number(value, smallest) and (largest is None or value <= largest)

    if largest is None:
        return ok, f"an integer >= {smallest}"
    return ok, f"an integer in {smallest}..{largest}"


def finite_number(value: Any) -> bool:
    """Whether ``value`` is a JSON or YAML number, neither a bool nor NaN nor infinite."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


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


def _boolean() -> tuple[Callable[[Any], bool], str]:
    return (lambda value: isinstance(value, bool)), "true or false"


def _text() -> tuple[Callable[[Any], bool], str]:
    return (lambda value: isinstance(value, str) and value != ""), "a path"


def _betas() -> tuple[Callable[[Any], bool], str]:
    def ok(value: Any) -> bool:
        pair = isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2
        return pair and all(_number(0)[0](b) and b < 1 for b in value)

    return ok, "two numbers in [0, 1), [beta1, beta2]"


def _hint_names() -> tuple[Callable[[Any], bool], str]:
    def ok(value: Any) -> bool:
        names = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else None
        return (
            names is not None
            and len(set(names)) == len(names)
            and all(isinstance(n, str) and re.fullmatch(r"\w[\w.]*", n, re.ASCII) for n in names)
        )

    return ok, "a list of distinct hint names (letters, digits, '.', '_'; quote numbers)"


def _one_of(choices: tuple[str, ...]) -> tuple[Callable[[Any], bool], str]:
    return (lambda value: value in choices), f"one of {', '.join(choices)}"


def _ratio() -> tuple[Callable[[Any], bool], str]:
    def ok(value: Any) -> bool:
        pair = isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2
        return pair and all(_integer(0)[0](w) for w in value) and sum(value) > 0

    return ok, "two integer weights >= 0, not both 0, [above-median, rest]"


def _optional(
    check: tuple[Callable[[Any], bool], str],
) -> tuple[Callable[[Any], bool], str]:
    ok, expected = check
    return (lambda value: value is None or ok(value)), f"null or {expected}"


def _names() -> tuple[Callable[[Any], bool], str]:
    # Which names are known is checked where they are used (speed.parse_levers).
    def ok(value: Any) -> bool:
        return isinstance(value, str) or (
            isinstance(value, Sequence) and all(isinstance(v, str) for v in value)
        )

    return ok, "a list of names, or one comma-separated string"


def _multiple_of_8() -> tuple[Callable[[Any], bool], str]:
    # The DHI's three patch merges and the autoencoders take pixels to an H/8 latent grid.
    return (lambda value: _integer(8)[0](value) and value % 8 == 0), "a multiple of 8"


# Values the training loop divides by, counts with, schedules on or opens: a wrong one would
# only surface later, as a traceback or as a setting silently without effect.
VALUE_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "run_dir": _text(),
    "data.root": _text(),
    "optim.betas": _betas(),
    "optim.name": _one_of(OPTIMIZERS),
    **{key: _one_of(choices) for key, choices in CHOICES.items()},
    "backbone.prediction_type": _optional(_one_of(CHOICES["backbone.prediction_type"])),
    "train.sample_steps": _integer(2, 500),  # DDIM's whole schedules (sample.step_range)
    "data.balanced.fg_ratio": _ratio(),
    "model.train_unet_encoder": (lambda v: v in ("auto", True, False), "auto, true or false"),
    "seed": _integer(0, 2**31 - 1),  # numpy's seeds stop at 2**32 - 1; ranks add their index
    "data.hints": _hint_names(),
    "data.transforms.size": _multiple_of_8(),
    "model.aug_t_max": _integer(0),
    **dict.fromkeys(
        (
            "data.verify",
            "data.balanced.enabled",
            "data.transforms.rot90",
            "data.transforms.hflip",
            "train.gradient_checkpointing",
        ),
        _boolean(),
    ),
    **dict.fromkeys(
        (
            "train.max_steps",
            "train.batch_size",
            "train.log_every",
            "train.checkpoint_every",
            "train.sample_every",
            "train.keep_last",
            "train.sample_count",
            "train.max_nonfinite",
            "optim.grad_accum",
            "backbone.text_tokens",
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
    "autoencoder.scaling_factor": _optional(_number(0, low_open=True)),
    "train.speed": _names(),
    "backbone.prompt": ((lambda value: isinstance(value, str)), "a string"),
    "data.latent_cache": _optional(_text()),
    **dict.fromkeys(("backbone.seed", "autoencoder.seed"), _integer(0, 2**31 - 1)),
    "backbone.dhi.base_channels": _optional(_integer(1)),
}


def _sections(tree: Any, prefix: str = "") -> list[str]:
    """The dotted keys of every mapping in ``tree`` (a plain container), nested ones too."""
    found = []
    for key, value in tree.items():
        if isinstance(value, dict):
            found += [f"{prefix}{key}", *_sections(value, f"{prefix}{key}.")]
    return found


def _check_values(
    cfg: DictConfig, base: DictConfig, path: Path, given: set[str], saved_run: bool
) -> None:
    """One-line errors naming where the bad value came from: the command line (``given``, the
    keys of its overrides) or the config file. A run's saved config (``saved_run``) keeps
    what an older siamdiff accepted and a newer one refuses, where it changes no training:
    the run must stay exportable and resumable."""

    def source(key: str) -> str | Path:
        # The key, a section holding it, or a setting inside it, given on the command line.
        on_command_line = any(
            key == g or key.startswith(f"{g}.") or g.startswith(f"{key}.") for g in given
        )
        return "command line" if on_command_line else path

    if saved_run and source("train.sample_steps") == path:  # older: 1..999, a preview setting
        steps = cfg.train.sample_steps
        if isinstance(steps, int) and not isinstance(steps, bool):
            cfg.train.sample_steps = min(max(steps, 2), 500)

    for section in _sections(OmegaConf.to_container(base, throw_on_missing=False)):
        value = OmegaConf.select(cfg, section)
        if not isinstance(value, DictConfig):
            raise SiamdiffError(
                f"{section} must be a mapping of settings, got {value!r}", source(section)
            )
    if cfg.train.mixed_precision is False:  # YAML reads a bare `no` as false
        cfg.train.mixed_precision = "no"
    for key in PATH_KEYS:  # YAML reads run_dir=2024 as a number
        value = OmegaConf.select(cfg, key, default=MISSING)
        if isinstance(value, int) and not isinstance(value, bool):
            OmegaConf.update(cfg, key, str(value))
    checks = {"train.mixed_precision": _one_of(MIXED_PRECISION), **VALUE_CHECKS}
    for key, (ok, expected) in checks.items():
        value = OmegaConf.select(cfg, key, default=MISSING)
        if value is not MISSING and not ok(value):  # a missing (???) one is asked for by name
            raise SiamdiffError(
                f"{key} must be {expected}, got {value!r}{_quoting_hint(key, value)}", source(key)
            )
    if not saved_run:  # a run saved them (older siamdiff accepted them): they ran unread
        _refuse_unread(cfg, source)


def _quoting_hint(key: str, value: Any) -> str:
    """How to write what YAML read as something else: a number, or an empty value as null."""
    if key in PATH_KEYS and isinstance(value, float):
        return f" (quote a path that reads as a number: {key}=\"'PATH'\")"
    if key == "backbone.prompt" and value is None:
        return " (the empty prompt: backbone.prompt=\"''\")"
    return ""


def _refuse_unread(cfg: DictConfig, source: Callable[[str], str | Path]) -> None:
    """Settings the chosen kinds never read: given, they would be saved as if they ran."""
    if cfg.backbone.kind == "sd15" and cfg.backbone.unet:
        raise SiamdiffError(
            "backbone.unet builds a UNet from config (tiny, scratch); sd15 loads its UNet from "
            "backbone.path: leave it out",
            source("backbone.unet"),
        )
    kind = cfg.autoencoder.kind
    if kind in ("dct", "random") and OmegaConf.select(cfg, "autoencoder.path") is not None:
        raise SiamdiffError(
            f"autoencoder.path is not read by autoencoder.kind={kind} (no weights): set "
            "autoencoder.kind to the kind of those weights (taef2, diffusers-kl, diffusers-tiny)",
            source("autoencoder.path"),
        )


# A list set where a mapping stands (or the reverse) fails as a plain TypeError or ValueError.
MERGE_ERRORS = (OmegaConfBaseException, TypeError, ValueError)


def _invalid(exc: Exception) -> str:
    key = getattr(exc, "full_key", None)
    return (
        f"invalid setting {key}: {first_line(exc)}"
        if key
        else f"invalid setting: {first_line(exc)}"
    )


def _read_yaml(path: Path) -> DictConfig:
    try:
        cfg = OmegaConf.load(path)
    except yaml.MarkedYAMLError as exc:  # say where: the parser knows the line and column
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = exc.problem or exc.context or first_line(exc)
        raise SiamdiffError(f"cannot read config: {problem}{where}", path) from exc
    except (OSError, OmegaConfBaseException, ValueError, yaml.YAMLError) as exc:
        raise SiamdiffError(f"cannot read config ({first_line(exc)})", path) from exc
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
    OmegaConf.set_struct(base.backbone.unet, False)  # diffusers' UNet arguments
    path = config_path(name_or_path)
    saved_run = _is_run_config(path)
    for bad in (o for o in overrides if "=" not in o):
        raise SiamdiffError(f"override {bad!r} is not key=value")
    try:
        file = _read_yaml(path)
        cfg = OmegaConf.merge(base, _saved_targets(file) if saved_run else file)
    except MERGE_ERRORS as exc:
        raise SiamdiffError(_invalid(exc), path) from exc
    for override in overrides:  # one at a time, to name the one that fails
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([override]))
        except MERGE_ERRORS as exc:
            raise SiamdiffError(f"command line: {_invalid(exc)} (in {override!r})") from exc
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        raise SiamdiffError(f"command line: {_invalid(exc)}") from exc
    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    _check_values(cfg, base, path, given, saved_run)
    if "run_dir" not in given and saved_run:
        # Moved (or copied) with its run, it means the folder it is in now, not a fresh run
        # at the place it was written in.
        cfg.run_dir = str(path.resolve().parent)
    return cfg


def _is_run_config(path: Path) -> bool:
    """Whether ``path`` is the config.yaml a training run saved beside its checkpoints (a
    template beside an empty or foreign checkpoints/ folder is not)."""
    from siamdiff.train import checkpoints  # the run layout's owner

    return path.name == RUN_CONFIG and bool(checkpoints(path.resolve().parent))


# What a from-scratch run's saved backbone.prediction_type meant when siamdiff saved it: absent
# (before the setting existed) the network predicted epsilon; `auto` (before runs saved the
# target itself) meant v_prediction. A later default must not retarget a trained network.
SAVED_AUTO_TARGETS = {"absent": "epsilon", "auto": "v_prediction"}


def _saved_targets(saved: DictConfig) -> DictConfig:
    """A run's own config with the target its network was trained on (see above)."""
    backbone = saved.get("backbone")
    if not isinstance(backbone, DictConfig):
        return saved
    if backbone.get("kind", "tiny") == "sd15":  # auto: its scheduler config's, as it was
        return saved
    stated = backbone.get("prediction_type", "absent")
    if stated in (None, "auto"):
        stated = "auto"
    backbone.prediction_type = SAVED_AUTO_TARGETS.get(stated, stated)
    return saved


# Local paths a run reads; relative ones would mean another file from another directory.
PATH_KEYS = (
    "run_dir",
    "data.root",
    "data.latent_cache",
    "autoencoder.path",
    "backbone.path",
    "backbone.text_path",
)
WRITTEN_PATHS = ("run_dir", "data.latent_cache")  # local even before the run creates them
# What a resumed run may change: where things are, how often it reports, how it runs on the
# machine at hand. Anything else would make it another training than its checkpoints'.
RESUME_MAY_CHANGE = frozenset(
    {
        *PATH_KEYS,
        "data.num_workers",
        "data.verify",
        "train.log_every",
        "train.checkpoint_every",
        "train.keep_last",
        "train.max_nonfinite",
        "train.sample_every",
        "train.sample_count",
        "train.sample_steps",
        "train.guidance",
        "train.gradient_checkpointing",
        "train.speed",
        "train.max_steps",  # training longer (or shorter) than planned; said out loud
    }
)


def with_absolute_paths(cfg: DictConfig) -> DictConfig:
    """``cfg`` with its local paths absolute (a Hub id, which is no local path, stays)."""
    cfg = cfg.copy()
    for key in PATH_KEYS:
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, str):
            continue
        if value.startswith("~"):  # the shell expands ~ in run_dir=~/x, not in data.root=~/x
            value = str(Path(value).expanduser())
            OmegaConf.update(cfg, key, value)
        if key in WRITTEN_PATHS or Path(value).exists():
            OmegaConf.update(cfg, key, str(Path(value).resolve()))
    return cfg


def flat_settings(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree}
    dotted = f"{prefix}." if prefix else ""
    return {
        leaf: value
        for key, sub in tree.items()
        for leaf, value in flat_settings(sub, f"{dotted}{key}").items()
    }


def check_resume_config(saved_path: Path, cfg: DictConfig) -> None:
    """Refuse to resume the run whose config is ``saved_path`` with settings it was not
    trained with (the schedule, data, model or optimiser), naming them."""
    saved = flat_settings(OmegaConf.to_container(load_config(saved_path)))
    now = flat_settings(OmegaConf.to_container(cfg))
    absent = object()  # a free-form setting (backbone.unet.*) given on one side only
    changed = [
        key
        for key in sorted(saved.keys() | now.keys())
        if saved.get(key, absent) != now.get(key, absent)
        and (
            key not in RESUME_MAY_CHANGE
            # a cache may move, not appear or vanish: the augmentations depend on it
            or (key == "data.latent_cache" and None in (saved[key], now[key]))
        )
        # fp16 runs only on CUDA (a CPU one trained in fp32): without one it resumes as `no`
        and not (key == "train.mixed_precision" and (saved[key], now[key]) == ("fp16", "no"))
    ]
    if changed:

        def value(config: dict[str, Any], key: str) -> str:
            return repr(config[key]) if key in config else "(unset)"

        shown = ", ".join(f"{k} {value(saved, k)} -> {value(now, k)}" for k in changed[:3])
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        raise SiamdiffError(
            f"--resume with other settings than the run was trained with ({shown}{more}); "
            f"resume with `siamdiff train {saved_path} --resume`, or start another run_dir",
            saved_path,
        )
    if saved["train.max_steps"] != now["train.max_steps"]:
        notice(
            f"--resume: train.max_steps {saved['train.max_steps']} -> {now['train.max_steps']}: "
            "the learning-rate schedule, the image weight ramp and the augmentation term's "
            "start follow the new length from here"
        )

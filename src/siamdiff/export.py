"""Model directories: build a model from a config, export a run, load an export.

An export is a diffusers-style directory that needs neither the run nor siamdiff's
config files to be used::

    OUT/
      siamdiff.json          what this is: mode, prompt, resolution, autoencoder, source run
      unet/                  UNet2DConditionModel.save_pretrained
      controlnet/            DHIControlNetModel.save_pretrained (config + safetensors)
      scheduler/             the training noise schedule (DDPMScheduler)
      text/                  learned prompt embeddings, or CLIP text_encoder/ + tokenizer/
      autoencoder/           a copy of the frozen autoencoder's local weights directory

So an export can be moved to another machine whole. A Hub-id autoencoder is referenced, and
weight-free ones (dct, random) need no files; loading checks that the autoencoder's weights
are the ones the model was trained with (``autoencoder_identity``).
"""

from __future__ import annotations

import json
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from siamdiff import __version__
from siamdiff.atomic import atomic_output_dir, atomic_write_json, check_apart, read_json
from siamdiff.config import RUN_CONFIG, load_config
from siamdiff.data.manifest import TRAINED_ON, is_trained_on, load_manifest
from siamdiff.data.transforms import CROP_MODES
from siamdiff.errors import SiamdiffError, first_line
from siamdiff.models.autoencoder import LatentAutoencoder, load_autoencoder, local_weights_dir
from siamdiff.models.backbone import (
    Backbone,
    ClipTextConditioner,
    DHIControlNetModel,
    LearnedTextConditioner,
    TextConditioner,
    build_backbone,
    check_prediction_type,
)
from siamdiff.models.dhi import BASE_HINT_CHANNELS
from siamdiff.models.loading import load_complete
from siamdiff.models.siamese import MODES, SiameseDiffusion

EXPORT_FORMAT = "siamdiff-export"
EXPORT_VERSION = 1
META_NAME = "siamdiff.json"
PARTS = ("unet", "controlnet", "scheduler", "text")
AUTOENCODER_DIR = "autoencoder"  # a copy of local autoencoder weights, when there are any
META_KEYS = ("mode", "prompt", "resolution", "text", "autoencoder", "autoencoder_identity")


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def build_model(cfg: DictConfig) -> tuple[SiameseDiffusion, LatentAutoencoder, Backbone]:
    """The autoencoder, backbone and Siamese model a training config describes."""
    autoencoder = load_autoencoder(_plain(cfg.autoencoder))
    backbone = build_backbone(
        _plain(cfg.backbone), autoencoder.latent_channels, extra_hints=len(cfg.data.hints)
    )
    model = SiameseDiffusion(
        backbone, mode=cfg.model.mode, aug_t_max=cfg.model.aug_t_max, aug_start=cfg.model.aug_start
    )
    return model, autoencoder, backbone


def _save_text(text: TextConditioner, directory: Path) -> dict[str, Any]:
    directory.mkdir(parents=True)
    if isinstance(text, LearnedTextConditioner):
        save_file(
            {"embeddings": text.embeddings.detach().cpu().contiguous()},
            directory / "embeddings.safetensors",
        )
        return {"kind": "learned", "vocabulary": text.vocabulary}
    if isinstance(text, ClipTextConditioner):
        text.text_encoder.save_pretrained(directory / "text_encoder")
        text.tokenizer.save_pretrained(directory / "tokenizer")
        return {"kind": "clip"}
    raise SiamdiffError(f"cannot export text conditioning of type {type(text).__name__}")


def _load_text(directory: Path, meta: dict[str, Any]) -> TextConditioner:
    if meta["kind"] == "clip":
        return ClipTextConditioner.from_pretrained(directory)
    embeddings = load_file(directory / "embeddings.safetensors")["embeddings"]
    vocabulary = meta["vocabulary"]
    text = LearnedTextConditioner(
        [p for p in vocabulary if p], embeddings.shape[-1], embeddings.shape[1]
    )
    if text.vocabulary != vocabulary:
        raise SiamdiffError("learned prompt vocabulary does not match its embeddings", directory)
    text.embeddings.data.copy_(embeddings)
    return text


def save_model(
    model: SiameseDiffusion,
    cfg: DictConfig,
    autoencoder: LatentAutoencoder,
    out: Path,
    *,
    overwrite: bool = False,
    extra: dict[str, Any] | None = None,
    copy_autoencoder: bool = True,
) -> Path:
    """Write `model` as an export directory (atomically: all or nothing). ``overwrite``
    replaces an earlier export or an empty directory, never anything else.
    ``copy_autoencoder=False`` references local autoencoder weights instead of copying them
    (a temporary export, on the machine that has them)."""
    if overwrite and out.exists() and not out.is_dir():
        raise SiamdiffError("is a file, not an export; refusing to replace it", out)
    if overwrite and out.is_dir() and any(out.iterdir()) and not (out / META_NAME).is_file():
        raise SiamdiffError(
            f"is not a siamdiff export (no {META_NAME}); refusing to replace it", out
        )
    autoencoder_cfg = _plain(cfg.autoencoder)
    local = local_weights_dir(autoencoder_cfg)  # None: a Hub id or no weights at all
    if local is not None and copy_autoencoder:  # it would copy itself into itself, endlessly
        check_apart(out, local, "the autoencoder's weights")
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        model.unet.save_pretrained(tmp / "unet")
        model.controlnet.save_pretrained(tmp / "controlnet")
        model.noise_scheduler.save_pretrained(tmp / "scheduler")
        text_meta = _save_text(model.text, tmp / "text")
        if local is not None and copy_autoencoder:
            _copy_writable(local, tmp / AUTOENCODER_DIR)
            autoencoder_cfg |= {"path": AUTOENCODER_DIR, "subfolder": None}
        elif local is not None:  # referenced where it is, from anywhere
            autoencoder_cfg["path"] = str(Path(autoencoder_cfg["path"]).resolve())
        atomic_write_json(
            tmp / META_NAME,
            {
                "format": EXPORT_FORMAT,
                "format_version": EXPORT_VERSION,
                "created_by": f"siamdiff {__version__}",
                "mode": model.mode,
                "prompt": cfg.backbone.prompt,
                "resolution": cfg.data.transforms.size,
                "crop": cfg.data.transforms.crop,  # how the masks it conditions on are framed
                "hints": list(cfg.data.hints),
                "text": text_meta,
                "autoencoder": autoencoder_cfg,
                "autoencoder_identity": autoencoder.identity,
                **(extra or {}),
            },
        )
    return out


@dataclass
class LoadedModel:
    model: SiameseDiffusion
    autoencoder: LatentAutoencoder
    meta: dict[str, Any]

    @property
    def prompt(self) -> str:
        return self.meta["prompt"]


def export_hints(meta: dict[str, Any], meta_path: Path) -> tuple[str, ...]:
    """The extra hint maps an export is conditioned on (none in exports before them)."""
    hints = meta.get("hints", [])
    if not isinstance(hints, list) or not all(isinstance(h, str) for h in hints):
        raise SiamdiffError(f"hints must be a list of hint names, got {hints!r}", meta_path)
    return tuple(hints)


def read_export_meta(path: Path) -> dict[str, Any]:
    """An export's ``siamdiff.json``, every field siamdiff reads checked (one line naming it)."""
    meta_path = path / META_NAME
    meta = read_json(meta_path, "export metadata", "not a siamdiff export: run `siamdiff export`")
    if not isinstance(meta, dict):
        raise SiamdiffError("is not a JSON object", meta_path)
    if meta.get("format") != EXPORT_FORMAT or meta.get("format_version") != EXPORT_VERSION:
        raise SiamdiffError(f"unsupported export format {meta.get('format_version')!r}", meta_path)
    lacking = [key for key in META_KEYS if key not in meta]
    if lacking:
        raise SiamdiffError(f"lacks {', '.join(lacking)}", meta_path)
    _check_meta(meta, meta_path)
    return meta


def load_export(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Load an export directory for sampling (eval mode, no gradients)."""
    path = Path(path)
    meta_path = path / META_NAME
    meta = read_export_meta(path)
    autoencoder_cfg = dict(meta["autoencoder"])
    copied = autoencoder_cfg.get("path") == AUTOENCODER_DIR
    if copied:  # the copy inside the export
        autoencoder_cfg["path"] = str(path / AUTOENCODER_DIR)
    parts = (*PARTS, AUTOENCODER_DIR) if copied else PARTS
    missing = [f"{name}/" for name in parts if not (path / name).is_dir()]
    if missing:  # diffusers would take a missing folder for a Hub id and talk of connecting
        raise SiamdiffError(f"incomplete export (no {', '.join(missing)})", path)
    autoencoder = load_autoencoder(autoencoder_cfg)
    if autoencoder.identity != meta["autoencoder_identity"]:
        raise SiamdiffError(
            "the autoencoder weights differ from those the model was trained with",
            autoencoder_cfg.get("path") or meta_path,
        )
    local = {"local_files_only": True}
    try:
        backbone = Backbone(
            unet=load_complete(
                UNet2DConditionModel.from_pretrained,
                "UNet",
                path / "unet",
                pretrained_model_name_or_path=path / "unet",
                **local,
            ),
            controlnet=load_complete(
                DHIControlNetModel.from_pretrained,
                "ControlNet",
                path / "controlnet",
                pretrained_model_name_or_path=path / "controlnet",
                **local,
            ),
            text=_load_text(path / "text", meta["text"]),
            noise_scheduler=DDPMScheduler.from_pretrained(path / "scheduler", **local),
        )
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as exc:
        raise SiamdiffError(f"incomplete export ({first_line(exc)})", path) from exc
    check_prediction_type(backbone.noise_scheduler, path / "scheduler")
    hints = export_hints(meta, meta_path)
    if backbone.controlnet.config.conditioning_channels != BASE_HINT_CHANNELS + len(hints):
        raise SiamdiffError(
            f"the ControlNet takes {backbone.controlnet.config.conditioning_channels} hint "
            f"channels but {META_NAME} lists hints {list(hints)}",
            meta_path,
        )
    model = SiameseDiffusion(backbone, mode=meta["mode"]).requires_grad_(False).eval()
    return LoadedModel(model.to(device), autoencoder.to(device), meta)


def _check_meta(meta: dict[str, Any], meta_path: Path) -> None:
    """One line naming the field of a hand-edited or damaged ``siamdiff.json`` that loading
    would otherwise trip over with a traceback, or after the weights had loaded."""
    autoencoder, text, resolution = meta["autoencoder"], meta["text"], meta["resolution"]
    scaling = autoencoder.get("scaling_factor") if isinstance(autoencoder, dict) else None
    # Older exports lack these two: they were trained on crops, on unrecorded data.
    crop, data = meta.get("crop", "crop"), meta.get("trained_on")
    problems = {
        "autoencoder must be an object naming its kind": not isinstance(autoencoder, dict)
        or not isinstance(autoencoder.get("kind"), str),
        "autoencoder.scaling_factor must be a number": scaling is not None
        and (isinstance(scaling, bool) or not isinstance(scaling, int | float)),
        "text must be an object of kind learned or clip": not isinstance(text, dict)
        or text.get("kind") not in ("learned", "clip"),
        f"mode must be one of {', '.join(MODES)}, got {meta['mode']!r}": meta["mode"] not in MODES,
        f"resolution must be a positive multiple of 8, got {resolution!r}": isinstance(
            resolution, bool
        )
        or not isinstance(resolution, int)
        or resolution <= 0
        or resolution % 8 != 0,
        f"crop must be one of {', '.join(CROP_MODES)}, got {crop!r}": crop not in CROP_MODES,
        # Sampled sets record it; train-segmenter reads it to keep test images out of training.
        f"trained_on must be {TRAINED_ON}, got {data!r}": not is_trained_on(data),
    }
    for problem, found in problems.items():
        if found:
            raise SiamdiffError(problem, meta_path)


def _copy_writable(source: Path, target: Path) -> None:
    """Copy a weights folder with the umask's modes: a read-only source (a shared weights
    store) copied as read-only could not be deleted, nor replaced by ``--overwrite``."""
    shutil.copytree(source, target, copy_function=shutil.copyfile)
    for folder in (target, *(p for p in target.rglob("*") if p.is_dir())):
        folder.chmod(folder.stat().st_mode | stat.S_IWUSR)


def export_run(
    run: str | Path,
    out: str | Path,
    checkpoint: str | None = None,
    overwrite: bool = False,
    copy_autoencoder: bool = True,
) -> Path:
    """Export one checkpoint (default: the newest) of a training run (``copy_autoencoder``:
    see :func:`save_model`)."""
    # The run layout belongs to train.py.
    from siamdiff.train import (
        checkpoint_dir,
        checkpoint_problem,
        checkpoints,
        last_valid_checkpoint,
    )

    run, out = Path(run), Path(out)
    found = checkpoints(run)
    if not found:
        raise SiamdiffError("no checkpoints (is this a `siamdiff train` run directory?)", run)
    check_apart(out, run, "the run")
    if checkpoint is None:
        chosen = last_valid_checkpoint(run)
    else:  # a folder name, or its step number alone
        chosen = run / "checkpoints" / checkpoint
        if checkpoint.isdigit():
            chosen = checkpoint_dir(run, int(checkpoint))
        if chosen not in found:
            names = ", ".join(c.name for c in found[-5:])
            raise SiamdiffError(
                f"no complete checkpoint {checkpoint!r} (the newest: {names})", run / "checkpoints"
            )
        problem = checkpoint_problem(chosen)
        if problem:
            raise SiamdiffError(f"damaged checkpoint: {problem}", chosen)
    cfg = load_config(run / RUN_CONFIG)
    for source, what in ((cfg.data.root, "data"), (cfg.data.latent_cache, "latent cache")):
        if source:  # a resume verifies these: files written into them would stop it
            check_apart(out, source, f"the run's training {what}")
    model, autoencoder, _ = build_model(cfg)
    weights = load_file(chosen / "model.safetensors")
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as exc:  # tensors of other shapes (a config.yaml edited since)
        raise SiamdiffError(
            f"checkpoint does not match the run's config ({first_line(exc)})",
            chosen / "model.safetensors",
        ) from exc
    if missing or unexpected:
        raise SiamdiffError(
            f"checkpoint does not match the run's config ({len(missing)} missing, "
            f"{len(unexpected)} unexpected tensors)",
            chosen / "model.safetensors",
        )
    state = json.loads((chosen / "trainer_state.json").read_text())
    trained_with = state.get("autoencoder_identity", autoencoder.identity)  # older: unrecorded
    if autoencoder.identity != trained_with:
        raise SiamdiffError(
            "is not the autoencoder the run was trained with (other weights or scaling: its "
            "samples would decode other latents); put that one back to use this run",
            cfg.autoencoder.path or f"autoencoder.kind={cfg.autoencoder.kind}",
        )
    return save_model(
        model,
        cfg,
        autoencoder,
        out,
        overwrite=overwrite,
        extra={
            "source_run": str(run.resolve()),
            "step": state["step"],
            "weights_sha256": weights_digest(chosen),
            "trained_on": trained_on(cfg, state),
        },
        copy_autoencoder=copy_autoencoder,
    )


def trained_on(cfg: Any, state: dict[str, Any]) -> dict[str, Any]:
    """Which images a run learned from: a segmentation utility must never score a generator
    on test images it was trained on. Their fingerprint, as the checkpoint's trainer
    ``state`` recorded it, still names them once their folder is renamed or holds other data
    (checkpoints of older versions lack it: then the data's now, unless it is gone)."""
    learned = {"data": str(cfg.data.root), "split": cfg.data.split}
    if "images_fingerprint" in state:
        return learned | {"images": state["images_fingerprint"]}
    try:
        return learned | {"images": load_manifest(cfg.data.root).images_fingerprint(cfg.data.split)}
    except SiamdiffError:
        return learned


def weights_digest(checkpoint: Path) -> str | None:
    """SHA-256 of a checkpoint's model weights, from its checksums (verified before use)."""
    from siamdiff.train import CHECKSUMS_NAME  # the run layout's owner

    return json.loads((checkpoint / CHECKSUMS_NAME).read_text()).get("model.safetensors")

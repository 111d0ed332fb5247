"""Polyp segmenters from segmentation-models-pytorch: train, save, load, run, score.

One segmenter, trained on the REAL training split only with a fixed seed, is the yardstick
of the domain metrics: its pooled encoder features give FD-seg / KID-seg and its masks on
synthetic images give the mask fidelity. Segmenters trained on real (+ synthetic) data
measure the segmentation utility.

Models start from random weights (``encoder_weights=None``): nothing is ever downloaded.
Frames are squashed whole to ``size x size`` (the polyp benchmark protocol, as in PraNet),
never cropped around the lesion: a crop placed by the ground-truth mask would leak the
answer into the test images. The distribution metrics are another matter: they compare real
and synthetic images in the view the generator works in
(:func:`siamdiff.data.dataset.generator_views`).

A saved segmenter is a directory: ``model.safetensors`` + ``segmenter.json`` (settings,
training data identity, loss history, validation scores, speed).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset
from torchvision.transforms import v2
from tqdm import tqdm

from siamdiff import __version__
from siamdiff.atomic import (
    atomic_output_dir,
    atomic_write_bytes,
    atomic_write_json,
    check_apart,
    read_json,
)
from siamdiff.data.dataset import PairedDataset, SeededAugmentation
from siamdiff.data.manifest import Manifest, load_manifest, require_intact
from siamdiff.data.transforms import (
    PairedResize,
    RandomRot90,
    Sample,
    ToModelTensors,
    to_tv_tensors,
)
from siamdiff.errors import SiamdiffError, first_line
from siamdiff.rng import all_seeded, cpu_seeded
from siamdiff.runtime import device_label

CONFIG_NAME = "segmenter.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "siamdiff-segmenter"
FORMAT_VERSION = 1


def frame_transforms(size: int, train: bool) -> Callable[[Sample], Sample]:
    """Whole frame -> ``size x size`` model tensors (image in [-1, 1], mask in {0, 1}).

    Training adds flips and 90° turns, which polyp frames have no preferred direction for.
    """
    steps: list[Callable[[Sample], Sample]] = [
        to_tv_tensors,
        v2.ToDtype(torch.float32, scale=True),
        PairedResize((size, size), antialias=True),
    ]
    if train:
        steps += [v2.RandomHorizontalFlip(0.5), v2.RandomVerticalFlip(0.5), RandomRot90(0.5)]
    steps.append(ToModelTensors("rgb"))
    return v2.Compose(steps)


def frames(root: str | Path, split: str | None, size: int) -> PairedDataset:
    """One split (``None``: every record) of a siamdiff dataset as whole ``size`` px frames."""
    return PairedDataset(root, split=split, transform=frame_transforms(size, train=False))


def training_split(manifest: Manifest, root: str | Path, real_root: str | Path) -> str | None:
    """What of a dataset a segmenter trains on: a real one's train split; a synthetic set
    whole, if every pair in it was sampled from a training mask (a pair sampled from a val or
    test mask would show the segmenter the very masks it is scored on), by a model that never
    learned from ``real_root``'s val or test images."""
    if manifest.kind != "synthetic":
        return "train"
    leaking = sum(record.split != "train" for record in manifest.records)
    if leaking:
        raise SiamdiffError(
            f"{leaking} of {len(manifest.records)} synthetic pairs were sampled from val or test "
            "masks: a segmenter trained on them would see the masks it is scored on "
            "(sample with --masks DATA:train)",
            root,
        )
    generator = manifest.preprocessing.get("synthesis", {}).get("model_trained_on") or {}
    if _learned_scored_images(generator, real_root):
        learned = "every split" if generator["split"] is None else f"the {generator['split']} split"
        raise SiamdiffError(
            f"was sampled by a model trained on {learned} of {generator.get('data')}: a "
            "segmenter trained on its images would learn the test images it is scored on "
            "(train the generator with data.split=train)",
            root,
        )
    return None


def _learned_scored_images(generator: dict[str, Any], real_root: str | Path) -> bool:
    """Whether a generator trained on ``generator`` (export.trained_on; empty for sets of
    older versions) learned from images of ``real_root``'s val or test split: by their hashes
    while its data is there, unchanged; once gone or replaced, ``real_root`` is that data when
    the images' fingerprint or (older exports) the path says so."""
    if not generator:
        return False
    data, split, images = Path(generator["data"]), generator["split"], generator.get("images")
    is_real = data.resolve() == Path(real_root).resolve()
    if split == "train" and is_real:  # re-prepared, train frames stay in train (prepare)
        return False
    scored = scored_images_learned(data, split, real_root, images)
    if scored is not None:
        return scored > 0
    if images is not None:  # moved, gone or replaced: the real data may be it, renamed
        is_real = load_manifest(real_root).images_fingerprint(split) == images
    return split != "train" and is_real


def scored_images_learned(
    data: str | Path, split: str | None, real_root: str | Path, images: str | None = None
) -> int | None:
    """How many of ``real_root``'s val and test images (by hash) are in ``split`` of the
    dataset at ``data`` (every split for None); None when that dataset cannot be read, or
    when its images there are not those of the fingerprint ``images`` (replaced since)."""
    try:
        manifest = load_manifest(data)
    except SiamdiffError:
        return None
    if images is not None and manifest.images_fingerprint(split) != images:
        return None
    learned = manifest.split(split)
    scored = {r.image_sha256 for r in load_manifest(real_root).records if r.split != "train"}
    return sum(record.image_sha256 in scored for record in learned)


def dice_iou(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image Dice and IoU of boolean masks shaped ``B x ...``.

    Dice = 2|P∩T| / (|P| + |T|), IoU = |P∩T| / |P∪T|. Both are defined as 1.0 when
    prediction and target are both empty (a correct "no lesion"), and are 0.0 when exactly
    one of them is empty.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    pred, target = pred.flatten(1).bool(), target.flatten(1).bool()
    intersection = (pred & target).sum(1).double()
    union = (pred | target).sum(1).double()
    total = pred.sum(1).double() + target.sum(1).double()
    empty = union == 0
    dice = torch.where(empty, 1.0, 2.0 * intersection / total.clamp_min(1.0))
    iou = torch.where(empty, 1.0, intersection / union.clamp_min(1.0))
    return dice, iou


@dataclass(frozen=True)
class SegmenterSpec:
    """What builds the network: an smp architecture, its encoder and the input size."""

    arch: str = "unet"
    encoder: str = "resnet18"
    size: int = 256

    def build(self) -> nn.Module:
        if self.size <= 0 or self.size % 32:
            raise SiamdiffError(
                f"segmenter size must be a positive multiple of 32, got {self.size}"
            )
        try:
            return smp.create_model(
                self.arch, encoder_name=self.encoder, encoder_weights=None, classes=1
            )
        # smp / timm: an unknown architecture or encoder, or one the pair cannot make (DPT)
        except (KeyError, RuntimeError, ValueError) as exc:
            # smp's message goes on to list every option; its first clause names the culprit.
            detail = re.split(r"[.,] ", str(exc.args[0]), maxsplit=1)[0]
            raise SiamdiffError(
                f"cannot build segmenter {self.arch}/{self.encoder}: {detail}"
            ) from exc

    def check_trains(self, batch_size: int) -> None:
        """Build the network and take one training step's forward and backward pass on a
        blank batch: an architecture that builds but cannot train at this size (PAN below
        128 px) or batch (DeepLabV3's BatchNorm on one image) fails here, not after hours."""
        batch = min(batch_size, 2)
        with cpu_seeded(0):
            model = self.build().train()
            try:
                model(torch.zeros(batch, 3, self.size, self.size)).sum().backward()
            except (RuntimeError, ValueError) as exc:
                raise SiamdiffError(
                    f"segmenter {self.arch}/{self.encoder} cannot train at {self.size} px in "
                    f"batches of {batch_size} ({first_line(exc)})"
                ) from exc


def drops_last_batch(images: int, batch_size: int) -> bool:
    """Whether an epoch leaves out its last, partial batch: BatchNorm cannot train on a batch
    of one sample, but a set smaller than a batch trains on what it has."""
    return images > batch_size


def steps_per_epoch(images: int, batch_size: int) -> int:
    """Optimiser steps in one epoch of ``images`` (:func:`drops_last_batch`)."""
    rounding = math.floor if drops_last_batch(images, batch_size) else math.ceil
    return rounding(images / batch_size)


def check_training_settings(epochs: int, batch_size: int, lr: float) -> None:
    if epochs < 1 or batch_size < 1 or not 0 < lr < math.inf:
        raise SiamdiffError(
            "need epochs >= 1, batch size >= 1 and a finite lr > 0, "
            f"got {epochs}, {batch_size}, {lr}"
        )


class Segmenter:
    """A trained network in eval mode. Inputs: ``B x 3 x H x W`` images in [-1, 1] of any
    size (resized to the training size and back); outputs come back on the CPU."""

    def __init__(self, model: nn.Module, spec: SegmenterSpec, device: str | torch.device) -> None:
        self.spec = spec
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()

    def _encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = images.to(self.device, torch.float32)
        if x.shape[-2:] != (self.spec.size, self.spec.size):
            x = F.interpolate(x, size=(self.spec.size,) * 2, mode="bilinear", antialias=True)
        return self.model.encoder(x)

    @staticmethod
    def _pool(stages: list[torch.Tensor]) -> torch.Tensor:
        return stages[-1].mean(dim=(2, 3)).float().cpu()

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Lesion probabilities, ``B x 1 x H x W``."""
        return self.predict_and_features(images)[0]

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Global average pool of the deepest encoder stage, ``B x C`` (512 for resnet18)."""
        with torch.inference_mode():
            return self._pool(self._encode(images))

    def predict_and_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both of the above from one encoder pass."""
        with torch.inference_mode():
            stages = self._encode(images)
            logits = self.model.segmentation_head(self.model.decoder(stages))
            if logits.shape[-2:] != images.shape[-2:]:
                logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear")
            if not torch.isfinite(logits).all():
                raise SiamdiffError(
                    "segmenter predictions are not finite (it diverged?): its Dice would read "
                    "as no lesion found; retrain it"
                )
            return torch.sigmoid(logits).float().cpu(), self._pool(stages)


@dataclass
class SegmentationScores:
    """Per-image results of a segmenter on a dataset, in dataset order."""

    ids: list[str]
    dice: np.ndarray
    iou: np.ndarray
    features: np.ndarray

    def summary(self) -> dict[str, float | int]:
        return {
            "mdice": float(self.dice.mean()),
            "miou": float(self.iou.mean()),
            "images": len(self.ids),
        }


def score_segmenter(
    segmenter: Segmenter,
    dataset: Dataset,
    batch_size: int = 16,
    *,
    workers: int = 0,
    progress: bool = False,
    desc: str = "segment",
) -> SegmentationScores:
    """Dice / IoU of the thresholded (p >= 0.5) predictions against each sample's mask,
    and the pooled features, for every sample of ``dataset``."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    ids: list[str] = []
    dice, iou, features = [], [], []
    for batch in tqdm(loader, desc=desc, unit="batch", disable=not progress, leave=False):
        probabilities, pooled = segmenter.predict_and_features(batch["image"])
        batch_dice, batch_iou = dice_iou(probabilities >= 0.5, batch["mask"] >= 0.5)
        ids += list(batch["meta"]["id"])
        dice.append(batch_dice.numpy())
        iou.append(batch_iou.numpy())
        features.append(pooled.numpy())
    return SegmentationScores(
        ids, np.concatenate(dice), np.concatenate(iou), np.concatenate(features)
    )


def training_set(
    data_root: str | Path, extra_roots: Sequence[str | Path], size: int
) -> tuple[Dataset, list[dict[str, Any]]]:
    """The real training split plus every extra dataset (see :func:`training_split`),
    with training augmentation; and a description of each part for the record."""
    parts, described = [], []
    for root in (data_root, *extra_roots):
        manifest = load_manifest(root)
        split = training_split(manifest, root, data_root)
        dataset = PairedDataset(root, split=split, transform=frame_transforms(size, train=True))
        parts.append(dataset)
        described.append(
            {
                "root": str(Path(root).resolve()),
                "kind": manifest.kind,
                "split": split or "all",
                "dataset_version": manifest.dataset_version,
                "fingerprint": manifest.images_fingerprint(split),
                "images": len(dataset),
            }
        )
    return ConcatDataset(parts), described


def fit_segmenter(
    dataset: Dataset,
    spec: SegmenterSpec,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: str | torch.device = "cpu",
    workers: int = 0,
    progress: bool = True,
    desc: str = "train-segmenter",
) -> tuple[Segmenter, dict[str, Any]]:
    """Train ``spec`` on ``dataset`` in memory: BCE + Dice loss, AdamW, cosine decay.

    Deterministic for a seed on the CPU (weights, shuffling, augmentation and, on a GPU,
    dropout all draw from it; each sample's augmentation from (seed, epoch, index), whatever
    ``workers``); the caller's RNG states, CPU and GPU, are restored afterwards. Returns
    the segmenter and the training record (loss per epoch, steps, images per second).
    """
    check_training_settings(epochs, batch_size, lr)
    seeded = SeededAugmentation(dataset, seed)
    with all_seeded(seed):
        model = spec.build().to(device).train()
        loader = DataLoader(
            seeded,
            batch_size=batch_size,
            shuffle=True,
            num_workers=workers,
            drop_last=drops_last_batch(len(dataset), batch_size),
            generator=torch.Generator().manual_seed(seed),
        )
        optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, epochs * len(loader))
        dice_loss = smp.losses.DiceLoss(mode="binary", from_logits=True)
        history, seen, started = [], 0, time.perf_counter()
        with tqdm(total=epochs * len(loader), desc=desc, unit="step", disable=not progress) as bar:
            for epoch in range(epochs):
                total = 0.0
                seeded.epoch = epoch  # workers start each epoch with a copy of it
                for batch in loader:
                    images, masks = batch["image"].to(device), batch["mask"].to(device)
                    logits = model(images)
                    loss = F.binary_cross_entropy_with_logits(logits, masks) + dice_loss(
                        logits, masks
                    )
                    if not torch.isfinite(loss):
                        raise SiamdiffError(
                            f"the segmenter's loss became {loss.item()} in epoch {epoch + 1} "
                            "(try a lower learning rate)"
                        )
                    optimiser.zero_grad(set_to_none=True)
                    loss.backward()
                    optimiser.step()
                    schedule.step()
                    total += loss.item()
                    seen += len(images)
                    bar.update()
                    # refresh=False: drawn at tqdm's own pace (in a log, a line per redraw)
                    bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}", refresh=False)
                history.append({"epoch": epoch + 1, "loss": total / len(loader)})
        elapsed = time.perf_counter() - started
    record = {
        "device": device_label(device),
        "history": history,
        "steps": epochs * len(loader),
        "images_per_second": seen / elapsed,
        "seconds": elapsed,
    }
    return Segmenter(model, spec, device), record


def train_segmenter(
    data_root: str | Path,
    out_dir: str | Path,
    *,
    arch: str = "unet",
    encoder: str = "resnet18",
    size: int = 256,
    epochs: int = 10,
    batch_size: int = 8,
    lr: float = 1e-3,
    seed: int = 0,
    extra_roots: Sequence[str | Path] = (),
    device: str | torch.device = "cpu",
    workers: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    verify: bool = True,
) -> Path:
    """Train a segmenter on the train split of ``data_root`` (plus ``extra_roots``) and
    save it to ``out_dir``, which appears whole or not at all. Its score on the val split,
    when there is one, goes into ``segmenter.json``. Returns ``out_dir``. ``verify``: each
    dataset is refused up front when its files no longer match its manifest."""
    check_training_settings(epochs, batch_size, lr)
    for root in (data_root, *extra_roots):
        check_apart(out_dir, root, "the dataset")
    replaced = Path(out_dir)  # --overwrite replaces a segmenter (or an empty folder) only
    foreign = replaced.is_dir() and not (replaced / CONFIG_NAME).is_file()
    if overwrite and foreign and any(replaced.iterdir()):
        raise SiamdiffError("exists and is not a segmenter: refusing to replace it", out_dir)
    spec = SegmenterSpec(arch, encoder, size)
    spec.check_trains(batch_size)  # a bad arch, encoder or size fails before any data is read
    dataset, data = training_set(data_root, extra_roots, size)
    # Entered before training, so an existing out_dir is refused before hours are spent.
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        for root in (data_root, *extra_roots) if verify else ():
            require_intact(root, "pass --no-verify")
        segmenter, record = fit_segmenter(
            dataset,
            spec,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            device=device,
            workers=workers,
            progress=progress,
        )
        if load_manifest(data_root).split("val"):
            val = score_segmenter(segmenter, frames(data_root, "val", size), batch_size)
            record["val"] = val.summary()
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created_by": f"siamdiff {__version__}",
            "spec": asdict(spec),
            "training": {"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed},
            "data": data,
            **record,
        }
        model = segmenter.model
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        atomic_write_bytes(tmp / WEIGHTS_NAME, save_safetensors(state))
        atomic_write_json(tmp / CONFIG_NAME, config)
    return Path(out_dir)


def read_segmenter_config(directory: str | Path) -> dict[str, Any]:
    """``segmenter.json`` of a saved segmenter, checked; one-line SiamdiffError otherwise."""
    path = Path(directory) / CONFIG_NAME
    config = read_json(path, "segmenter settings", "train one with train-segmenter")
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise SiamdiffError("not a siamdiff segmenter config", path)
    if config.get("format_version") != FORMAT_VERSION:
        raise SiamdiffError(
            f"segmenter format {config.get('format_version')!r} is not supported", path
        )
    data = config.get("data", [])
    if not isinstance(config.get("spec"), dict) or not (
        isinstance(data, list) and all(isinstance(entry, dict) for entry in data)
    ):
        raise SiamdiffError("spec must be a mapping and data a list of mappings", path)
    return config


def load_segmenter(directory: str | Path, device: str | torch.device = "cpu") -> Segmenter:
    """The segmenter saved by :func:`train_segmenter` in ``directory``."""
    config = read_segmenter_config(directory)
    config_path = Path(directory) / CONFIG_NAME
    # Every field given: a default (size 256) would score a 64 px segmenter at the wrong size.
    lacking = [f.name for f in fields(SegmenterSpec) if f.name not in config["spec"]]
    if lacking:
        raise SiamdiffError(f"spec lacks {', '.join(lacking)}", config_path)
    try:
        spec = SegmenterSpec(**config["spec"])
    except TypeError as exc:
        raise SiamdiffError(f"bad segmenter spec ({exc})", config_path) from exc
    for field, kind, named in (
        ("arch", str, "a string"),
        ("encoder", str, "a string"),
        ("size", int, "an integer"),
    ):
        value = getattr(spec, field)
        if type(value) is not kind:
            raise SiamdiffError(f"spec.{field} must be {named}, got {value!r}", config_path)
    try:
        model = spec.build()
    except SiamdiffError as exc:
        raise SiamdiffError(str(exc), config_path) from exc
    weights = Path(directory) / WEIGHTS_NAME
    try:
        state = load_safetensors(weights.read_bytes())
    except (OSError, SafetensorError) as exc:
        raise SiamdiffError(f"cannot read segmenter weights ({exc})", weights) from exc
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise SiamdiffError(
            f"weights do not fit a {spec.arch}/{spec.encoder} segmenter", weights
        ) from exc
    broken = [name for name, tensor in state.items() if not torch.isfinite(tensor).all()]
    if broken:  # a NaN head predicts no lesion anywhere, scored as a measured Dice of 0
        raise SiamdiffError(
            f"{len(broken)} weight tensors hold NaN/Inf ({broken[0]}, ...): the segmenter "
            "diverged or the file is damaged; retrain it",
            weights,
        )
    return Segmenter(model, spec, device)

"""Training samples: the image-mask pairs of a prepared dataset, through paired transforms."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from siamdiff.data.manifest import MANIFEST_NAME, Record, load_manifest
from siamdiff.data.readers import load_mask, load_prepared_hint, load_rgb
from siamdiff.data.transforms import Sample, TransformConfig, build_transforms
from siamdiff.errors import SiamdiffError
from siamdiff.rng import cpu_seeded


class PairedDataset(Dataset):
    """Samples ``{"image", "mask", "hints", "meta"}`` of one split of a prepared dataset.

    ``split=None`` takes every record. Without ``transform`` the samples go through the
    eval pipeline at the stored size (the shorter side that ``siamdiff prepare`` wrote).
    ``hints`` names the extra hint maps to load, in that channel order (docs/hints.md).
    """

    def __init__(
        self,
        root: str | Path,
        split: str | None = "train",
        transform: Callable[[Sample], Sample] | None = None,
        hints: Sequence[str] = (),
    ) -> None:
        self.root = Path(root)
        manifest = load_manifest(self.root)
        self.records: list[Record] = manifest.split(split)
        if not self.records:
            which = "records" if split is None else f"{split!r} records"
            raise SiamdiffError(f"dataset has no {which}", self.root)
        self.hints = tuple(hints)
        for record in self.records:
            lacking = [name for name in self.hints if name not in record.hints]
            if lacking:
                has = ", ".join(sorted(record.hints)) or "none"
                raise SiamdiffError(
                    f"record {record.id} has no hint {lacking[0]!r} (its hints: {has}); "
                    "prepare the data with that hint (docs/hints.md)",
                    self.root / MANIFEST_NAME,
                )
        if transform is None:
            size = min(min(r.width, r.height) for r in self.records)
            transform = build_transforms(TransformConfig(size=size), train=False)
        self.transform = transform

    @property
    def coverages(self) -> list[float]:
        """Lesion fraction of each sample, in index order (for the balanced sampler)."""
        return [r.coverage for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        image = load_rgb(self.root / record.image)
        mask = load_mask(self.root / record.mask)
        hints = [load_prepared_hint(self.root / record.hints[name]["file"]) for name in self.hints]
        files = [("mask", record.mask, mask)]
        files += [
            ("hint", record.hints[n]["file"], a) for n, a in zip(self.hints, hints, strict=True)
        ]
        for kind, name, array in files:
            if array.shape != image.shape[:2]:
                raise SiamdiffError(
                    f"{kind} is {array.shape[1]}x{array.shape[0]} but its image is "
                    f"{image.shape[1]}x{image.shape[0]}",
                    self.root / name,
                )
        meta = {
            "id": record.id,
            "dataset": record.dataset,
            "group": record.group,
            "coverage": record.coverage,
            "image_sha256": record.image_sha256,
            "mask_sha256": record.mask_sha256,
        }
        stacked = np.stack(hints, axis=-1) if hints else np.zeros((*mask.shape, 0), np.uint8)
        return self.transform({"image": image, "mask": mask, "hints": stacked, "meta": meta})


class SeededAugmentation(Dataset):
    """Seeds each sample's random transforms by (seed, epoch, index, occurrence).

    A sample's augmentation then no longer depends on which worker loads it or on
    how many samples that worker saw before, so a resumed run reproduces the
    augmentations of an uninterrupted one. ``occurrence`` counts the earlier draws of the
    index this epoch (``BalancedBatchSampler.keyed_batches``): the balanced sampler draws the
    frames of its larger pool more than once, and each draw gets its own crop and flips. The
    caller's RNG is left untouched.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, occurrence = key if isinstance(key, tuple) else (key, 0)
        # A first draw keeps the (seed, epoch, index) seed of checkpoints written before
        # occurrences were counted, so their single-process resumes stay exact.
        entropy = [self.seed, self.epoch, index] + ([occurrence] if occurrence else [])
        seed = np.random.SeedSequence(entropy).generate_state(1)[0]
        with cpu_seeded(int(seed)):
            return self.dataset[index]


@dataclass(frozen=True)
class GeneratorView:
    """How a generator frames the images it learns and samples: the lesion-centred ``crop``
    mode (``data.transforms.crop``) and its ``resolution`` (None: the size looked at)."""

    crop: str = "crop"
    resolution: int | None = None

    @classmethod
    def of_synthesis(cls, settings: Mapping[str, Any]) -> GeneratorView:
        """The view of a synthetic set, from its manifest's ``preprocessing.synthesis``
        (``crop`` is recorded when it is not the default)."""
        return cls(str(settings.get("crop", "crop")), settings.get("resolution"))


DEFAULT_VIEW = GeneratorView()  # the lesion-centred crop, at the size looked at


def generator_views(
    root: str | Path,
    split: str | None,
    size: int,
    hints: Sequence[str] = (),
    view: GeneratorView = DEFAULT_VIEW,
) -> PairedDataset:
    """A dataset as the generator sees it when it trains and samples: the eval pipeline (the
    lesion-centred square crop) at ``size`` px. The masks ``siamdiff sample`` conditions on,
    and the real images the distribution metrics compare its samples with: synthetic images
    are this view, and against whole frames (a 4:3 frame squashed square, its black borders
    and overlays included) FD, KID, CLIP-I and colour statistics would count the view itself
    as a difference. With ``view.resolution`` (the generator's size, when a metric looks at
    ``size`` px) the view is taken at that resolution and resized to ``size``, as its samples
    are: a real view cropped at 256 px holds detail a 128 px sample upsampled never has."""
    cfg = TransformConfig(size=view.resolution or size, crop=view.crop)
    transform = build_transforms(cfg, False, shown_at=size)
    return PairedDataset(root, split, transform=transform, hints=hints)

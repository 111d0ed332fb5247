"""PairedDataset on a tiny prepared dataset written here: shapes, ranges, meta, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from siamdiff.atomic import atomic_save_png
from siamdiff.data.dataset import PairedDataset
from siamdiff.data.manifest import Manifest, save_pair, write_manifest
from siamdiff.data.sampling import BalancedBatchSampler
from siamdiff.data.transforms import TransformConfig, build_transforms
from siamdiff.errors import SiamdiffError

HEIGHT, WIDTH = 32, 44  # shorter side 32, as `siamdiff prepare --size 32` would write


def write_dataset(root: Path, splits: list[str]) -> Path:
    """One pair per entry of ``splits``: red channel = mask, lesion radius growing with i."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    records = []
    for i, split in enumerate(splits):
        mask = (yy - 16) ** 2 + (xx - 10 - i) ** 2 <= (3 + i) ** 2
        image = rng.integers(0, 256, size=(HEIGHT, WIDTH, 3), dtype=np.uint8)
        image[..., 0] = mask * 255
        name = f"demo-g{i % 3}-{i:03d}"
        records.append(
            save_pair(
                root,
                name,
                image,
                mask,
                dataset="demo",
                group=f"g{i % 3}",
                frame=f"{i:03d}",
                split=split,
            )
        )
    write_manifest(root, Manifest(records=records, preprocessing={"size": HEIGHT}))
    return root


@pytest.fixture
def dataset_root(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "ds", ["train"] * 6 + ["val"] * 2)


def test_samples_have_the_model_layout(dataset_root: Path) -> None:
    dataset = PairedDataset(dataset_root)
    assert len(dataset) == 6
    sample = dataset[2]
    assert sample["image"].shape == (3, HEIGHT, HEIGHT) and sample["image"].dtype == torch.float32
    assert sample["mask"].shape == (1, HEIGHT, HEIGHT) and sample["mask"].dtype == torch.float32
    assert sample["image"].min() >= -1 and sample["image"].max() <= 1
    assert set(sample["mask"].unique().tolist()) == {0.0, 1.0}
    # Stored size: no resampling, so the red channel is exactly the mask.
    assert torch.equal(sample["image"][0] > 0, sample["mask"][0] > 0)
    record = dataset.records[2]
    assert sample["meta"] == {
        "id": record.id,
        "dataset": "demo",
        "group": record.group,
        "coverage": record.coverage,
        "image_sha256": record.image_sha256,
        "mask_sha256": record.mask_sha256,
    }
    assert sample["mask"].sum() == round(record.coverage * HEIGHT * WIDTH)  # lesion not cropped


def test_splits_and_coverages(dataset_root: Path) -> None:
    train, val = PairedDataset(dataset_root), PairedDataset(dataset_root, split="val")
    everything = PairedDataset(dataset_root, split=None)
    assert (len(train), len(val), len(everything)) == (6, 2, 8)
    assert {r.split for r in val.records} == {"val"}
    assert train.coverages == [r.coverage for r in train.records]
    assert len(set(train.coverages)) == 6
    with pytest.raises(SiamdiffError, match="dataset has no 'test' records"):
        PairedDataset(dataset_root, split="test")


def test_training_batches_through_the_balanced_sampler(dataset_root: Path) -> None:
    dataset = PairedDataset(
        dataset_root,
        transform=build_transforms(
            TransformConfig(size=24, photometric_p=1.0, geometric_p=1.0), train=True
        ),
    )
    sampler = BalancedBatchSampler(dataset.coverages, batch_size=3)
    loader = DataLoader(dataset, batch_sampler=sampler)
    median = float(np.median(dataset.coverages))
    batches = list(loader)
    assert len(batches) == 2
    for batch in batches:
        assert batch["image"].shape == (3, 3, 24, 24) and batch["mask"].shape == (3, 1, 24, 24)
        assert sum(c > median for c in batch["meta"]["coverage"].tolist()) == 2
        assert len(batch["meta"]["id"]) == 3


def test_missing_file_names_it(dataset_root: Path) -> None:
    dataset = PairedDataset(dataset_root)
    missing = dataset_root / dataset.records[1].mask
    missing.unlink()
    with pytest.raises(SiamdiffError, match=str(missing)) as info:
        dataset[1]
    assert "\n" not in str(info.value)


def test_corrupt_file_names_it(dataset_root: Path) -> None:
    dataset = PairedDataset(dataset_root)
    broken = dataset_root / dataset.records[0].image
    broken.write_bytes(broken.read_bytes()[:60])
    with pytest.raises(SiamdiffError, match=str(broken)) as info:
        dataset[0]
    assert "\n" not in str(info.value)


def test_mask_of_another_size_is_an_error(dataset_root: Path) -> None:
    dataset = PairedDataset(dataset_root)
    record = dataset.records[0]
    atomic_save_png(dataset_root / record.mask, np.zeros((HEIGHT, WIDTH + 1), np.uint8))
    with pytest.raises(SiamdiffError, match=f"{record.mask}: mask is 45x32 but its image is 44x32"):
        dataset[0]


def test_not_a_dataset(tmp_path: Path) -> None:
    with pytest.raises(SiamdiffError, match=r"no manifest-v1\.json here"):
        PairedDataset(tmp_path)

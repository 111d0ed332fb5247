"""Tiny real-like and synthetic datasets for the evaluation tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from siamdiff.data.dataset import generator_views
from siamdiff.data.manifest import MANIFEST_NAME, Manifest, load_manifest, save_pair, write_manifest
from siamdiff.data.phantom import make_phantom_dataset
from siamdiff.data.prepare import prepare
from siamdiff.data.readers import load_mask, load_rgb

SIZE = 64


def make_synthetic(
    real_root: Path,
    out: Path,
    per_mask: int = 2,
    noise: float = 0.0,
    seed: int = 0,
    resolution: int | None = None,
    split: str = "train",
) -> Path:
    """A fake ``siamdiff sample`` output: ``per_mask`` copies of each real ``split`` image
    with Gaussian pixel noise of std ``noise`` (in 0..255 units), conditioned on its mask.
    With ``resolution`` the copies are the generator's views at that size, as a perfect
    generator of that resolution would sample them."""
    rng = np.random.default_rng(seed)
    records = []
    views = None if resolution is None else generator_views(real_root, split, resolution)
    for index, source in enumerate(load_manifest(real_root).split(split)):
        mask = load_mask(real_root / source.mask)
        clean = load_rgb(real_root / source.image).astype(np.float64)
        if views is not None:
            view = views[index]
            clean = ((view["image"].permute(1, 2, 0).numpy() + 1) * 127.5).round()
            mask = view["mask"][0].numpy() > 0.5
        for k in range(per_mask):
            image = np.clip(clean + rng.normal(0.0, noise, clean.shape), 0, 255).round()
            name = f"syn-{source.group}-{source.frame}{k}"
            records.append(
                save_pair(
                    out,
                    name,
                    image.astype(np.uint8),
                    mask,
                    dataset="syn",
                    group=source.group,
                    frame=f"{source.frame}{k}",
                    split=split,
                    source_sha256=source.mask_sha256,
                    extra={"source_id": source.id, "seed": k, "sampler": {"name": "copy"}},
                )
            )
    synthesis = {} if resolution is None else {"synthesis": {"resolution": resolution}}
    write_manifest(out, Manifest(records=records, preprocessing=synthesis, kind="synthetic"))
    return out


@pytest.fixture(scope="session")
def real_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 phantom frames at 64 px, one group each: 18 train, 3 val, 3 test."""
    base = tmp_path_factory.mktemp("real")
    raw = make_phantom_dataset(base / "raw", n=24, size=SIZE, groups=24, seed=0)
    prepare([("folder", raw)], base / "data", size=SIZE, workers=1, progress=False)
    return base / "data"


@pytest.fixture(scope="session")
def synthetic_root(real_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two lightly noised copies of every real training frame."""
    return make_synthetic(real_root, tmp_path_factory.mktemp("syn") / "syn", noise=8.0)


@pytest.fixture(scope="session")
def copies(real_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One exact copy of every real training frame."""
    return make_synthetic(real_root, tmp_path_factory.mktemp("copies") / "syn", per_mask=1)


@pytest.fixture(scope="session")
def resplit(real_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real dataset prepared otherwise: every frame, REAL's test frames too, in train."""
    other = Path(shutil.copytree(real_root, tmp_path_factory.mktemp("resplit") / "data"))
    manifest = json.loads((other / MANIFEST_NAME).read_text())
    for record in manifest["records"]:
        record["split"] = "train"
    (other / MANIFEST_NAME).write_text(json.dumps(manifest))
    return other


@pytest.fixture(scope="session")
def segmenter_dir(real_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A U-Net trained for 2 epochs on the 18 real training frames."""
    from siamdiff.evaluate.segmenter import train_segmenter

    out = tmp_path_factory.mktemp("segmenter") / "seg"
    return train_segmenter(real_root, out, size=SIZE, epochs=2, batch_size=4, progress=False)

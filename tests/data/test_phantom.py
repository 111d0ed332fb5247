"""Phantom demo data: deterministic, exact binary masks, plausible polyps, fast."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from siamdiff.data.phantom import COVERAGE_RANGE, make_phantom_dataset
from siamdiff.errors import SiamdiffError


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_phantom_dataset(tmp_path_factory.mktemp("p") / "demo", n=12, size=96, groups=4)


def pairs(root: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    masks = sorted(root.glob("*_mask.png"))
    images = [m.with_name(m.name.replace("_mask", "")) for m in masks]
    return [
        (np.asarray(Image.open(i)), np.asarray(Image.open(m)))
        for i, m in zip(images, masks, strict=True)
    ]


def test_names_follow_the_folder_layout(phantom: Path) -> None:
    names = sorted(p.name for p in phantom.iterdir())
    assert len(names) == 24
    stems = [n[: -len("_mask.png")] for n in names if n.endswith("_mask.png")]
    assert all(re.fullmatch(r"phantom-p0[0-3]-00(0\d|1[01])", s) for s in stems)
    assert all(f"{s}.png" in names for s in stems)
    groups = [s.split("-")[1] for s in stems]
    assert groups == sorted(groups) and {groups.count(g) for g in set(groups)} == {3}


def test_images_and_exact_masks(phantom: Path) -> None:
    for image, mask in pairs(phantom):
        assert image.shape == (96, 96, 3) and image.dtype == np.uint8
        assert mask.shape == (96, 96) and set(np.unique(mask)) == {0, 255}
        lesion = mask > 0
        assert COVERAGE_RANGE[0] <= lesion.mean() <= COVERAGE_RANGE[1]
        assert np.all(image[0, 0] < 30)  # vignetted corner
        # The polyp is redder than the mucosa around it.
        redness = image[..., 0].astype(float) / (image[..., 1].astype(float) + 1)
        assert np.median(redness[lesion]) > np.median(redness[~lesion])


def test_same_seed_same_bytes_other_seed_other_images(tmp_path: Path, phantom: Path) -> None:
    again = make_phantom_dataset(tmp_path / "again", n=12, size=96, groups=4)
    for path in phantom.iterdir():
        assert (again / path.name).read_bytes() == path.read_bytes()
    other = make_phantom_dataset(tmp_path / "other", n=12, size=96, groups=4, seed=1)
    assert all((other / p.name).read_bytes() != p.read_bytes() for p in phantom.glob("*_mask.png"))


def test_existing_output_needs_overwrite(tmp_path: Path) -> None:
    out = make_phantom_dataset(tmp_path / "demo", n=2, size=32, groups=1)
    with pytest.raises(SiamdiffError, match="already exists"):
        make_phantom_dataset(out, n=2, size=32)
    make_phantom_dataset(out, n=3, size=32, overwrite=True)
    assert len(list(out.glob("*_mask.png"))) == 3


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({"n": 0}, "n=0"),
        ({"size": 8}, "size=8"),
        ({"seed": -1}, "seed=-1"),
        ({"groups": 0}, "groups=0"),
    ],
)
def test_impossible_settings_are_refused_before_writing(
    tmp_path: Path, settings: dict, problem: str
) -> None:
    with pytest.raises(SiamdiffError, match=problem):
        make_phantom_dataset(tmp_path / "demo", **settings)
    assert not (tmp_path / "demo").exists()

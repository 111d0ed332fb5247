"""The study builder: balanced, seeded, blinded, and versioned."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from siamdiff.data.manifest import load_manifest
from siamdiff.data.readers import load_rgb
from siamdiff.errors import SiamdiffError
from siamdiff.rate.study import (
    STUDY_FILE,
    Study,
    build_study,
    load_study,
    mask_overlay,
    open_study,
)
from tests.rate.conftest import PER_SOURCE, REPEATS


def test_study_is_balanced_with_spaced_repeats(study: Study) -> None:
    assert Counter(item.source for item in study.items) == {
        "real": PER_SOURCE,
        "synthetic": PER_SOURCE,
    }
    assert len(study.sequence) == 2 * PER_SOURCE + REPEATS
    counts = Counter(study.sequence)
    assert sorted(counts.values()) == [1] * (2 * PER_SOURCE - REPEATS) + [2] * REPEATS
    for item, count in counts.items():
        if count == 2:
            first, second = (i for i, x in enumerate(study.sequence) if x == item)
            assert second - first >= 2


def test_images_are_blinded_copies(study: Study, phantom_data: Path, synthetic_data: Path) -> None:
    files = sorted(p.name for p in (study.root / "images").iterdir())
    assert len(files) == 2 * 2 * PER_SOURCE  # image and overlay per item
    ids = {r.id for root in (phantom_data, synthetic_data) for r in load_manifest(root).records}
    for name in files:
        assert not any(record_id in name for record_id in ids)
        assert "real" not in name and "syn" not in name
    roots = {"real": phantom_data, "synthetic": synthetic_data}
    for item in study.items:
        original = load_rgb(roots[item.source] / f"{item.record_id}.png")
        np.testing.assert_array_equal(load_rgb(study.image_path(item.name)), original)


def test_same_seed_same_selection_and_order(
    study: Study, phantom_data: Path, synthetic_data: Path, tmp_path: Path
) -> None:
    again = build_study(
        synthetic_data,
        phantom_data,
        tmp_path / "again",
        per_source=PER_SOURCE,
        repeats=REPEATS,
        seed=3,
        overlay=True,
    )
    other = build_study(
        synthetic_data,
        phantom_data,
        tmp_path / "other",
        per_source=PER_SOURCE,
        repeats=REPEATS,
        seed=4,
    )
    key = [(i.source, i.record_id) for i in study.items]
    assert [(i.source, i.record_id) for i in again.items] == key
    assert again.sequence == study.sequence
    assert [(i.source, i.record_id) for i in other.items] != key
    # A fresh secret per study: names cannot be matched across studies.
    assert {i.name for i in again.items}.isdisjoint(i.name for i in study.items)


def test_overlay_outlines_the_mask_in_green() -> None:
    image = np.zeros((12, 12, 3), np.uint8)
    mask = np.zeros((12, 12), bool)
    mask[3:9, 3:9] = True
    out = mask_overlay(image, mask)
    green = np.all(out == [0, 255, 0], axis=-1)
    assert green[3, 3] and green[8, 5] and not green[6, 6] and not green[0, 0]


def test_bad_settings_are_clear_errors(
    phantom_data: Path, synthetic_data: Path, tmp_path: Path
) -> None:
    with pytest.raises(SiamdiffError, match="--per-source must be between 1 and"):
        build_study(synthetic_data, phantom_data, tmp_path / "a", per_source=10_000)
    with pytest.raises(SiamdiffError, match="--repeats must be between 0 and 3"):
        build_study(synthetic_data, phantom_data, tmp_path / "b", per_source=2, repeats=4)
    with pytest.raises(SiamdiffError, match="manifest"):
        build_study(tmp_path, phantom_data, tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_study_from_another_version_is_refused(study: Study) -> None:
    path = study.root / STUDY_FILE
    info = json.loads(path.read_text())
    info["format_version"] = 99
    path.write_text(json.dumps(info))
    with pytest.raises(SiamdiffError, match="study format 99 is not supported") as err:
        load_study(study.root)
    assert "\n" not in str(err.value)
    with pytest.raises(SiamdiffError, match="not a siamdiff rating study"):
        path.write_text(json.dumps({"format": "other"}))
        load_study(study.root)


def test_open_study_resumes_an_existing_study(
    study: Study, phantom_data: Path, synthetic_data: Path
) -> None:
    resumed = open_study(synthetic_data, phantom_data, study.root, seed=99)
    assert resumed.sequence == study.sequence and resumed.secret == study.secret

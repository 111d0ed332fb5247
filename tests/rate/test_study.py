"""The study builder: balanced, seeded, blinded, and versioned."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from siamdiff.data.dataset import generator_views
from siamdiff.data.manifest import load_manifest
from siamdiff.data.prepare import prepare
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
from siamdiff.report import to_uint8_rgb
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
        assert re.fullmatch(r"[0-9a-f]{32}(-overlay)?\.png", name), name  # nothing but a key
    # Synthetic images are already the generator's square view: copied pixel for pixel.
    for item in study.items:
        if item.source == "synthetic":
            original = load_rgb(synthetic_data / f"{item.record_id}.png")
            np.testing.assert_array_equal(load_rgb(study.image_path(item.name)), original)


def test_real_frames_are_shown_in_the_synthetic_images_view(
    synthetic_data: Path, tmp_path: Path
) -> None:
    """Prepared real frames keep their aspect ratio; shown as they are, their shape alone
    would give the answer away."""
    raw = tmp_path / "raw"
    raw.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        image = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
        mask = np.zeros((48, 64), np.uint8)
        mask[10:30, 30 + i : 50 + i] = 255
        Image.fromarray(image).save(raw / f"wide-g{i}-0.png")
        Image.fromarray(mask).save(raw / f"wide-g{i}-0_mask.png")
    prepare([("folder", raw)], tmp_path / "real", size=24, workers=1, progress=False)
    study = build_study(synthetic_data, tmp_path / "real", tmp_path / "study", per_source=4)
    size = load_rgb(synthetic_data / load_manifest(synthetic_data).records[0].image).shape[0]
    shapes = {load_rgb(study.image_path(item.name)).shape for item in study.items}
    assert shapes == {(size, size, 3)}
    view = generator_views(tmp_path / "real", None, size)
    real = next(item for item in study.items if item.source == "real")
    index = [r.id for r in view.records].index(real.record_id)
    expected = to_uint8_rgb(view[index]["image"][None])[0].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(load_rgb(study.image_path(real.name)), expected)


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
    with pytest.raises(SiamdiffError, match="is given as both SYN and REAL"):
        build_study(phantom_data, phantom_data, tmp_path / "d")
    # In evaluate's order (REAL SYN): real frames would be scored as synthetic.
    with pytest.raises(SiamdiffError, match="is given as SYN but is a real dataset"):
        build_study(phantom_data, synthetic_data, tmp_path / "e")
    assert not any((tmp_path / name).exists() for name in "abde")
    # Two images, one of each set: room for one repeat, and the default takes what there is.
    tiny = build_study(synthetic_data, phantom_data, tmp_path / "f", per_source=1)
    assert tiny.info["settings"]["repeats"] == 1 and len(tiny.sequence) == 3


def test_the_key_the_sources_and_the_codes_are_private_to_the_owner(study: Study) -> None:
    from siamdiff.rate.storage import init_db

    init_db(study.root)
    for name in ("secret.key", STUDY_FILE, "ratings.db"):
        assert (study.root / name).stat().st_mode & 0o077 == 0, name


@pytest.mark.parametrize(
    ("field", "value"),
    [("settings", None), ("sources", []), ("settings", {"order_per_rater": True})],
)
def test_a_malformed_study_is_one_line(study: Study, field: str, value: object) -> None:
    path = study.root / STUDY_FILE
    info = json.loads(path.read_text())
    info[field] = value
    path.write_text(json.dumps(info))
    with pytest.raises(SiamdiffError, match="study is malformed") as err:
        open_study(None, None, study.root, seed=0)
    assert "\n" not in str(err.value)


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


def test_a_study_copied_without_its_images_is_not_served_but_exports(study: Study) -> None:
    from siamdiff.rate.export import export_results
    from siamdiff.rate.server import create_app

    client = create_app(study.root).test_client()
    code = client.post("/start", data={"name": "A"}).headers["Location"].rsplit("/", 1)[1]
    page = client.get(f"/rate/{code}").get_data(as_text=True)
    form = dict(re.findall(r'name="(position|token)" value="([^"]*)"', page))
    assert client.post(f"/rate/{code}", data={**form, "score": "4"}).status_code == 303
    shutil.rmtree(study.root / "images")  # copied for the analysis, without its images
    with pytest.raises(SiamdiffError, match=r"\.png: image of the study is missing"):
        create_app(study.root)
    assert export_results(study.root)["answers"] == 1


def test_open_study_resumes_an_existing_study(
    study: Study, phantom_data: Path, synthetic_data: Path
) -> None:
    resumed = open_study(synthetic_data, phantom_data, study.root, seed=3, overlay=None)
    assert resumed.sequence == study.sequence and resumed.secret == study.secret
    # Its images are inside it: the datasets need not be named (or exist) to resume it.
    assert open_study(None, None, study.root).secret == study.secret


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"seed": 99}, "built with --seed 3, not 99"),
        ({"repeats": 0}, "built with --repeats 2, not 0"),
        ({"per_source": 2}, "built with --per-source 4, not 2"),
    ],
)
def test_open_study_refuses_settings_it_was_not_built_with(
    study: Study, phantom_data: Path, synthetic_data: Path, setting: dict, message: str
) -> None:
    """A resumed study would silently ignore them: an overlay never offered, other seeds."""
    with pytest.raises(SiamdiffError, match=message):
        open_study(synthetic_data, phantom_data, study.root, **setting)


def test_a_study_is_built_into_an_empty_folder_made_for_it(
    phantom_data: Path, synthetic_data: Path, tmp_path: Path
) -> None:
    (tmp_path / "study").mkdir()
    study = open_study(synthetic_data, phantom_data, tmp_path / "study", per_source=2)
    assert len(study.items) == 4 and (tmp_path / "study" / STUDY_FILE).is_file()


def test_a_new_study_needs_its_datasets(tmp_path: Path) -> None:
    with pytest.raises(SiamdiffError, match="is not a study yet: give SYN REAL"):
        open_study(None, None, tmp_path / "new")


def test_open_study_refuses_other_datasets(
    study: Study, phantom_data: Path, synthetic_data: Path, tmp_path: Path
) -> None:
    with pytest.raises(SiamdiffError, match="built from synthetic images in") as err:
        open_study(phantom_data, phantom_data, study.root)
    assert str(study.root) in str(err.value) and "\n" not in str(err.value)

"""``prepare`` end to end: a small real subset, bad inputs, versioning, atomicity, verify."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

import siamdiff.data.manifest as manifest_module
import siamdiff.data.prepare as prepare_module
from siamdiff.data.manifest import (
    MANIFEST_NAME,
    format_verify,
    load_manifest,
    sha256_file,
    verify,
)
from siamdiff.data.phantom import make_phantom_dataset
from siamdiff.data.prepare import EMPTY_MASK, SUMMARY_NAME, prepare, resize_pair
from siamdiff.data.readers import load_mask
from siamdiff.data.split import DEFAULT_FRACTIONS, split_of
from siamdiff.errors import SiamdiffError

SIZE = 64
# Three short CVC sequences that land in three different splits (see test_split.py).
CVC_FRAMES = {"seq03": range(51, 68), "seq04": range(68, 79), "seq10": range(200, 206)}


def link(target: Path, link_path: Path) -> None:
    link_path.parent.mkdir(parents=True, exist_ok=True)
    link_path.symlink_to(target)


def kvasir_subset(shared_data: Path, root: Path, count: int) -> Path:
    source = shared_data / "Kvasir-SEG"
    for image in sorted((source / "images").iterdir())[:count]:
        link(image, root / "images" / image.name)
        link(source / "masks" / image.name, root / "masks" / image.name)
    link(source / "kavsir_bboxes.json", root / "kavsir_bboxes.json")
    return root


@pytest.fixture(scope="module")
def raw(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 Kvasir-SEG pairs and three CVC-ClinicDB sequences (34 frames), symlinked."""
    root = tmp_path_factory.mktemp("raw")
    kvasir_subset(shared_data, root / "kvasir", 12)
    cvc = shared_data / "CVC-ClinicDB"
    for frames in CVC_FRAMES.values():
        for frame in frames:
            link(cvc / "Original" / f"{frame}.png", root / "cvc" / "Original" / f"{frame}.png")
            link(
                cvc / "Ground Truth" / f"{frame}.png",
                root / "cvc" / "Ground Truth" / f"{frame}.png",
            )
    link(cvc / "README.txt", root / "cvc" / "README.txt")
    return root


def sources(raw: Path, kvasir: Path | None = None) -> list[tuple[str, Path]]:
    return [("kvasir-seg", kvasir or raw / "kvasir"), ("cvc-clinicdb", raw / "cvc")]


@pytest.fixture(scope="module")
def prepared(raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "DATA"
    prepare(sources(raw), out, SIZE, workers=1, progress=False)
    return out


@pytest.fixture
def data_copy(prepared: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(prepared, tmp_path / "DATA"))


def write_pair(root: Path, name: str, image: np.ndarray, mask: np.ndarray) -> None:
    root.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / f"{name}.png")
    Image.fromarray(mask).save(root / f"{name}_mask.png")


def disc(size: int = 32, radius: int = 8) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return (((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < radius**2) * 255).astype(np.uint8)


IMAGE = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)


# --- the real subset ----------------------------------------------------------------------


def test_prepare_writes_resized_hashed_split_pairs(prepared: Path, raw: Path) -> None:
    manifest = load_manifest(prepared)
    assert manifest.dataset_version == "1.0" and manifest.kind == "real"
    assert manifest.preprocessing == {
        "size": SIZE,
        "resize": "shorter-side",
        "image_filter": "lanczos",
        "mask_threshold": 128,
        "mask_resize": "bilinear>=0.5",
        "drop_empty": False,
        "split": {"method": "sha256(dataset/group)", "fractions": [0.8, 0.1, 0.1]},
    }
    assert len(manifest.records) == 12 + 34
    for record in manifest.records:
        assert record.id == f"{record.dataset}-{record.group}-{record.frame}"
        assert record.image == f"{record.id}.png" and record.mask == f"{record.id}_mask.png"
        image, mask = Image.open(prepared / record.image), Image.open(prepared / record.mask)
        assert image.mode == "RGB" and mask.mode == "L"
        assert image.size == mask.size == (record.width, record.height)
        assert min(image.size) == SIZE
        values = np.asarray(mask)
        assert set(np.unique(values)) <= {0, 255}
        assert record.coverage == pytest.approx((values > 0).mean(), abs=1e-6)
        assert record.image_sha256 == sha256_file(prepared / record.image)
        assert record.mask_sha256 == sha256_file(prepared / record.mask)
        assert record.source_sha256 == sha256_file(record.source_image)
        assert record.split == split_of(record.dataset, record.group)
    cvc = [r for r in manifest.records if r.dataset == "cvc_clinicdb"]
    assert {(r.width, r.height) for r in cvc} == {(85, 64)}  # 384x288, aspect kept
    assert {r.group: r.split for r in cvc} == {"seq03": "test", "seq04": "val", "seq10": "train"}
    assert Path(cvc[0].source_image).parent == raw / "cvc" / "Original"
    summary = json.loads((prepared / SUMMARY_NAME).read_text())
    assert summary["counts"]["cvc_clinicdb"] == {"train": 6, "val": 11, "test": 17}
    assert sum(summary["counts"]["kvasir_seg"].values()) == 12
    assert summary["skipped"] == [] and summary["empty_masks"] == 0
    assert verify(prepared).ok


def test_outputs_get_the_modes_plain_mkdir_and_open_give(prepared: Path, tmp_path: Path) -> None:
    """Atomic writes go through owner-only temporaries; a lab's shared dataset must not stay so."""
    (tmp_path / "plain-dir").mkdir()
    (tmp_path / "plain-file").write_bytes(b"")
    dir_mode, file_mode = (
        (tmp_path / n).stat().st_mode & 0o777 for n in ("plain-dir", "plain-file")
    )
    assert prepared.stat().st_mode & 0o777 == dir_mode
    for name in (MANIFEST_NAME, SUMMARY_NAME, load_manifest(prepared).records[0].image):
        assert (prepared / name).stat().st_mode & 0o777 == file_mode, name


def test_mask_coverage_survives_resizing(prepared: Path) -> None:
    for record in load_manifest(prepared).records:
        source = load_mask(record.source_mask).mean()
        assert record.coverage == pytest.approx(source, abs=0.02)


def test_resize_pair_keeps_aspect_and_lesion() -> None:
    mask = disc(200, 60)[:, :150] > 0  # 200 tall, 150 wide
    image = np.zeros((200, 150, 3), np.uint8)
    small_image, small_mask = resize_pair(image, mask, 30)
    assert small_image.shape == (40, 30, 3) and small_mask.shape == (40, 30)
    assert small_mask.mean() == pytest.approx(mask.mean(), abs=0.02)


def test_a_resized_mask_keeps_the_pixels_at_least_half_lesion() -> None:
    """Halved, a line of w rows covers ceil(w / 2) rows wherever it lies (a 1-row line, under
    half of every output pixel, none): the area decides, not where the sampling grid falls."""
    image = np.zeros((64, 64, 3), np.uint8)
    for width, rows in ((1, 0), (3, 2), (5, 3)):
        for top in range(20, 24):
            mask = np.zeros((64, 64), bool)
            mask[top : top + width] = True
            assert resize_pair(image, mask, 32)[1].any(axis=1).sum() == rows, (width, top)


def test_verify_names_each_changed_missing_and_extra_file(data_copy: Path) -> None:
    records = load_manifest(data_copy).records
    flipped, deleted = records[3].image, records[5].mask
    raw_bytes = bytearray((data_copy / flipped).read_bytes())
    raw_bytes[len(raw_bytes) // 2] ^= 0x01
    (data_copy / flipped).write_bytes(bytes(raw_bytes))
    (data_copy / deleted).unlink()
    (data_copy / "stray.png").write_bytes(b"x")
    report = verify(data_copy)
    assert (report.changed, report.missing, report.extra) == ([flipped], [deleted], ["stray.png"])
    assert not report.ok and report.checked == 2 * len(records) - 1
    text = format_verify(report)
    assert f"changed: {flipped}" in text and f"missing: {deleted}" in text
    assert "extra: stray.png" in text and text.splitlines()[-1].startswith("FAILED: 3")


def test_versioning_minor_for_preprocessing_major_for_raw_data(
    data_copy: Path, raw: Path, shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prepare(sources(raw), data_copy, 48, overwrite=True, workers=1, progress=False)
    assert load_manifest(data_copy).dataset_version == "1.1"
    more = kvasir_subset(shared_data, tmp_path / "kvasir13", 13)
    summary = prepare(sources(raw, more), data_copy, 48, overwrite=True, progress=False)
    assert summary.dataset_version == "2.0"
    assert load_manifest(data_copy).dataset_version == "2.0"
    assert len(load_manifest(data_copy).records) == 13 + 34
    summary = prepare(sources(raw, more), data_copy, 48, overwrite=True, progress=False)
    assert summary.dataset_version == "2.0"  # the same raw data and preprocessing
    # A corrected mask (same image): the prepared data changes, so must the version.
    mask_link = sorted((more / "masks").iterdir())[0]
    corrected = Image.open(mask_link).convert("L")
    corrected.paste(255, (0, 0, corrected.width // 2, corrected.height // 2))
    mask_link.unlink()
    corrected.save(mask_link, format="JPEG")
    summary = prepare(sources(raw, more), data_copy, 48, overwrite=True, progress=False)
    assert summary.dataset_version == "3.0"
    # Corrected again, and another size at once: still raw data changed, a major bump.
    corrected.paste(0, (0, 0, corrected.width // 2, corrected.height // 2))
    mask_link.unlink()
    corrected.save(mask_link, format="JPEG")
    summary = prepare(sources(raw, more), data_copy, 40, overwrite=True, progress=False)
    assert summary.dataset_version == "4.0"
    # The same raw data and settings written otherwise (a Pillow or siamdiff upgrade): the
    # raw masks' hashes say nothing was corrected, so a minor bump.
    real_resize = prepare_module.resize_pair

    def resized_otherwise(*args, **kwargs):
        rgb, mask = real_resize(*args, **kwargs)
        return rgb ^ 1, mask  # every image byte moved by one grey level

    monkeypatch.setattr(prepare_module, "resize_pair", resized_otherwise)
    summary = prepare(sources(raw, more), data_copy, 40, overwrite=True, workers=1, progress=False)
    assert summary.dataset_version == "4.1"


def test_failed_prepare_leaves_no_output_and_keeps_old_data(
    data_copy: Path, raw: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real_save = manifest_module.atomic_save_png

    def failing_save(path: Path, array: np.ndarray) -> bytes:
        calls.append(path)
        if len(calls) > 7:
            raise OSError(28, "No space left on device")
        return real_save(path, array)

    monkeypatch.setattr(manifest_module, "atomic_save_png", failing_save)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(SiamdiffError, match="No space left"):
        prepare(sources(raw), tmp_path / "NEW", SIZE, workers=1, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no NEW, no temp dir

    manifest_bytes = (data_copy / MANIFEST_NAME).read_bytes()
    calls.clear()
    with pytest.raises(SiamdiffError, match="No space left"):
        prepare(sources(raw), data_copy, 32, overwrite=True, workers=1, progress=False)
    assert (data_copy / MANIFEST_NAME).read_bytes() == manifest_bytes
    assert verify(data_copy).ok
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# --- synthetic bad inputs -----------------------------------------------------------------


@pytest.fixture
def messy(tmp_path: Path) -> Path:
    root = tmp_path / "messy"
    write_pair(root, "d-good-0", IMAGE, disc())
    write_pair(root, "d-empty-0", np.roll(IMAGE, 1, axis=0), np.zeros((32, 32), np.uint8))
    write_pair(root, "d-mismatch-0", IMAGE, disc()[:30])
    write_pair(root, "d-corrupt-0", IMAGE, disc())
    (root / "d-corrupt-0.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    Image.fromarray(IMAGE).save(root / "d-lonely-0.png")
    return root


def test_bad_inputs_are_skipped_counted_and_listed(messy: Path, tmp_path: Path) -> None:
    summary = prepare([("folder", messy)], tmp_path / "out", 16, workers=1, progress=False)
    manifest = load_manifest(tmp_path / "out")
    coverage = {r.group: r.coverage for r in manifest.records}
    assert coverage.keys() == {"good", "empty"} and coverage["empty"] == 0
    assert coverage["good"] > 0 and summary.empty_masks == 1
    reasons = {Path(f).name: r for f, r in summary.skipped}
    assert reasons.keys() == {"d-mismatch-0.png", "d-corrupt-0.png", "d-lonely-0.png"}
    assert reasons["d-mismatch-0.png"] == "image 32x32 but mask 32x30"
    assert reasons["d-lonely-0.png"] == "image without mask"
    assert reasons["d-corrupt-0.png"].startswith("cannot read image")
    listed = json.loads((tmp_path / "out" / SUMMARY_NAME).read_text())["skipped"]
    assert sorted(Path(s["file"]).name for s in listed) == sorted(reasons)
    text = summary.format()
    assert "wrote 2 pairs" in text and "skipped 3 files" in text and "empty masks: 1" in text
    # Reasons naming a file each are one reason on the line, the paths left to the file.
    many = replace(
        summary,
        skipped=[(f"/d/{i}.png", f"same image as /s/{i}.png (kept once)") for i in range(900)],
    )
    last = many.format().splitlines()[-1]
    assert last == f"skipped 900 files (900 same image as … (kept once)); see {SUMMARY_NAME}"


def test_drop_empty_and_strict(messy: Path, tmp_path: Path) -> None:
    summary = prepare(
        [("folder", messy)], tmp_path / "out", 16, drop_empty=True, workers=1, progress=False
    )
    assert [r.group for r in load_manifest(tmp_path / "out").records] == ["good"]
    assert (str(messy / "d-empty-0_mask.png"), EMPTY_MASK) in summary.skipped
    assert summary.empty_masks == 1

    with pytest.raises(SiamdiffError) as exc:
        prepare([("folder", messy)], tmp_path / "strict", 16, strict=True, workers=1)
    assert str(exc.value) == (
        f"{messy / 'd-lonely-0.png'}: image without mask (--strict stops here; without "
        "--strict each problem is skipped and listed in prepare-summary.json)"
    )
    assert not (tmp_path / "strict").exists()


def test_image_names_that_are_no_files_are_skipped_and_listed(tmp_path: Path) -> None:
    """A broken link, a link loop or a folder named like an image is no pair: listed as
    skipped (so --strict stops), never dropped silently; other subfolders are left alone."""
    root = tmp_path / "links"
    write_pair(root, "d-good-0", IMAGE, disc())
    (root / "d-gone-0.png").symlink_to(tmp_path / "nowhere.png")
    (root / "d-gone-0_mask.png").symlink_to(tmp_path / "nowhere_mask.png")
    (root / "d-loop-0.png").symlink_to(root / "d-loop-0.png")
    (root / "d-folder-0_mask.png").mkdir()
    (root / "notes").mkdir()
    summary = prepare([("folder", root)], tmp_path / "out", 16, workers=1, progress=False)
    assert summary.records == 1
    reasons = {Path(f).name: r for f, r in summary.skipped}
    unreadable = "not a readable file (a broken link or a folder)"
    names = ("d-gone-0.png", "d-gone-0_mask.png", "d-loop-0.png", "d-folder-0_mask.png")
    assert reasons == dict.fromkeys(names, unreadable)
    with pytest.raises(SiamdiffError, match="not a readable file"):
        prepare([("folder", root)], tmp_path / "strict", 16, strict=True, workers=1)


def test_strict_accepts_dropped_empty_masks(tmp_path: Path) -> None:
    root = tmp_path / "clean"
    write_pair(root, "d-good-0", IMAGE, disc())
    write_pair(root, "d-empty-0", np.roll(IMAGE, 1, axis=0), np.zeros((32, 32), np.uint8))
    summary = prepare(
        [("folder", root)], tmp_path / "out", 16, strict=True, drop_empty=True, workers=1
    )
    assert summary.records == 1


def test_duplicate_output_names_name_both_sources(tmp_path: Path) -> None:
    write_pair(tmp_path / "a", "d-g-0", IMAGE, disc())
    write_pair(tmp_path / "b", "d-g-0", IMAGE, disc())
    with pytest.raises(SiamdiffError, match="d-g-0") as exc:
        prepare([("folder", tmp_path / "a"), ("folder", tmp_path / "b")], tmp_path / "out")
    assert str(tmp_path / "a" / "d-g-0.png") in str(exc.value)
    assert str(tmp_path / "b" / "d-g-0.png") in str(exc.value)
    assert not (tmp_path / "out").exists()


def test_a_dataset_named_like_the_pooled_stats_row_is_refused(tmp_path: Path) -> None:
    write_pair(tmp_path / "src", "all-g-0", IMAGE, disc())
    with pytest.raises(SiamdiffError, match="'all' is reserved") as exc:
        prepare([("folder", tmp_path / "src")], tmp_path / "out", 16, workers=1)
    assert str(tmp_path / "src" / "all-g-0.png") in str(exc.value)
    assert not (tmp_path / "out").exists()


def test_output_is_independent_of_source_order_and_workers(tmp_path: Path) -> None:
    for i in range(4):
        write_pair(tmp_path / "a", f"a-g{i}-0", np.roll(IMAGE, i, axis=0), disc(radius=4 + i))
        other_image = np.roll(IMAGE, i + 1, axis=1)  # no pixel-identical frame in a and b
        write_pair(tmp_path / "b", f"b-g{i}-0", other_image, disc(radius=4 + i))
    one = [("folder", tmp_path / "a"), ("folder", tmp_path / "b")]
    prepare(one, tmp_path / "serial", 16, workers=1, progress=False)
    prepare(one[::-1], tmp_path / "pool", 16, workers=2, progress=False)
    serial = (tmp_path / "serial" / MANIFEST_NAME).read_bytes()
    assert (tmp_path / "pool" / MANIFEST_NAME).read_bytes() == serial
    assert len(load_manifest(tmp_path / "pool").records) == 8


def test_existing_output_is_protected(tmp_path: Path) -> None:
    write_pair(tmp_path / "src", "d-g-0", IMAGE, disc())
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.tex").write_text("precious")
    with pytest.raises(SiamdiffError, match="already exists"):
        prepare([("folder", tmp_path / "src")], tmp_path / "home", progress=False)
    with pytest.raises(SiamdiffError, match="refusing to replace"):
        prepare([("folder", tmp_path / "src")], tmp_path / "home", overwrite=True, progress=False)
    assert (tmp_path / "home" / "thesis.tex").read_text() == "precious"
    (tmp_path / "home" / MANIFEST_NAME).write_text("{damaged")  # a dataset it cannot read
    with pytest.raises(SiamdiffError, match="delete it to prepare anew"):
        prepare([("folder", tmp_path / "src")], tmp_path / "home", overwrite=True, progress=False)


def test_nothing_usable_is_an_error(tmp_path: Path) -> None:
    write_pair(tmp_path / "src", "d-g-0", IMAGE, disc()[:10])
    reason = r"no usable image-mask pairs in the sources: 1 skipped, first .*d-g-0.png: image 32x32"
    with pytest.raises(SiamdiffError, match=reason):
        prepare([("folder", tmp_path / "src")], tmp_path / "out", 16, workers=1)
    assert not (tmp_path / "out").exists()
    (tmp_path / "empty").mkdir()  # nothing skipped either: it was an IndexError
    with pytest.raises(SiamdiffError, match=r"no usable image-mask pairs in the sources$"):
        prepare([("folder", tmp_path / "empty")], tmp_path / "out", 16, workers=1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size": 4}, r"size must be 8\.\.4096 pixels, got 4$"),
        ({"size": 100_000}, r"size must be 8\.\.4096 pixels, got 100000$"),  # gigabytes a frame
        ({"mask_threshold": 0}, "threshold"),
        ({"mask_threshold": 256}, "threshold"),
        ({"image_bits": 7}, r"image bits must be in 8\.\.16, got 7$"),
        ({"image_bits": 17}, r"image bits must be in 8\.\.16, got 17$"),
    ],
)
def test_invalid_settings(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(SiamdiffError, match=message):
        prepare([("folder", tmp_path)], tmp_path / "out", **kwargs)


def test_12_bit_images_are_prepared_at_full_range_and_the_setting_recorded(
    tmp_path: Path,
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    ramp = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 5).clip(0, 4095)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    for name, image in (("ok", ramp), ("bright", ramp + 1)):  # bright: 4096 somewhere
        tifffile.imwrite(src / f"{name}.tif", image)
        Image.fromarray(mask).save(src / f"{name}_mask.png")
    summary = prepare([("folder", src)], tmp_path / "out", 32, image_bits=12, workers=1)
    assert summary.skipped == [(str(src / "bright.tif"), summary.skipped[0][1])]
    assert "holds the value 4096, above the 12-bit maximum 4095" in summary.skipped[0][1]
    manifest = load_manifest(tmp_path / "out")
    assert manifest.preprocessing["image_bits"] == 12
    image = np.asarray(Image.open(tmp_path / "out" / manifest.records[0].image))
    assert image.max() == 255 and image.min() == 0  # 16-bit scaling would stop at 16


def test_an_image_in_two_sources_is_kept_once(tmp_path: Path) -> None:
    """PraNet's training set holds Kvasir-SEG frames: prepared together, a frame must not
    count twice nor sit in two splits."""
    kvasir = make_phantom_dataset(tmp_path / "kvasir", n=4, size=32, groups=4, seed=0)
    pranet = tmp_path / "pranet"
    for sub in ("images", "masks"):
        (pranet / sub).mkdir(parents=True)
    for source in sorted(kvasir.glob("*_mask.png"))[:2]:
        stem = source.name.removesuffix("_mask.png")
        shutil.copy(kvasir / f"{stem}.png", pranet / "images" / f"copy-{stem}.png")
        shutil.copy(source, pranet / "masks" / f"copy-{stem}.png")
    shutil.copy(kvasir / "phantom-p03-0003.png", pranet / "images" / "own.png")
    shutil.copy(kvasir / "phantom-p00-0000_mask.png", pranet / "masks" / "own.png")
    Image.fromarray(255 - np.asarray(Image.open(pranet / "images" / "own.png"))).save(
        pranet / "images" / "own.png"
    )
    sources = [("folder", kvasir), ("pranet", pranet)]
    summary = prepare(sources, tmp_path / "out", 32, workers=1, progress=False)
    records = load_manifest(tmp_path / "out").records
    assert sorted(r.dataset for r in records) == ["phantom"] * 4 + ["pranet"]
    reasons = {Path(f).name: r for f, r in summary.skipped}
    assert set(reasons) == {"copy-phantom-p00-0000.png", "copy-phantom-p01-0001.png"}
    assert all(r.startswith("same image as ") and "kept once" in r for r in reasons.values())
    assert verify(tmp_path / "out").ok  # the duplicates' files are gone too
    with pytest.raises(SiamdiffError, match="same image as"):
        prepare(sources, tmp_path / "strict", 32, strict=True, workers=1, progress=False)


def test_a_shared_image_keeps_its_sequence_in_one_split(tmp_path: Path) -> None:
    """PraNet's TrainDataset holds CVC-ClinicDB frames, each its own group there: the copies
    must not spread a video sequence over several splits."""
    cvc, pranet = tmp_path / "CVC-ClinicDB", tmp_path / "TrainDataset"
    frames = [*range(1, 9), *range(26, 34)]  # sequences 1 and 2
    for frame in frames:
        image = np.roll(IMAGE, (frame % 32, frame // 32), axis=(0, 1))  # all distinct
        for folder, (images, masks) in (
            (cvc, ("Original", "Ground Truth")),
            (pranet, ("images", "masks")),
        ):
            (folder / images).mkdir(parents=True, exist_ok=True)
            (folder / masks).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / images / f"{frame}.png")
            Image.fromarray(disc()).save(folder / masks / f"{frame}.png")
    sources = [("cvc-clinicdb", cvc), ("pranet", pranet)]
    prepare(sources, tmp_path / "out", 32, workers=1, progress=False)
    records = load_manifest(tmp_path / "out").records
    assert len(records) == len(frames)
    splits: dict[int, set[str]] = {}
    for record in records:
        sequence = 1 if int(Path(record.source_image).stem) <= 25 else 2
        splits.setdefault(sequence, set()).add(record.split)
    assert all(len(found) == 1 for found in splits.values()), splits


def test_adding_a_source_moves_no_frame_to_another_split(tmp_path: Path) -> None:
    """A new source holding a copy of one training frame joins that frame's sequence with
    the copy's group, whose split (and id) used to win when it sorted first: a model trained
    on the first version was then tested on its own training frames."""
    cvc = tmp_path / "CVC-ClinicDB"
    frames = range(1, 9)  # sequence 1
    for folder in ("Original", "Ground Truth"):
        (cvc / folder).mkdir(parents=True)
    for frame in frames:
        image = np.roll(IMAGE, (frame, 0), axis=(0, 1))
        Image.fromarray(image).save(cvc / "Original" / f"{frame}.png")
        Image.fromarray(disc()).save(cvc / "Ground Truth" / f"{frame}.png")
    out = tmp_path / "out"
    prepare([("cvc-clinicdb", cvc)], out, 32, workers=1, progress=False)
    before = {r.id: r.split for r in load_manifest(out).records}
    # A group whose split differs from the sequence's, and an id sorting before "cvc...".
    aa = tmp_path / "AA"
    for sub in ("images", "masks"):
        (aa / sub).mkdir(parents=True)
    for name in (f"x{i}" for i in range(40)):
        if split_of("AA", name, DEFAULT_FRACTIONS) != set(before.values()).pop():
            break
    shutil.copy(cvc / "Original" / "1.png", aa / "images" / f"{name}.png")
    shutil.copy(cvc / "Ground Truth" / "1.png", aa / "masks" / f"{name}.png")
    sources = [("cvc-clinicdb", cvc), ("pranet", aa)]
    prepare(sources, out, 32, overwrite=True, workers=1, progress=False)
    assert {r.id: r.split for r in load_manifest(out).records} == before


def test_a_frame_renamed_by_a_colliding_new_file_keeps_its_split(tmp_path: Path) -> None:
    """`polyp 5` became `polyp_5_<hash>` once `polyp-5` arrived (both sanitise to `polyp_5`):
    its id and group were new, and the split drawn for them could be test."""
    raw = tmp_path / "raw"
    raw.mkdir()
    images = {f"x{i}": np.roll(IMAGE, (i, 0), axis=(0, 1)) for i in range(12)}
    for name, image in images.items():
        Image.fromarray(image).save(raw / f"{name}.png")
        Image.fromarray(disc()).save(raw / f"{name}_mask.png")
    out = tmp_path / "out"
    prepare([("folder", raw)], out, 32, workers=1, progress=False)
    before = {r.image_sha256: r.split for r in load_manifest(out).records}
    for i, name in enumerate(images):  # each frame's new name: `x 3` next to a new `x-3`
        for suffix in ("", "_mask"):
            (raw / f"{name}{suffix}.png").rename(raw / f"x {i}{suffix}.png")
            Image.fromarray(255 - images[name] if not suffix else disc()).save(
                raw / f"x-{i}{suffix}.png"
            )
    prepare([("folder", raw)], out, 32, overwrite=True, workers=1, progress=False)
    after = load_manifest(out).records
    assert len(after) == 24
    assert {r.image_sha256: r.split for r in after if r.image_sha256 in before} == before


def test_joining_a_training_and_a_test_sequence_keeps_the_training_frames_in_train(
    tmp_path: Path,
) -> None:
    """A new source's group holding copies of a training frame (sequence 1) and of a test
    frame (sequence 2, three frames) joined them all: the majority, test, won and took the
    training frame with it, and the version stayed 1.0."""
    cvc = tmp_path / "CVC-ClinicDB"
    for folder in ("Original", "Ground Truth"):
        (cvc / folder).mkdir(parents=True)
    for frame in (1, 26, 27, 28):
        image = np.roll(IMAGE, (frame, 0), axis=(0, 1))
        Image.fromarray(image).save(cvc / "Original" / f"{frame}.png")
        Image.fromarray(disc()).save(cvc / "Ground Truth" / f"{frame}.png")
    out = tmp_path / "out"
    prepare([("cvc-clinicdb", cvc)], out, 32, workers=1, progress=False)
    before = {Path(r.source_image).stem: r.split for r in load_manifest(out).records}
    assert before == {"1": "train", "26": "test", "27": "test", "28": "test"}
    extra = tmp_path / "extra"
    extra.mkdir()
    for frame, name in ((1, "ext-g1-a"), (26, "ext-g1-b")):
        shutil.copy(cvc / "Original" / f"{frame}.png", extra / f"{name}.png")
        shutil.copy(cvc / "Ground Truth" / f"{frame}.png", extra / f"{name}_mask.png")
    sources = [("cvc-clinicdb", cvc), ("folder", extra)]
    summary = prepare(sources, out, 32, overwrite=True, workers=1, progress=False)
    after = {Path(r.source_image).stem: r.split for r in load_manifest(out).records}
    assert after == dict.fromkeys(before, "train")
    assert summary.dataset_version == "2.0"  # what the test split holds changed


def test_a_source_inside_the_output_is_refused(tmp_path: Path) -> None:
    """--overwrite deleted it with the old output."""
    write_pair(tmp_path / "out" / "raw", "d-g-0", IMAGE, disc())
    for overwrite in (False, True):
        with pytest.raises(SiamdiffError, match="is, holds or lies inside the folder source"):
            prepare(
                [("folder", tmp_path / "out" / "raw")],
                tmp_path / "out",
                16,
                overwrite=overwrite,
                progress=False,
            )
    assert (tmp_path / "out" / "raw" / "d-g-0.png").is_file()


def test_a_pair_turned_apart_by_exif_says_so(tmp_path: Path) -> None:
    """A camera image stored sideways (EXIF orientation 6) with a mask drawn on its raw
    pixels: the sizes no longer agree, and the reason must point at the orientation."""
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "src").mkdir()
    Image.fromarray(IMAGE[:, :24]).save(tmp_path / "src" / "d-g-0.png", exif=exif)
    Image.fromarray(disc()[:, :24]).save(tmp_path / "src" / "d-g-0_mask.png")
    write_pair(tmp_path / "src", "d-g-1", IMAGE, disc())
    summary = prepare([("folder", tmp_path / "src")], tmp_path / "out", 16, progress=False)
    (reason,) = [r for _, r in summary.skipped]
    assert reason.endswith("(one is turned by its EXIF orientation, the other is not)")

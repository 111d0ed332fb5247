"""Readers: the real layouts, every pixel format we accept, and every bad input we refuse."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from siamdiff.data.readers import (
    CVC_SEQUENCES,
    UnreadableImageError,
    load_label_map,
    load_mask,
    load_rgb,
    parse_cvc_sequences,
    read_source,
    sanitize_name,
)
from siamdiff.errors import SiamdiffError

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (6, 8, 3), dtype=np.uint8)


def save(path: Path, array: np.ndarray, mode: str | None = None, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    (image.convert(mode) if mode else image).save(path, **kwargs)
    return path


def pair_dirs(root: Path, images: dict[str, np.ndarray], masks: dict[str, np.ndarray]) -> Path:
    for name, array in images.items():
        save(root / "images" / name, array)
    for name, array in masks.items():
        save(root / "masks" / name, array)
    return root


def one_line_error_naming(exc: pytest.ExceptionInfo, path: Path) -> bool:
    return "\n" not in str(exc.value) and str(path) in str(exc.value)


# --- real data ----------------------------------------------------------------------------


def test_kvasir_seg_real_layout(shared_data: Path) -> None:
    result = read_source("kvasir-seg", shared_data / "Kvasir-SEG")
    assert len(result.pairs) == 900
    assert result.skipped == []
    pair = result.pairs[0]
    assert pair.image.parent.name == "images" and pair.mask.parent.name == "masks"
    assert pair.image.name == pair.mask.name
    assert (pair.dataset, pair.group, pair.frame) == ("kvasir_seg", pair.image.stem, "0")
    assert len({p.group for p in result.pairs}) == 900


def test_kvasir_jpeg_mask_is_binarised(shared_data: Path) -> None:
    pair = read_source("kvasir-seg", shared_data / "Kvasir-SEG").pairs[0]
    raw = np.asarray(Image.open(pair.mask))
    assert len(np.unique(raw)) > 2  # JPEG noise around 0 and 255
    mask = load_mask(pair.mask)
    assert mask.dtype == bool and mask.shape == raw.shape[:2]
    np.testing.assert_array_equal(mask, raw.max(axis=-1) >= 128)
    assert 0.01 < mask.mean() < 0.99


def test_cvc_clinicdb_groups_are_sequences(shared_data: Path) -> None:
    result = read_source("cvc-clinicdb", shared_data / "CVC-ClinicDB")
    assert len(result.pairs) == 528
    assert result.skipped == []
    by_frame = {int(p.frame): p for p in result.pairs}
    assert sorted(by_frame) == list(range(1, 529))
    assert by_frame[1].group == "seq01" and by_frame[25].group == "seq01"
    assert by_frame[26].group == "seq02" and by_frame[200].group == "seq10"
    assert by_frame[528].group == "seq25"
    assert by_frame[7].frame == "0007" and by_frame[7].image.name == "7.png"
    assert by_frame[7].mask.parent.name == "Ground Truth"
    assert len({p.group for p in result.pairs}) == 25


def test_cvc_readme_table_matches_builtin_copy(shared_data: Path) -> None:
    readme = (shared_data / "CVC-ClinicDB" / "README.txt").read_text(errors="replace")
    assert "\t" in readme  # the messy tabs the parser must survive
    assert parse_cvc_sequences(readme) == dict(enumerate(CVC_SEQUENCES, 1))
    assert len(CVC_SEQUENCES) == 29 and CVC_SEQUENCES[-1] == (592, 612)


def test_a_cvc_row_that_does_not_parse_leaves_the_others_their_numbers() -> None:
    readme = "|  1 to  25  |\t 1\t|\n| 26 to 50 | two |\n| 51 to 67 | 3 |\n"
    assert parse_cvc_sequences(readme) == {1: (1, 25), 3: (51, 67)}  # not renumbered 1, 2


def test_cvc_release_tiffs_equal_the_png_frames(shared_data: Path) -> None:
    tiffs = read_source("cvc-clinicdb", shared_data / "CVC-ClinicDB-tiff-sample")
    assert [p.image.name for p in tiffs.pairs] == ["1.tif", "2.tif", "3.tif"]
    with pytest.raises(OSError):  # why tifffile: Pillow refuses the release's photometric tag
        Image.open(tiffs.pairs[0].image).load()
    for pair in tiffs.pairs:
        png = shared_data / "CVC-ClinicDB" / "Original" / f"{int(pair.frame)}.png"
        png_mask = shared_data / "CVC-ClinicDB" / "Ground Truth" / f"{int(pair.frame)}.png"
        np.testing.assert_array_equal(load_rgb(pair.image), load_rgb(png))
        np.testing.assert_array_equal(load_mask(pair.mask), load_mask(png_mask))
        assert load_mask(pair.mask).any()


# --- pixel formats ------------------------------------------------------------------------


def test_rgba_drops_alpha(tmp_path: Path) -> None:
    rgba = np.concatenate([RGB, np.zeros((6, 8, 1), np.uint8)], axis=-1)
    np.testing.assert_array_equal(load_rgb(save(tmp_path / "a.png", rgba)), RGB)


def test_grey_and_grey_alpha_become_rgb(tmp_path: Path) -> None:
    grey = RGB[..., 0]
    for name, mode in (("l.png", "L"), ("la.png", "LA")):
        rgb = load_rgb(save(tmp_path / name, grey, mode))
        assert rgb.shape == (6, 8, 3)
        np.testing.assert_array_equal(rgb[..., 2], grey)


def test_palette_image_expands_to_its_colours(tmp_path: Path) -> None:
    path = save(tmp_path / "p.png", RGB, "P")
    expected = np.asarray(Image.open(path).convert("RGB"))
    np.testing.assert_array_equal(load_rgb(path), expected)


def test_palette_mask_uses_colours_not_luminance(tmp_path: Path) -> None:
    # Dark red (128, 0, 0) has luminance 38: converting to "L" would erase the lesion.
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 128, 0, 0])
    image.putpixel((1, 2), 1)
    image.save(tmp_path / "m.png")
    mask = load_mask(tmp_path / "m.png")
    assert mask.sum() == 1 and mask[2, 1]


def test_16_bit_png_and_tiff_are_scaled_to_8_bit(tmp_path: Path) -> None:
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "16.png")
    assert Image.open(tmp_path / "16.png").mode.startswith("I")
    tifffile.imwrite(tmp_path / "16.tif", values)
    for name in ("16.png", "16.tif"):
        np.testing.assert_array_equal(load_rgb(tmp_path / name)[0, :, 0], [0, 1, 128, 255])
        np.testing.assert_array_equal(load_mask(tmp_path / name)[0], [False, False, True, True])


def test_12_bit_data_in_16_bit_files_reads_full_range_at_12_bits(tmp_path: Path) -> None:
    """X-ray and CT exports keep 12-bit values in 16-bit files: read as 16-bit they would use
    the bottom sixteenth of the 8-bit range; a value above the given depth is refused."""
    values = np.array([[0, 16, 2048, 4095]], dtype=np.uint16)
    tifffile.imwrite(tmp_path / "12.tif", values)
    np.testing.assert_array_equal(load_rgb(tmp_path / "12.tif")[0, :, 0], [0, 0, 8, 16])
    np.testing.assert_array_equal(load_rgb(tmp_path / "12.tif", 12)[0, :, 0], [0, 1, 128, 255])
    Image.fromarray(RGB).save(tmp_path / "8.png")  # 8-bit files are read as stored
    np.testing.assert_array_equal(load_rgb(tmp_path / "8.png", 12), RGB)
    values[0, 0] = 4096
    tifffile.imwrite(tmp_path / "13.tif", values)
    with pytest.raises(UnreadableImageError, match="holds the value 4096, above the 12-bit maxi"):
        load_rgb(tmp_path / "13.tif", 12)


def test_planar_rgb_tiff(tmp_path: Path) -> None:
    tifffile.imwrite(
        tmp_path / "p.tif", np.moveaxis(RGB, -1, 0), photometric="rgb", planarconfig="separate"
    )
    np.testing.assert_array_equal(load_rgb(tmp_path / "p.tif"), RGB)


def test_mask_threshold_is_128_on_the_max_channel(tmp_path: Path) -> None:
    rgb = np.zeros((1, 4, 3), np.uint8)
    rgb[0, 1, 0] = 127  # below the threshold
    rgb[0, 2, 1] = 128  # exactly the threshold: foreground
    rgb[0, 3] = (10, 250, 12)  # JPEG-like noise around a green foreground pixel
    np.testing.assert_array_equal(load_mask(save(tmp_path / "m.png", rgb))[0], [0, 0, 1, 1])
    np.testing.assert_array_equal(load_mask(tmp_path / "m.png", threshold=200)[0], [0, 0, 0, 1])


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("garbage.png", b"\x89PNG\r\n\x1a\nnot really a png"),
        ("empty.jpg", b""),
        ("text.tif", b"this is not a tiff"),
    ],
)
def test_corrupt_files_are_one_line_errors(tmp_path: Path, name: str, data: bytes) -> None:
    (tmp_path / name).write_bytes(data)
    with pytest.raises(UnreadableImageError) as exc:
        load_rgb(tmp_path / name)
    assert one_line_error_naming(exc, tmp_path / name)
    assert exc.value.path == tmp_path / name and exc.value.reason


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "TIFF"])
def test_truncated_files_are_errors(tmp_path: Path, fmt: str) -> None:
    buffer = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, format=fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(UnreadableImageError) as exc:
        load_rgb(path)
    assert one_line_error_naming(exc, path)
    assert exc.value.reason.startswith("cannot read image")


def test_truncated_release_tiff_is_an_error(shared_data: Path, tmp_path: Path) -> None:
    # The release TIFFs keep their directory at the end: cut, tifffile finds no pixels at all.
    release = shared_data / "CVC-ClinicDB-tiff-sample" / "Original" / "1.tif"
    (tmp_path / "1.tif").write_bytes(release.read_bytes()[:100_000])
    with pytest.raises(UnreadableImageError, match="truncated") as exc:
        load_rgb(tmp_path / "1.tif")
    assert one_line_error_naming(exc, tmp_path / "1.tif")


# --- layouts and bad directories ----------------------------------------------------------


def test_unpaired_and_foreign_files_are_skipped_with_reasons(tmp_path: Path) -> None:
    root = pair_dirs(
        tmp_path / "set",
        {"a.png": RGB, "lonely.png": RGB},
        {"a.png": RGB[..., 0], "orphan.png": RGB[..., 0]},
    )
    (root / "images" / "notes.txt").write_text("hello")
    (root / "images" / ".DS_Store").write_bytes(b"hidden files are ignored")
    result = read_source("pranet", root)
    assert [(p.image.name, p.mask.name) for p in result.pairs] == [("a.png", "a.png")]
    assert sorted((p.name, reason) for p, reason in result.skipped) == [
        ("lonely.png", "image without mask"),
        ("notes.txt", "not an image file"),
        ("orphan.png", "mask without image"),
    ]


def test_stems_differing_only_in_case_pair_when_unique(tmp_path: Path) -> None:
    root = pair_dirs(
        tmp_path / "set",
        {"C12.png": RGB, "Twin.png": RGB, "twin.png": RGB},
        {"c12.PNG": RGB[..., 0], "TWIN.png": RGB[..., 0]},
    )
    result = read_source("pranet", root)
    assert [(p.image.name, p.mask.name) for p in result.pairs] == [("C12.png", "c12.PNG")]
    assert sorted((p.name, reason) for p, reason in result.skipped) == [
        ("TWIN.png", "mask without image"),  # two images could take it: none does
        ("Twin.png", "image without mask"),
        ("twin.png", "image without mask"),
    ]


def test_pranet_dataset_defaults_to_sanitised_dir_name(tmp_path: Path) -> None:
    root = pair_dirs(tmp_path / "CVC-300 test", {"x 1.jpg": RGB}, {"x 1.png": RGB[..., 0]})
    (pair,) = read_source("pranet", root).pairs
    assert (pair.dataset, pair.group, pair.frame) == ("CVC_300_test", "x_1", "0")
    (named,) = read_source("pranet", root, dataset="my set").pairs
    assert named.dataset == "my_set"


def test_duplicate_stems_are_an_error_naming_both(tmp_path: Path) -> None:
    root = pair_dirs(tmp_path / "set", {"a.png": RGB, "a.jpg": RGB}, {"a.png": RGB[..., 0]})
    with pytest.raises(SiamdiffError) as exc:
        read_source("pranet", root)
    assert "a.png" in str(exc.value) and "a.jpg" in str(exc.value)
    assert "\n" not in str(exc.value)


def test_folder_names_follow_dataset_group_frame(tmp_path: Path) -> None:
    root = tmp_path / "demo-raw"
    save(root / "phantom-p03-0007.png", RGB)
    save(root / "phantom-p03-0007_mask.png", RGB[..., 0])
    save(root / "free name.jpg", RGB)
    save(root / "free name_mask.png", RGB[..., 0])
    save(root / "nomask.png", RGB)
    pairs = {p.image.name: p for p in read_source("folder", root).pairs}
    phantom = pairs["phantom-p03-0007.png"]
    assert (phantom.dataset, phantom.group, phantom.frame) == ("phantom", "p03", "0007")
    assert phantom.mask.name == "phantom-p03-0007_mask.png"
    free = pairs["free name.jpg"]
    assert (free.dataset, free.group, free.frame, free.id) == (
        "demo_raw",
        "free_name",
        "0",
        "demo_raw-free_name-0",
    )
    assert [(p.name, r) for p, r in read_source("folder", root).skipped] == [
        ("nomask.png", "image without mask")
    ]


def test_kvasir_size_disagreeing_with_bbox_table_is_skipped(tmp_path: Path) -> None:
    root = pair_dirs(tmp_path / "kv", {"a.jpg": RGB, "b.jpg": RGB}, {"a.jpg": RGB, "b.jpg": RGB})
    table = {"a": {"width": 8, "height": 6}, "b": {"width": 80, "height": 60}}
    (root / "kavsir_bboxes.json").write_text(json.dumps(table))
    result = read_source("kvasir-seg", root)
    assert [p.image.name for p in result.pairs] == ["a.jpg"]
    ((path, reason),) = result.skipped
    assert path.name == "b.jpg" and "8x6" in reason and "80x60" in reason
    (root / "kavsir_bboxes.json").write_text("{broken")
    with pytest.raises(SiamdiffError, match=r"kavsir_bboxes\.json"):
        read_source("kvasir-seg", root)


def test_cvc_without_readme_uses_builtin_table(tmp_path: Path) -> None:
    root = tmp_path / "cvc"
    for frame in ("1", "26", "612", "613", "cover"):
        save(root / "Original" / f"{frame}.png", RGB)
        save(root / "Ground Truth" / f"{frame}.png", RGB[..., 0])
    result = read_source("cvc-clinicdb", root)
    assert [(p.frame, p.group) for p in result.pairs] == [
        ("0001", "seq01"),
        ("0026", "seq02"),
        ("0612", "seq29"),
    ]
    assert sorted((p.name, r) for p, r in result.skipped) == [
        ("613.png", "frame 613 is not in the sequence table"),
        ("cover.png", "frame name is not a number"),
    ]


def test_parse_messy_readme_rows() -> None:
    text = "|      1 to  25    |\t 1\t|\n\t  |    26 to 30    |2\t|\n|  31 to  40  |\t10   |\n"
    assert parse_cvc_sequences(text) == {1: (1, 25), 2: (26, 30), 10: (31, 40)}


@pytest.mark.parametrize(
    ("kind", "layout", "message"),
    [
        ("nonsense", {"images/a.png"}, "unknown source kind"),
        ("pranet", {"images/a.png"}, "missing subfolder 'masks'"),
        ("cvc-clinicdb", {"Original/1.png"}, "missing subfolder 'Ground Truth'"),
        ("kvasir-seg", set(), "missing subfolder 'images'"),
    ],
)
def test_bad_source_dirs_are_one_line_errors(
    tmp_path: Path, kind: str, layout: set[str], message: str
) -> None:
    root = tmp_path / "src"
    root.mkdir()
    for name in layout:
        save(root / name, RGB)
    with pytest.raises(SiamdiffError, match=message) as exc:
        read_source(kind, root)
    assert one_line_error_naming(exc, root)


def test_missing_root_or_file_root_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SiamdiffError, match="not found") as exc:
        read_source("folder", tmp_path / "nowhere")
    assert one_line_error_naming(exc, tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(SiamdiffError, match="is not a directory"):
        read_source("folder", tmp_path / "file")


def test_unreadable_dir_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests may run as root, where chmod 000 does not stop reading: fail the listing instead.
    def denied(path: os.PathLike) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(os, "scandir", denied)
    with pytest.raises(SiamdiffError, match="cannot list directory") as exc:
        read_source("folder", tmp_path)
    assert one_line_error_naming(exc, tmp_path)


def test_sanitize_name() -> None:
    assert sanitize_name("Kvasir-SEG") == "Kvasir_SEG"
    assert sanitize_name("a b//c.d") == "a_b_c.d"
    assert sanitize_name(".hidden") == "hidden"
    assert sanitize_name("---") == "_"


LESION = np.zeros((16, 16), np.uint8)
LESION[4:9, 3:12] = 1


def _save_mask(path: Path, kind: str) -> None:
    if kind == "8-bit 0/1":
        Image.fromarray(LESION).save(path)
    elif kind == "16-bit 0/1":
        Image.fromarray(LESION.astype(np.uint16)).save(path)
    elif kind == "16-bit 0/255":
        Image.fromarray(LESION.astype(np.uint16) * 255).save(path)
    elif kind == "tiff 16-bit 0/1":
        tifffile.imwrite(path, LESION.astype(np.uint16))
    elif kind == "tiff float 0/1":
        tifffile.imwrite(path, LESION.astype(np.float32))
    elif kind == "palette, dark lesion colour":
        image = Image.fromarray(LESION, mode="P")
        image.putpalette([0, 0, 0, 0, 100, 0] + [0] * 762)
        image.save(path)
    elif kind == "palette, white lesion at index 0":  # Pillow's quantize(2) of a 0/255 mask
        image = Image.fromarray(1 - LESION, mode="P")
        image.putpalette([255, 255, 255, 0, 0, 0])
        image.save(path)
    elif kind == "16-bit 0/128/255 (8-bit values, soft edge)":
        soft = LESION.astype(np.uint16) * 255
        soft[3, 3:12] = 100  # an anti-aliased edge below the threshold
        Image.fromarray(soft).save(path)
    elif kind == "tiff min-is-white 8-bit (ImageJ's inverting LUT)":
        tifffile.imwrite(path, LESION * 255, photometric="miniswhite")
    elif kind == "tiff min-is-white 1-bit":
        tifffile.imwrite(path, LESION == 1, photometric="miniswhite", bitspersample=1)
    elif kind == "tiff palette, red lesion at index 0":
        colormap = np.zeros((3, 256), np.uint16)
        colormap[0, 0] = 40000  # index 0 red, index 1 black
        tifffile.imwrite(path, 1 - LESION, photometric="palette", colormap=colormap)
    elif kind in ("alpha only, black", "alpha only, white"):
        colour = 0 if kind.endswith("black") else 255
        rgba = np.full((16, 16, 4), colour, np.uint8)
        rgba[..., 3] = LESION * 255
        Image.fromarray(rgba).save(path)


@pytest.mark.parametrize(
    "kind",
    [
        "8-bit 0/1",
        "16-bit 0/1",
        "16-bit 0/255",
        "tiff 16-bit 0/1",
        "tiff float 0/1",
        "palette, dark lesion colour",
        "palette, white lesion at index 0",
        "16-bit 0/128/255 (8-bit values, soft edge)",
        "tiff min-is-white 8-bit (ImageJ's inverting LUT)",
        "tiff min-is-white 1-bit",
        "tiff palette, red lesion at index 0",
        "alpha only, black",
        "alpha only, white",
    ],
)
def test_label_style_masks_read_their_lesion(tmp_path: Path, kind: str) -> None:
    """Each used to come out empty (or, alpha on white, all lesion) under the 8-bit >= 128
    rule: a dataset of them prepared into nothing but empty masks."""
    path = tmp_path / ("mask.tif" if kind.startswith("tiff") else "mask.png")
    _save_mask(path, kind)
    assert np.array_equal(load_mask(path), LESION.astype(bool))


def test_a_siamdiff_dataset_reads_back_as_a_folder(tmp_path: Path) -> None:
    """Its manifest and reports are no pairs (--strict failed on them), and a synthetic
    pair's -sNN name keeps its source's group (each became its own group)."""
    root = tmp_path / "syn"
    root.mkdir()
    for k in range(3):
        name = f"cvc_clinicdb-seq01-0001-s{k:02d}"
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / f"{name}.png")
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / f"{name}_mask.png")
    for own in ("manifest-v1.json", "stats.json", "prepare-summary.json"):
        (root / own).write_text("{}")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "samples.png")
    result = read_source("folder", root)
    assert result.skipped == []
    assert {(p.dataset, p.group) for p in result.pairs} == {("cvc_clinicdb", "seq01")}
    assert sorted(p.frame for p in result.pairs) == ["0001-s00", "0001-s01", "0001-s02"]


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_an_opaque_empty_mask_with_alpha_is_empty(tmp_path: Path, mode: str) -> None:
    """One colour everywhere and an alpha that does not vary: a negative frame, not a lesion
    drawn in its alpha channel."""
    Image.new(mode, (8, 8), (0, 255) if mode == "LA" else (0, 0, 0, 255)).save(tmp_path / "m.png")
    assert not load_mask(tmp_path / "m.png").any()


def test_exif_orientation_is_applied_to_images_and_masks(tmp_path: Path) -> None:
    """A camera JPEG stored sideways with orientation 6 (turn 90° clockwise to view): its
    mask is drawn on the picture as viewed, so the image must be read as viewed too."""
    stored = np.zeros((40, 60, 3), np.uint8)
    stored[:10, :10] = 255  # top-left as stored: top-right once turned clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "i.jpg", quality=95, exif=exif)
    image = load_rgb(tmp_path / "i.jpg")
    assert image.shape == (60, 40, 3)
    assert image[:10, -10:].min() > 200 and image[:10, :10].max() < 50
    Image.fromarray(stored[..., 0]).save(tmp_path / "m.png", exif=exif)
    assert load_mask(tmp_path / "m.png")[:10, -10:].all()


def test_a_tiff_orientation_tag_is_applied_like_exif(tmp_path: Path) -> None:
    """A TIFF stored upside down (orientation 3), or sideways (6), beside an upright mask
    was read as stored: the pair silently turned apart, or skipped without the reason."""
    upright = np.zeros((6, 8, 3), np.uint8)
    upright[0, :3] = 255
    tifffile.imwrite(tmp_path / "a.tif", upright[::-1, ::-1], extratags=[(274, "H", 1, 3, True)])
    assert np.array_equal(load_rgb(tmp_path / "a.tif"), upright)
    sideways = np.rot90(upright, 1).copy()
    tifffile.imwrite(tmp_path / "b.tif", sideways, extratags=[(274, "H", 1, 6, True)])
    assert np.array_equal(load_rgb(tmp_path / "b.tif"), upright)
    mask = upright[..., 0]
    tifffile.imwrite(tmp_path / "m.tif", mask[::-1].copy(), extratags=[(274, "H", 1, 4, True)])
    assert np.array_equal(load_mask(tmp_path / "m.tif"), mask > 0)


def test_a_compressed_tiff_reads(tmp_path: Path) -> None:
    """OpenCV writes LZW TIFFs: unreadable without imagecodecs."""
    for compression in ("tiff_lzw", "tiff_adobe_deflate", "jpeg"):
        Image.fromarray(RGB).save(tmp_path / f"{compression}.tif", compression=compression)
        image = load_rgb(tmp_path / f"{compression}.tif")
        assert image.shape == RGB.shape
        if compression != "jpeg":
            assert np.array_equal(image, RGB)


def test_an_alpha_drawn_mask_without_a_lesion_is_empty(tmp_path: Path) -> None:
    """Transparent white everywhere (a negative frame in a dataset drawn in alpha) read as
    a lesion over the whole image."""
    clear = np.zeros((8, 8, 4), np.uint8)
    clear[..., :3] = 255
    assert not load_mask(save(tmp_path / "clear.png", clear)).any()
    clear[2:4, 2:5, 3] = 255  # the same drawn in: its alpha
    assert load_mask(save(tmp_path / "drawn.png", clear)).sum() == 6


def test_stems_that_sanitise_alike_keep_apart(tmp_path: Path) -> None:
    """Two Japanese file names both became "_": prepare stopped on the duplicate name."""
    images = {"ポリープ.png": RGB, "結腸.png": RGB[::-1], "plain.png": RGB[:, ::-1]}
    root = pair_dirs(tmp_path / "pr", images, {n: RGB[..., 0] for n in images})
    groups = sorted(p.group for p in read_source("pranet", root).pairs)
    assert len(set(groups)) == 3 and "plain" in groups
    assert all(g.startswith("__") and len(g) == 10 for g in groups if g != "plain")


def test_a_tiff_over_the_pixel_limit_is_refused_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tifffile.imwrite(tmp_path / "big.tif", np.zeros((16, 16), np.uint8), compression="zlib")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    for load in (load_rgb, load_mask):
        with pytest.raises(UnreadableImageError, match="256 pixels, over the 200 limit"):
            load(tmp_path / "big.tif")


def test_a_min_is_white_tiff_image_is_read_as_shown(tmp_path: Path) -> None:
    grey = np.array([[0, 255]], np.uint8)
    tifffile.imwrite(tmp_path / "i.tif", grey, photometric="miniswhite")
    np.testing.assert_array_equal(load_rgb(tmp_path / "i.tif")[0, :, 0], [255, 0])


# --- nnU-Net v2 raw ------------------------------------------------------------------------


def nnunet_dataset(root: Path, labels: dict, ending: str = ".png") -> Path:
    root.mkdir(parents=True)
    settings = {"channel_names": {"0": "R", "1": "G", "2": "B"}, "labels": labels}
    (root / "dataset.json").write_text(json.dumps(settings | {"file_ending": ending}))
    return root


def test_nnunet_cases_read_every_label_but_background_and_ignore(tmp_path: Path) -> None:
    labels = {"background": 0, "polyp": 1, "adenoma": [1, 2], "ignore": 3}
    root = nnunet_dataset(tmp_path / "Dataset501_Polyps", labels)
    ids = np.array([[0, 1, 2, 3, 0, 0, 1, 2]] * 6, dtype=np.uint8)
    save(root / "imagesTr" / "case_a_0000.png", RGB)
    save(root / "imagesTr" / "case_b_0000.png", RGB[..., 0])  # grey: repeated to RGB
    save(root / "imagesTr" / "notes.txt.png", RGB)  # no _NNNN channel: not a case
    save(root / "labelsTr" / "case_a.png", ids)
    save(root / "labelsTr" / "case_b.png", ids.astype(np.uint16))  # 16-bit ids are ids
    save(root / "labelsTr" / "case_c.png", ids)  # no image
    save(root / "imagesTr" / "case_018.png", RGB)  # no _0000: a bad name, not channel 018
    (root / "imagesTs").mkdir()  # not read, and no problem: --strict passes
    result = read_source("nnunet", root)
    assert [(p.dataset, p.group, p.image.name) for p in result.pairs] == [
        ("Polyps", "case_a", "case_a_0000.png"),
        ("Polyps", "case_b", "case_b_0000.png"),
    ]
    assert sorted((p.name, why) for p, why in result.skipped) == [
        ("case_018.png", "not CASE_0000.png"),
        ("case_c.png", "mask without image"),
        ("notes.txt.png", "not CASE_0000.png"),
    ]
    for pair in result.pairs:
        mask = load_label_map(pair.mask, *pair.labels)
        np.testing.assert_array_equal(mask, (ids == 1) | (ids == 2))  # 3 is ignore, 0 background
    # An id dataset.json does not name, or a colour map: that case is skipped, saying why.
    save(root / "labelsTr" / "case_a.png", np.where(ids == 3, 7, ids).astype(np.uint8))
    with pytest.raises(UnreadableImageError, match=r"label 7 is not in dataset\.json"):
        load_label_map(root / "labelsTr" / "case_a.png", *result.pairs[0].labels)
    save(root / "labelsTr" / "case_a.png", RGB)
    with pytest.raises(UnreadableImageError, match=r"not a label map .*uint8 colour"):
        load_label_map(root / "labelsTr" / "case_a.png", *result.pairs[0].labels)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda root: (root / "dataset.json").unlink(), "no dataset.json: not an nnU-Net v2"),
        (lambda root: (root / "dataset.json").write_text("{"), "dataset.json: cannot read"),
        (
            lambda root: nnunet_dataset(root / "vol", {"background": 0, "tumour": 1}, ".nii.gz"),
            "file_ending '.nii.gz': siamdiff reads 2D images in a lossless format",
        ),
        (  # JPEG noise is no class id: nnU-Net reads 2D labels lossless too
            lambda root: nnunet_dataset(root / "jpg", {"background": 0, "polyp": 1}, ".jpg"),
            "file_ending '.jpg': .* not volumes or JPEG",
        ),
        (
            lambda root: (root / "dataset.json").write_text('{"labels": {"polyp": 1}}'),
            "file_ending must be a string such as '.png', got None",
        ),
        (
            lambda root: nnunet_dataset(root / "f", {"background": 0, "polyp": 1.0}),
            "labels must map each class name to its integer id",
        ),
        (
            lambda root: nnunet_dataset(root / "l", ["background", "polyp"]),
            "labels must map each class name to its integer id",
        ),
        (
            lambda root: nnunet_dataset(root / "bg", {"background": 0, "ignore": 1}),
            "labels name no class besides background and ignore",
        ),
        (
            lambda root: save(root / "imagesTr" / "case_a_0001.png", RGB),
            "case_a_0001.png: channel file 0001 of case 'case_a': siamdiff reads one image",
        ),
    ],
)
def test_nnunet_datasets_it_cannot_read_are_one_line_errors(
    tmp_path: Path, change, message: str
) -> None:
    root = nnunet_dataset(tmp_path / "Dataset1_X", {"background": 0, "polyp": 1})
    save(root / "imagesTr" / "case_a_0000.png", RGB)
    save(root / "labelsTr" / "case_a.png", np.zeros((6, 8), np.uint8))
    made = change(root)
    with pytest.raises(SiamdiffError, match=message) as exc:
        read_source("nnunet", made if isinstance(made, Path) and made.is_dir() else root)
    assert "\n" not in str(exc.value)


def test_only_synthetic_pair_names_keep_their_group_in_pranet_layout(tmp_path: Path) -> None:
    """An ordinary dashed name (a source prefix, a date) is an image of its own; a synthetic
    pair's name read back from an export keeps its source's dataset and group."""
    names = ["Kvasir-SEG-cju0qk", "2021-03-01", "phantom-p03-0007-s01"]
    root = pair_dirs(
        tmp_path / "mixed",
        {f"{n}.png": RGB for n in names},
        {f"{n}.png": RGB[..., 0] for n in names},
    )
    pairs = {p.image.stem: p for p in read_source("pranet", root).pairs}
    assert [(pairs[n].dataset, pairs[n].frame) for n in names[:2]] == [("mixed", "0")] * 2
    assert pairs[names[0]].group != pairs[names[1]].group
    synthetic = pairs["phantom-p03-0007-s01"]
    assert (synthetic.dataset, synthetic.group, synthetic.frame) == ("phantom", "p03", "0007-s01")

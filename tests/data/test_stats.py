"""``stats``: counts per dataset x split, coverage quantiles, stats.json, histogram PNG."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from siamdiff.data.manifest import Manifest, Record, verify, write_manifest
from siamdiff.data.stats import coverage_histogram, dataset_stats, format_stats, write_stats
from siamdiff.errors import SiamdiffError


def record(dataset: str, index: int, split: str, coverage: float) -> Record:
    rid = f"{dataset}-g{index}-0"
    return Record(
        id=rid,
        image=f"{rid}.png",
        mask=f"{rid}_mask.png",
        image_sha256="0" * 64,
        mask_sha256="0" * 64,
        dataset=dataset,
        group=f"g{index}",
        frame="0",
        split=split,
        coverage=coverage,
        width=8,
        height=8,
    )


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """Dataset a: coverage 0, .1, .2, .3, .4 (train x3, val, test); dataset b: .5 twice."""
    splits = ["train", "train", "train", "val", "test"]
    records = [record("a", i, s, i / 10) for i, s in enumerate(splits)]
    records += [record("b", i, "test", 0.5) for i in range(2)]
    write_manifest(tmp_path / "DATA", Manifest(records=records, preprocessing={}))
    return tmp_path / "DATA"


def test_counts_and_coverage_quantiles(root: Path) -> None:
    stats = dataset_stats(root)
    assert stats["counts"] == {
        "a": {"train": 3, "val": 1, "test": 1, "total": 5},
        "b": {"train": 0, "val": 0, "test": 2, "total": 2},
        "all": {"train": 3, "val": 1, "test": 3, "total": 7},
    }
    a = stats["coverage"]["a"]
    assert a == pytest.approx({"mean": 0.2, "p10": 0.04, "median": 0.2, "p90": 0.36})
    assert stats["coverage"]["b"] == pytest.approx(
        {"mean": 0.5, "p10": 0.5, "median": 0.5, "p90": 0.5}
    )
    assert stats["coverage"]["all"]["mean"] == pytest.approx(2.0 / 7)
    assert stats["empty_masks"] == {"a": 1, "b": 0, "all": 1}


def test_a_mask_of_one_lesion_pixel_is_not_empty(tmp_path: Path) -> None:
    records = [record("a", 0, "train", 0.0), record("a", 1, "train", 1 / 512**2)]
    write_manifest(tmp_path / "DATA", Manifest(records=records, preprocessing={}))
    assert dataset_stats(tmp_path / "DATA")["empty_masks"] == {"a": 1, "all": 1}


def test_a_dataset_named_like_the_pooled_row_is_refused_not_double_counted(
    tmp_path: Path,
) -> None:
    records = [record("all", 0, "train", 0.1), record("b", 0, "train", 0.2)]
    write_manifest(tmp_path / "DATA", Manifest(records=records, preprocessing={}))
    with pytest.raises(SiamdiffError, match="named 'all'"):
        dataset_stats(tmp_path / "DATA")


def test_write_stats_writes_json_and_histogram(root: Path, tmp_path: Path) -> None:
    stats = write_stats(root)
    assert json.loads((root / "stats.json").read_text()) == stats
    with Image.open(root / "stats.png") as png:
        assert png.format == "PNG" and png.size == (600, 400)
    write_stats(root, tmp_path / "elsewhere" / "hist.png")
    assert (tmp_path / "elsewhere" / "hist.png").stat().st_size > 1000


def test_stats_files_do_not_upset_verify(tmp_path: Path) -> None:
    write_manifest(tmp_path, Manifest(records=[], preprocessing={}))
    (tmp_path / "stats.json").write_text("{}")
    (tmp_path / "stats.png").write_bytes(b"png")
    assert verify(tmp_path).ok


def test_format_stats_is_an_aligned_table(root: Path) -> None:
    # Through JSON: stats.json has sorted keys, the table must still end with "all".
    text = format_stats(json.loads(json.dumps(write_stats(root), sort_keys=True)))
    lines = text.splitlines()
    assert lines[0].split() == [
        "dataset", "train", "val", "test", "total", "empty", "cov.mean", "p10", "median", "p90"
    ]  # fmt: skip
    assert [line.split()[0] for line in lines[1:]] == ["a", "b", "all"]
    assert lines[1].split()[1:] == ["3", "1", "1", "5", "1", "0.200", "0.040", "0.200", "0.360"]
    assert len({len(line) for line in lines}) == 1  # every column right-aligned to one width


def test_a_picture_inside_the_dataset_is_refused(root: Path) -> None:
    """Any file there but the default stats.png fails verify, and training then refuses it."""
    with pytest.raises(SiamdiffError, match="is inside the dataset"):
        write_stats(root, root / "figures" / "coverage.png")
    assert not (root / "figures").exists()
    write_stats(root, root / "stats.png")  # the default, named


def test_empty_manifest_and_unwritable_png_are_errors(root: Path, tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("a file where a folder should be")
    with pytest.raises(SiamdiffError, match="cannot write") as exc:
        write_stats(root, tmp_path / "blocker" / "hist.png")
    assert "\n" not in str(exc.value) and "hist.png" in str(exc.value)
    assert not (root / "stats.json").exists()  # no new numbers beside a missing picture
    empty = tmp_path / "empty"
    write_manifest(empty, Manifest(records=[], preprocessing={}))
    with pytest.raises(SiamdiffError, match="no records"):
        dataset_stats(empty)


@pytest.mark.parametrize("names", [["_lab"], ["_lab", "kvasir"]])
def test_every_dataset_is_named_in_the_histogram_legend(names: list[str]) -> None:
    """Matplotlib drops labels starting with "_" from a legend it builds itself."""
    coverage = {name: np.linspace(0.1, 0.5, 5) for name in names}
    legend = coverage_histogram(coverage).axes[0].get_legend()
    assert [text.get_text() for text in legend.get_texts()] == names

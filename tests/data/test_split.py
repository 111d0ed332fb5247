"""The hash split: golden values, order independence, group-disjointness, fractions."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from siamdiff.data.readers import read_source
from siamdiff.data.split import split_of, split_unit
from siamdiff.errors import SiamdiffError

# Computed once with SHA-256; a change here means every existing split has moved.
GOLDEN = [
    ("cvc_clinicdb", "seq01", 0.2979463576454301, "train"),
    ("cvc_clinicdb", "seq02", 0.9678350973491765, "test"),
    ("cvc_clinicdb", "seq04", 0.8813373331137584, "val"),
    ("kvasir_seg", "cju0qkwl35piu0993l0dewei2", 0.772082323476955, "train"),
    ("phantom", "p00", 0.7117264876242729, "train"),
]


@pytest.mark.parametrize(("dataset", "group", "unit", "split"), GOLDEN)
def test_golden_values(dataset: str, group: str, unit: float, split: str) -> None:
    assert split_unit(dataset, group) == unit
    assert split_of(dataset, group) == split


def test_dataset_is_part_of_the_key() -> None:
    units = {split_unit(dataset, "seq01") for dataset in ("a", "b", "c", "cvc_clinicdb")}
    assert len(units) == 4


def test_independent_of_order() -> None:
    groups = [f"patient{i}" for i in range(300)]
    forward = {g: split_of("d", g) for g in groups}
    shuffled = groups[:]
    random.Random(1).shuffle(shuffled)
    assert {g: split_of("d", g) for g in shuffled} == forward


def test_fractions_on_many_groups() -> None:
    counts = Counter(split_of("d", f"g{i}") for i in range(10_000))
    assert abs(counts["train"] - 8000) < 200
    assert abs(counts["val"] - 1000) < 120
    assert abs(counts["test"] - 1000) < 120


def test_custom_and_invalid_fractions() -> None:
    assert {split_of("d", f"g{i}", (1.0, 0.0, 0.0)) for i in range(50)} == {"train"}
    assert {split_of("d", f"g{i}", (0.0, 0.0, 1.0)) for i in range(50)} == {"test"}
    for bad in ((0.8, 0.1), (0.5, 0.5, 0.5), (1.2, -0.1, -0.1)):
        with pytest.raises(SiamdiffError, match="fractions"):
            split_of("d", "g", bad)  # type: ignore[arg-type]


def test_cvc_split_is_sequence_disjoint(shared_data: Path) -> None:
    pairs = read_source("cvc-clinicdb", shared_data / "CVC-ClinicDB").pairs
    splits_of_group: dict[str, set[str]] = {}
    for pair in pairs:
        splits_of_group.setdefault(pair.group, set()).add(split_of(pair.dataset, pair.group))
    assert len(splits_of_group) == 25
    assert all(len(s) == 1 for s in splits_of_group.values())
    frames = Counter(split_of(p.dataset, p.group) for p in pairs)
    # 25 sequences give 21 / 1 / 3 sequences: val is the 11 frames of sequence 4.
    assert frames == {"train": 455, "val": 11, "test": 62}

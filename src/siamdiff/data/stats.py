"""``siamdiff stats``: counts per dataset and split, mask-coverage distribution, histogram."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from siamdiff.atomic import atomic_write_bytes, atomic_write_json
from siamdiff.data.manifest import MANIFEST_NAME, POOLED_ROW, SPLITS, load_manifest
from siamdiff.errors import SiamdiffError
from siamdiff.report import figure_png

STATS_JSON = "stats.json"
STATS_PNG = "stats.png"


def _coverage_summary(coverage: np.ndarray) -> dict[str, float]:
    p10, median, p90 = np.percentile(coverage, [10, 50, 90])
    return {
        "mean": round(float(coverage.mean()), 6),
        "p10": round(float(p10), 6),
        "median": round(float(median), 6),
        "p90": round(float(p90), 6),
    }


def _stats_and_coverage(root: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    manifest = load_manifest(root)
    if not manifest.records:
        raise SiamdiffError("the manifest lists no records", root)
    by_dataset: dict[str, list[float]] = {}
    counts: dict[str, dict[str, int]] = {}
    for record in sorted(manifest.records, key=lambda r: r.dataset):
        if record.dataset == POOLED_ROW:
            raise SiamdiffError(
                f"record {record.id} is in a dataset named {POOLED_ROW!r}, the pooled row's name; "
                "rename that dataset",
                root / MANIFEST_NAME,
            )
        by_dataset.setdefault(record.dataset, []).append(record.coverage)
        for row in (record.dataset, POOLED_ROW):
            per_split = counts.setdefault(row, dict.fromkeys((*SPLITS, "total"), 0))
            per_split[record.split] += 1
            per_split["total"] += 1
    coverage = {name: np.asarray(values) for name, values in by_dataset.items()}
    rows = {**coverage, POOLED_ROW: np.concatenate(list(coverage.values()))}
    stats = {
        "dataset_version": manifest.dataset_version,
        "counts": {name: counts[name] for name in rows},
        "coverage": {name: _coverage_summary(values) for name, values in rows.items()},
        "empty_masks": {name: int((values == 0).sum()) for name, values in rows.items()},
    }
    return stats, coverage


def dataset_stats(root: str | Path) -> dict[str, Any]:
    """Counts per dataset x split, mask coverage (mean, p10, median, p90) and empty masks.

    Every table has one row per dataset plus an ``"all"`` row. Coverage is the fraction of
    mask pixels that are foreground, as recorded in the manifest.
    """
    return _stats_and_coverage(Path(root))[0]


def coverage_histogram(coverage: dict[str, np.ndarray]) -> Figure:
    """Mask coverage per pair, stacked bars coloured by dataset."""
    figure = Figure(figsize=(6, 4))
    axes = figure.add_subplot()
    *_, bars = axes.hist(list(coverage.values()), bins=np.linspace(0, 1, 41), stacked=True)
    # Handles and names given, not label=: matplotlib leaves out labels starting with "_".
    axes.legend(bars if len(coverage) > 1 else [bars], list(coverage))
    axes.set_xlabel("mask coverage (foreground fraction)")
    axes.set_ylabel("pairs")
    figure.tight_layout()
    return figure


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise SiamdiffError(f"cannot write ({exc.strerror})", path) from exc


def write_stats(root: str | Path, png: str | Path | None = None) -> dict[str, Any]:
    """:func:`dataset_stats`, written to ``root/stats.json``, plus a coverage histogram PNG.

    The histogram (stacked bars coloured by dataset) goes to ``png``, by default
    ``root/stats.png``; ``verify`` ignores both default files.
    """
    root = Path(root)
    png = Path(png) if png is not None else root / STATS_PNG
    if png.resolve() != (root / STATS_PNG).resolve() and png.resolve().is_relative_to(
        root.resolve()
    ):  # any other file there fails verify as extra, and training then refuses the data
        raise SiamdiffError(
            f"is inside the dataset: name a file outside it, or {STATS_PNG} (the default)", png
        )
    stats, coverage = _stats_and_coverage(root)
    # The picture first: a failed PNG must not leave a new stats.json beside an old picture.
    with _writing(png):
        atomic_write_bytes(png, figure_png(coverage_histogram(coverage)))
    with _writing(root / STATS_JSON):
        atomic_write_json(root / STATS_JSON, stats)
    return stats


def format_stats(stats: dict[str, Any]) -> str:
    """An aligned plain-text table: one row per dataset (and all), counts then coverage."""
    header = ["dataset", *SPLITS, "total", "empty", "cov.mean", "p10", "median", "p90"]
    rows = [header]
    # "all" last, whatever order the dict came in (stats.json is written with sorted keys).
    for name in sorted(stats["counts"], key=lambda n: (n == POOLED_ROW, n)):
        counts = stats["counts"][name]
        coverage = stats["coverage"][name]
        rows.append(
            [
                name,
                *(str(counts[s]) for s in (*SPLITS, "total")),
                str(stats["empty_masks"][name]),
                *(f"{coverage[k]:.3f}" for k in ("mean", "p10", "median", "p90")),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    )

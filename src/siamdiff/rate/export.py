"""``siamdiff rate --export DIR``: mos.json, mos.csv and mos.png beside the study."""

from __future__ import annotations

import csv
import io
import sqlite3
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from siamdiff.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from siamdiff.errors import SiamdiffError
from siamdiff.rate.statistics import summarize
from siamdiff.rate.storage import DB_FILE, all_answers
from siamdiff.rate.study import SOURCES, load_study
from siamdiff.report import figure_png

CSV_FIELDS = (
    "rater",
    "source",
    "n",
    "ratings",
    "mos",
    "ci_low",
    "ci_high",
    "detection_accuracy",
    "detection_balanced_accuracy",
)
COLOURS = {"real": "#4c72b0", "synthetic": "#dd8452"}


def _csv(summary: dict[str, Any]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    scopes = {"ALL": summary["overall"], **summary["per_rater"]}
    for rater, block in scopes.items():
        for source in SOURCES:
            row = block["mos"][source]
            writer.writerow(
                {
                    "rater": rater,
                    "source": source,
                    "n": row["n"],  # images pooled over raters, ratings for one rater
                    "ratings": row.get("ratings", row["n"]),
                    "mos": row["mean"],
                    "ci_low": row["ci_low"],
                    "ci_high": row["ci_high"],
                    "detection_accuracy": block["detection"]["accuracy"],
                    "detection_balanced_accuracy": block["detection"]["balanced_accuracy"],
                }
            )
    return buffer.getvalue()


def _chart(summary: dict[str, Any]) -> bytes:
    """MOS per source with 95 % CI error bars, overall and for each rater."""
    scopes = {"all raters": summary["overall"], **summary["per_rater"]}
    figure = Figure(figsize=(max(4.0, 1.4 * len(scopes) + 1.5), 3.4))
    ax = figure.add_subplot()
    width = 0.38
    for offset, source in zip((-width / 2, width / 2), SOURCES, strict=True):
        rows = [block["mos"][source] for block in scopes.values()]
        means = [r["mean"] or 0.0 for r in rows]
        # A CI is absent below two scores; draw no error bar there.
        errors = [
            [
                m - (r["ci_low"] if r["ci_low"] is not None else m)
                for m, r in zip(means, rows, strict=True)
            ],
            [
                (r["ci_high"] if r["ci_high"] is not None else m) - m
                for m, r in zip(means, rows, strict=True)
            ],
        ]
        positions = [i + offset for i in range(len(scopes))]
        ax.bar(positions, means, width, yerr=errors, capsize=3, label=source, color=COLOURS[source])
    ax.set_xticks(range(len(scopes)), list(scopes), rotation=20, ha="right")
    ax.set_ylim(0, 5.5)
    ax.set_ylabel("MOS (1-5), 95 % CI")
    balanced = summary["overall"]["detection"]["balanced_accuracy"]
    title = "Realism MOS"
    if balanced is not None:
        title += f"\nreal/synthetic detection {100 * balanced:.0f} % balanced (50 % = chance)"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    figure.tight_layout()
    return figure_png(figure)


def export_results(study_root: str | Path) -> dict[str, Any]:
    """Write ``mos.json``, ``mos.csv`` and ``mos.png`` into the study directory and
    return the summary (see statistics.summarize)."""
    study = load_study(study_root)
    if not (study.root / DB_FILE).is_file():
        raise SiamdiffError("no ratings yet (serve the study first)", study.root)
    try:
        answers = all_answers(study.root)
    except sqlite3.Error as exc:
        raise SiamdiffError(f"cannot read the ratings ({exc})", study.root / DB_FILE) from exc
    if not answers:
        raise SiamdiffError("no ratings yet (no rater has answered)", study.root / DB_FILE)
    summary = summarize(study.items, answers)
    atomic_write_json(study.root / "mos.json", summary)
    atomic_write_text(study.root / "mos.csv", _csv(summary))
    atomic_write_bytes(study.root / "mos.png", _chart(summary))
    return summary

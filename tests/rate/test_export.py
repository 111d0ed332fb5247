"""mos.json / mos.csv / mos.png from answers stored in the study database."""

from __future__ import annotations

import csv
import json

import pytest
from PIL import Image

from siamdiff.rate import storage
from siamdiff.rate.export import export_results
from siamdiff.rate.study import Study


def test_export_writes_json_csv_and_chart(study: Study) -> None:
    storage.init_db(study.root)
    conn = storage.connect(study.root)
    wanted = {"real": 5, "synthetic": 2}
    codes = []
    storage.create_rater(conn, "enrolled, never began", study.order)
    for name in ("A", "B"):
        rater = storage.create_rater(conn, name, study.order)
        codes.append(rater.code)
        for position, index in enumerate(study.sequence):
            source = study.items[index].source
            storage.record_answer(conn, rater, position, index, wanted[source], "real")
    conn.close()

    summary = export_results(study.root)
    assert json.loads((study.root / "mos.json").read_text()) == summary
    overall = summary["overall"]
    assert overall["mos"]["real"]["mean"] == 5.0 and overall["mos"]["synthetic"]["mean"] == 2.0
    assert overall["detection"]["accuracy"] == pytest.approx(0.5)  # always guessing "real"
    assert overall["detection"]["balanced_accuracy"] == pytest.approx(0.5)
    assert overall["intra_rater"]["exact_agreement"] == 1.0
    assert overall["inter_rater_alpha_ordinal"] == pytest.approx(1.0)
    rows = list(csv.DictReader((study.root / "mos.csv").open()))
    assert len(rows) == 2 * 3  # ALL + two raters, two sources each
    # Raters by number: a rater code is the credential to answer as that rater.
    assert {r["rater"] for r in rows} == {"ALL", "R001", "R002"}
    exported = "".join((study.root / name).read_text() for name in ("mos.csv", "mos.json"))
    assert not any(code in exported for code in codes)
    assert {(r["rater"], r["source"], r["mos"]) for r in rows if r["rater"] == "ALL"} == {
        ("ALL", "real", "5.0"),
        ("ALL", "synthetic", "2.0"),
    }
    with Image.open(study.root / "mos.png") as chart:
        assert chart.format == "PNG" and chart.width > 300

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


def test_csv_carries_each_intervals_two_ends_and_the_balanced_accuracy(study: Study) -> None:
    """Scores with spread (so every interval has two distinct ends) and guesses on unequal
    shares of real and synthetic images (so balanced and raw accuracy part ways)."""
    real = [i for i, item in enumerate(study.items) if item.source == "real"]
    synthetic = [i for i, item in enumerate(study.items) if item.source == "synthetic"]
    # Per rater: the score of each real / synthetic image (in index order) and its guess.
    scores = {"A": ([4, 3, 3, 2], [2, 3, 1, 2]), "B": ([4, 4, 3, 3], [1, 1, 2, 2])}
    # A: all 4 real images told right, 1 synthetic one guessed wrong, the rest unguessed.
    # B: 2 real images told right, 3 of 4 synthetic ones told right.
    guesses = {
        "A": (["real"] * 4, ["real", None, None, None]),
        "B": (["real", "real", None, None], ["synthetic", "synthetic", "synthetic", "real"]),
    }
    storage.init_db(study.root)
    conn = storage.connect(study.root)
    for name in ("A", "B"):
        rater = storage.create_rater(conn, name, study.order)
        score_of = dict(zip(real + synthetic, [*scores[name][0], *scores[name][1]], strict=True))
        guess_of = dict(zip(real + synthetic, [*guesses[name][0], *guesses[name][1]], strict=True))
        for position, index in enumerate(study.sequence):  # repeats: the same answer again
            storage.record_answer(conn, rater, position, index, score_of[index], guess_of[index])
    conn.close()
    summary = export_results(study.root)
    rows = {(r["rater"], r["source"]): r for r in csv.DictReader((study.root / "mos.csv").open())}

    def number(rater: str, source: str, column: str) -> float:
        return float(rows[rater, source][column])

    t3 = 3.182446  # t(0.975, df = 3): four scores, or four image means
    # (mean, standard error of the mean) per rater and source; the ends clip to 1-5.
    expected = {
        ("R001", "real"): (3.0, 0.408248),  # 4, 3, 3, 2
        ("R001", "synthetic"): (2.0, 0.408248),  # 2, 3, 1, 2: the low end clips at 1
        ("R002", "real"): (3.5, 0.288675),  # 4, 4, 3, 3
        ("R002", "synthetic"): (1.5, 0.288675),  # 1, 1, 2, 2: clips at 1
        ("ALL", "real"): (3.25, 0.322749),  # image means 4, 3.5, 3, 2.5
        ("ALL", "synthetic"): (1.75, 0.144338),  # image means 1.5, 2, 1.5, 2
    }
    for (rater, source), (mean, sem) in expected.items():
        assert number(rater, source, "mos") == pytest.approx(mean)
        low, high = max(mean - t3 * sem, 1.0), min(mean + t3 * sem, 5.0)
        assert number(rater, source, "ci_low") == pytest.approx(low, abs=1e-4)
        assert number(rater, source, "ci_high") == pytest.approx(high, abs=1e-4)
        assert number(rater, source, "ci_high") > mean > number(rater, source, "ci_low")
    # (raw accuracy, balanced accuracy): the mean of the real and synthetic hit rates.
    detection = {
        "R001": (4 / 5, (4 / 4 + 0 / 1) / 2),
        "R002": (5 / 6, (2 / 2 + 3 / 4) / 2),
        "ALL": (9 / 11, (6 / 6 + 3 / 5) / 2),
    }
    for rater, (accuracy, balanced) in detection.items():
        for source in ("real", "synthetic"):
            assert number(rater, source, "detection_accuracy") == pytest.approx(accuracy)
            assert number(rater, source, "detection_balanced_accuracy") == pytest.approx(balanced)
    assert summary["overall"]["detection"]["balanced_accuracy"] == pytest.approx(0.8)

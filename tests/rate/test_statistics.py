"""Statistics on hand-computed inputs: MOS and its t-interval, detection, alpha."""

from __future__ import annotations

import numpy as np
import pytest

from siamdiff.rate.statistics import consistency, detection, inter_rater_alpha, mos, summarize
from siamdiff.rate.storage import Answer
from siamdiff.rate.study import Item, _sequence


def test_mos_t_interval() -> None:
    result = mos([1, 2, 3, 4, 5])
    # mean 3, sd 1.5811, sem 0.7071, t(0.975, df=4) = 2.7764
    assert result["n"] == 5 and result["mean"] == 3.0
    assert result["ci_low"] == pytest.approx(3 - 1.96324, abs=1e-4)
    assert result["ci_high"] == pytest.approx(3 + 1.96324, abs=1e-4)
    assert mos([4])["ci_low"] is None and mos([])["mean"] is None
    assert mos([2, 2, 2])["ci_low"] == mos([2, 2, 2])["ci_high"] == 2.0


def test_detection_balanced_accuracy_and_fisher_test() -> None:
    # Real images: 5 of 6 told right; synthetic: 4 of 6.
    pairs = [("real", "real")] * 5 + [("synthetic", "real")]
    pairs += [("synthetic", "synthetic")] * 4 + [("real", "synthetic")] * 2
    result = detection(pairs)
    assert result["n"] == 12 and result["accuracy"] == 0.75
    assert result["balanced_accuracy"] == pytest.approx((5 / 6 + 4 / 6) / 2)
    # Hypergeometric (rows 6/6, 7 "real" guesses): P(a) for a = 1, 2, 5, 6 real hits, the
    # tables at most as likely as the observed one (a = 5).
    assert result["p_value"] == pytest.approx((1 + 15 + 15 + 1) / 132)
    assert result["ci_low"] < 0.75 < result["ci_high"]
    assert detection([])["accuracy"] is None and detection([])["balanced_accuracy"] is None


def test_detection_is_not_fooled_by_an_unbalanced_guessed_subset() -> None:
    """Always answering "real" on a 65 % real subset is 65 % raw accuracy and no skill."""
    pairs = [("real", "real")] * 13 + [("real", "synthetic")] * 7
    result = detection(pairs)
    assert result["accuracy"] == pytest.approx(0.65)
    assert result["balanced_accuracy"] == pytest.approx(0.5)
    assert result["p_value"] == pytest.approx(1.0)
    only_real = detection([("real", "real")] * 6 + [("synthetic", "real")] * 2)
    assert only_real["balanced_accuracy"] is None and only_real["p_value"] == pytest.approx(1.0)


def test_intra_rater_consistency() -> None:
    result = consistency([(3, 3), (4, 2), (5, 4)])
    assert result["exact_agreement"] == pytest.approx(1 / 3)
    assert result["mean_abs_difference"] == pytest.approx(1.0)


def test_krippendorff_alpha_known_values() -> None:
    assert inter_rater_alpha({"a": {0: 1, 1: 3, 2: 5}, "b": {0: 1, 1: 3, 2: 5}}, 3) == 1.0
    # Hand-computed ordinal alpha: values {1, 5} twice each, always crossed:
    # D_o = 16 / 4 = 4, D_e = 32 / 12, alpha = 1 - 4 / (8 / 3) = -0.5.
    assert inter_rater_alpha({"a": {0: 1, 1: 5}, "b": {0: 5, 1: 1}}, 2) == pytest.approx(-0.5)
    # A third rater who rated only an unpaired item changes nothing.
    three = {"a": {0: 1, 1: 5}, "b": {0: 5, 1: 1}, "c": {2: 3}}
    assert inter_rater_alpha(three, 3) == pytest.approx(-0.5)
    assert inter_rater_alpha({"a": {0: 1}}, 1) is None
    assert inter_rater_alpha({"a": {0: 4, 1: 4}, "b": {0: 4, 1: 4}}, 2) is None


def test_summarize_uses_first_ratings_and_measures_repeats() -> None:
    items = [Item(f"n{i}", s, f"r{i}", "d", False) for i, s in enumerate(["real", "synthetic"])]
    answers = [
        Answer("A", 0, 0, 5, "real"),
        Answer("A", 1, 1, 2, "synthetic"),
        Answer("A", 2, 0, 3, None),  # repeat of item 0: consistency only
        Answer("B", 0, 1, 4, "real"),
        Answer("B", 1, 0, 4, "real"),
    ]
    summary = summarize(items, answers)
    assert summary["raters"] == 2 and summary["answers"] == 5
    overall = summary["overall"]
    assert overall["mos"]["real"]["mean"] == 4.5  # 5 (A) and 4 (B); the repeat 3 is excluded
    assert overall["mos"]["synthetic"]["mean"] == 3.0
    assert overall["detection"]["accuracy"] == pytest.approx(3 / 4)
    assert overall["intra_rater"] == {"n": 1, "exact_agreement": 0.0, "mean_abs_difference": 2.0}
    assert summary["per_rater"]["B"]["detection"]["accuracy"] == 0.5
    assert summary["per_rater"]["B"]["intra_rater"]["n"] == 0
    assert overall["inter_rater_alpha_ordinal"] is not None


@pytest.mark.parametrize("seed", range(20))
def test_sequence_spaces_every_repeat(seed: int) -> None:
    n = 5
    order = _sequence(n, n - 1, np.random.default_rng(seed))
    assert sorted(set(order)) == list(range(n)) and len(order) == 2 * n - 1
    for item in set(order):
        places = [i for i, x in enumerate(order) if x == item]
        assert len(places) == 1 or places[1] - places[0] >= 2

"""Statistics on hand-computed inputs: MOS and its t-interval, detection, alpha."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from siamdiff.rate.statistics import (
    consistency,
    detection,
    inter_rater_alpha,
    mos,
    pooled_detection,
    pooled_mos,
    summarize,
)
from siamdiff.rate.storage import Answer
from siamdiff.rate.study import Item, _sequence


def test_mos_t_interval() -> None:
    result = mos([1, 2, 3, 4, 5])
    # mean 3, sd 1.5811, sem 0.7071, t(0.975, df=4) = 2.7764
    assert result["n"] == 5 and result["mean"] == 3.0
    assert result["ci_low"] == pytest.approx(3 - 1.96324, abs=1e-4)
    assert result["ci_high"] == pytest.approx(3 + 1.96324, abs=1e-4)
    assert mos([4])["ci_low"] is None and mos([])["mean"] is None
    # Equal scores have no spread to estimate: no interval rather than a zero-width one.
    assert mos([2, 2, 2])["ci_low"] is None and mos([2, 2, 2])["ci_high"] is None
    # Mean 4.8, sem 0.2, t(0.975, df=4) = 2.7764: 4.245 to 5.355, past the scale's top.
    near_top = mos([5, 5, 5, 5, 4])
    assert near_top["ci_low"] == pytest.approx(4.8 - 2.7764 * 0.2, abs=1e-3)
    assert near_top["ci_high"] == 5.0 and mos([1, 1, 1, 2])["ci_low"] == 1.0


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


def test_detection_interval_is_the_exact_clopper_pearson_one() -> None:
    """9 of 12 told right: the documented exact binomial interval, not Wilson's (0.468-0.911)
    nor any other approximation."""
    pairs = [("real", "real")] * 5 + [("synthetic", "real")]
    pairs += [("synthetic", "synthetic")] * 4 + [("real", "synthetic")] * 2
    result = detection(pairs)
    # Clopper-Pearson from its beta-quantile definition: about 0.4281 to 0.9451.
    assert result["ci_low"] == pytest.approx(stats.beta.ppf(0.025, 9, 12 - 9 + 1), abs=1e-9)
    assert result["ci_high"] == pytest.approx(stats.beta.ppf(0.975, 9 + 1, 12 - 9), abs=1e-9)
    assert (round(result["ci_low"], 3), round(result["ci_high"], 3)) == (0.428, 0.945)


def test_detection_is_not_fooled_by_an_unbalanced_guessed_subset() -> None:
    """Always answering "real" on a 65 % real subset is 65 % raw accuracy and no skill."""
    pairs = [("real", "real")] * 13 + [("real", "synthetic")] * 7
    result = detection(pairs)
    assert result["accuracy"] == pytest.approx(0.65)
    assert result["balanced_accuracy"] == pytest.approx(0.5)
    assert result["p_value"] == pytest.approx(1.0)
    only_real = detection([("real", "real")] * 6 + [("synthetic", "real")] * 2)
    assert only_real["balanced_accuracy"] is None and only_real["p_value"] == pytest.approx(1.0)


def test_pooled_mos_takes_the_image_as_the_unit() -> None:
    """Ten raters scoring the same 2 images are 2 samples of the set, not 20."""
    result = pooled_mos([[5] * 9 + [3], [1, 2, 3]])
    assert result["n"] == 2 and result["ratings"] == 13
    assert result["mean"] == pytest.approx((4.8 + 2.0) / 2)
    # Two image means 4.8 and 2.0: sem 1.4, t(0.975, df=1) = 12.7062: the whole scale.
    assert (result["ci_low"], result["ci_high"]) == (1.0, 5.0)
    four = pooled_mos([[4], [4, 3], [3], [3, 3]])  # image means 4, 3.5, 3, 3: sem 0.2394
    assert four["ci_low"] == pytest.approx(3.375 - 3.18245 * 0.239357, abs=1e-4)
    assert four["ci_high"] == pytest.approx(3.375 + 3.18245 * 0.239357, abs=1e-4)


def test_pooled_detection_permutes_images_not_ratings() -> None:
    """3 real and 3 synthetic images, each told right by every rater: of the 20 ways to
    label 3 of 6 images real, 2 separate them as perfectly (either way round), p = 2/20."""
    images = [("real", ["real", "real"]), ("real", ["real"]), ("real", ["real"] * 5)]
    images += [("synthetic", ["synthetic"] * 3), ("synthetic", ["synthetic"])] * 1
    images += [("synthetic", ["synthetic", "synthetic"])]
    result = pooled_detection(images)
    assert result["images"] == 6 and result["n"] == 14 and result["accuracy"] == 1.0
    assert result["p_value"] == pytest.approx(2 / 20)
    # No spread to resample: the exact interval over 6 images, lower end 0.025 ** (1 / 6).
    assert result["ci_low"] == pytest.approx(0.025 ** (1 / 6)) and result["ci_high"] == 1.0
    # The same 14 guesses as independent ratings would claim far more certainty.
    assert detection([(g, t) for t, gs in images for g in gs])["p_value"] < 0.001
    chance = pooled_detection(
        [("real", ["real", "synthetic"])] * 4 + [("synthetic", ["real", "synthetic"])] * 4
    )
    assert chance["p_value"] == pytest.approx(1.0) and chance["accuracy"] == 0.5
    assert chance["ci_low"] < 0.2 and chance["ci_high"] > 0.8  # 4 of 8 images, exactly
    # 5 images each told right by half: 2.5 of 5, an interval symmetric about 0.5.
    odd = pooled_detection(
        [("real", ["real", "synthetic"])] * 3 + [("synthetic", ["real", "synthetic"])] * 2
    )
    assert odd["ci_low"] == pytest.approx(1 - odd["ci_high"])
    mixed = pooled_detection(
        [("real", ["real"]), ("real", ["synthetic"])] * 3
        + [("synthetic", ["synthetic"]), ("synthetic", ["real"])] * 3
    )
    assert mixed["ci_low"] < 0.5 < mixed["ci_high"]
    one_each = pooled_detection([("real", ["real"]), ("synthetic", ["synthetic"])])
    assert one_each["p_value"] is None and one_each["ci_low"] is None


def test_pooled_detection_bootstrap_interval_covers_95_percent() -> None:
    """One guess per image: resampling the images of each source is then drawing the hits
    from two binomials, so the bootstrap's ends are that distribution's 2.5 % and 97.5 %
    quantiles (a 90 % interval would fall about 0.005 inside on each side)."""
    images = [("real", ["real"])] * 300 + [("real", ["synthetic"])] * 100
    images += [("synthetic", ["synthetic"])] * 200 + [("synthetic", ["real"])] * 200
    result = pooled_detection(images)
    assert result["accuracy"] == pytest.approx(500 / 800)
    # The exact distribution of the resampled hits: Binomial(400, 3/4) + Binomial(400, 1/2).
    hits = np.arange(401)
    pmf = np.convolve(stats.binom.pmf(hits, 400, 0.75), stats.binom.pmf(hits, 400, 0.5))
    cdf = np.cumsum(pmf)
    low, high = (np.searchsorted(cdf, q) / 800 for q in (0.025, 0.975))  # 0.5925, 0.6575
    # 9999 resamples on a 1/800 grid: within two grid steps of the exact quantiles.
    assert result["ci_low"] == pytest.approx(low, abs=2.5e-3)
    assert result["ci_high"] == pytest.approx(high, abs=2.5e-3)


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


def test_krippendorff_alpha_is_ordinal_not_interval() -> None:
    """Scores 1, 2 and 5, each twice: ordinal distances count the ranks between two scores,
    interval ones the squared gap, so the two alphas differ (7/12 against 47/52)."""
    ratings = {"a": {0: 1, 1: 2, 2: 5}, "b": {0: 2, 1: 1, 2: 5}}
    # Frequencies n_1 = n_2 = n_5 = 2 (n = 6); ordinal delta(c, k) = (sum_{g=c..k} n_g -
    # (n_c + n_k) / 2) ** 2: delta(1, 2) = 4, delta(1, 5) = 16, delta(2, 5) = 4.
    # Observed: the pairs (1, 2) and (2, 1) on items 0 and 1, twice each: 4 * 4 = 16.
    # Expected: sum over c != k of n_c n_k delta = 2 * (4 * 4 + 4 * 16 + 4 * 4) = 192.
    ordinal = 1 - (6 - 1) * 16 / 192
    # Interval distances (1, 9 and 16) would give 1 - 5 * 4 / 208 = 0.904.
    assert inter_rater_alpha(ratings, 3) == pytest.approx(ordinal)
    assert ordinal == pytest.approx(7 / 12)


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
    assert overall["mos"]["real"]["n"] == 1 and overall["mos"]["real"]["ratings"] == 2
    assert overall["mos"]["synthetic"]["mean"] == 3.0
    assert overall["detection"]["accuracy"] == pytest.approx(3 / 4)
    assert overall["intra_rater"] == {"n": 1, "exact_agreement": 0.0, "mean_abs_difference": 2.0}
    assert summary["per_rater"]["B"]["detection"]["accuracy"] == 0.5
    assert summary["per_rater"]["B"]["intra_rater"]["n"] == 0
    assert overall["inter_rater_alpha_ordinal"] is not None


def test_raters_are_listed_in_joining_order_past_999() -> None:
    items = [Item("n0", "real", "r0", "d", False)]
    raters = ["R1000", "R101", "R999"]
    summary = summarize(items, [Answer(r, 0, 0, 3, None) for r in raters])
    assert list(summary["per_rater"]) == ["R101", "R999", "R1000"]


@pytest.mark.parametrize("seed", range(20))
def test_sequence_spaces_every_repeat(seed: int) -> None:
    n = 5
    order = _sequence(n, n - 1, np.random.default_rng(seed))
    assert sorted(set(order)) == list(range(n)) and len(order) == 2 * n - 1
    for item in set(order):
        places = [i for i, x in enumerate(order) if x == item]
        assert len(places) == 1 or places[1] - places[0] >= 2

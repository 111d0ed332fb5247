"""MOS with confidence intervals, the Turing-test score, and rater reliability.

Every statistic except intra-rater consistency uses each rater's *first* rating of an
item; the repeated showings only measure how consistently a rater scores the same image.

Pooled over raters, the ratings of one image are not independent (and the images are what
the study samples from the two sets): the intervals and the test take the *image* as the
unit. The MOS interval is over per-image mean scores, the detection test permutes the
images' real / synthetic labels, its interval resamples images. Within one rater each image
is rated once, and the ratings are the unit.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import krippendorff
import numpy as np
from scipy import stats

from siamdiff.rate.storage import Answer
from siamdiff.rate.study import SOURCES, Item

CONFIDENCE = 0.95
SCALE = (1.0, 5.0)  # the scores' range: an interval never claims a mean outside it
RESAMPLES = 9999  # permutations and bootstrap resamples where exact enumeration is too long


def mos(scores: Sequence[float]) -> dict[str, Any]:
    """Mean opinion score with a Student-t confidence interval, clipped to the 1-5 scale
    (few widely spread scores reach past it; None below two scores, or when they are all
    equal: a zero-width interval would claim certainty)."""
    values = np.asarray(scores, dtype=np.float64)
    n = int(values.size)
    if n == 0:
        return {"n": 0, "mean": None, "ci_low": None, "ci_high": None}
    mean = float(values.mean())
    low = high = None
    if n >= 2 and float(values.std()) > 0.0:
        interval = stats.t.interval(CONFIDENCE, n - 1, loc=mean, scale=stats.sem(values))
        low, high = max(float(interval[0]), SCALE[0]), min(float(interval[1]), SCALE[1])
    return {"n": n, "mean": mean, "ci_low": low, "ci_high": high}


def pooled_mos(scores_by_image: Sequence[Sequence[float]]) -> dict[str, Any]:
    """MOS over raters with the image as the unit: the mean and t-interval of the images'
    mean scores (``n`` images; ``ratings`` in all)."""
    means = [float(np.mean(scores)) for scores in scores_by_image if len(scores)]
    return {**mos(means), "ratings": int(sum(len(scores) for scores in scores_by_image))}


def detection(guesses: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """How well (guess, truth) pairs tell real from synthetic images.

    Guesses are optional and a rater may stop early, so the guessed images need not be half
    real: a rater always answering "real" on a 65 % real subset scores 65 % raw accuracy with
    no skill at all. Hence ``balanced_accuracy``, the mean of the hit rates on real and on
    synthetic images (0.5 = indistinguishable whatever the mix; None until both sources were
    guessed on), and ``p_value``, Fisher's exact test of guess against truth (two-sided).
    ``accuracy`` and its exact binomial CI describe the raw hit rate.
    """
    n = len(guesses)
    if n == 0:
        return {
            "n": 0,
            "accuracy": None,
            "ci_low": None,
            "ci_high": None,
            "balanced_accuracy": None,
            "p_value": None,
        }
    # table[truth][guess], rows and columns in SOURCES order.
    table = [
        [sum(pair == (guess, truth) for pair in guesses) for guess in SOURCES] for truth in SOURCES
    ]
    correct = table[0][0] + table[1][1]
    ci = stats.binomtest(correct, n, 0.5).proportion_ci(CONFIDENCE)
    hit_rates = [row[i] / sum(row) for i, row in enumerate(table) if sum(row)]
    return {
        "n": n,
        "accuracy": correct / n,
        "ci_low": float(ci.low),
        "ci_high": float(ci.high),
        "balanced_accuracy": float(np.mean(hit_rates)) if len(hit_rates) == 2 else None,
        "p_value": float(stats.fisher_exact(table).pvalue),
    }


def pooled_detection(guesses_by_image: Sequence[tuple[str, Sequence[str]]]) -> dict[str, Any]:
    """:func:`detection` over raters, ``(truth, guesses)`` per image, with the image as the
    unit: ``p_value`` from permuting the images' truth labels (exact while the arrangements
    number at most RESAMPLES) with the difference of the mean share of "real" guesses on real
    and on synthetic images as statistic; ``ci_low`` / ``ci_high`` a percentile bootstrap of
    the accuracy resampling images within each source. When every image was judged alike
    (all told right, say) the bootstrap has no spread, and the interval is the exact binomial
    one over the images: six images all told right are no certainty of perfect detection."""
    images = [(truth, list(guesses)) for truth, guesses in guesses_by_image if len(guesses)]
    pairs = [(guess, truth) for truth, guesses in images for guess in guesses]
    result = detection(pairs)
    result.update(images=len(images), ci_low=None, ci_high=None, p_value=None)
    groups = [[guesses for truth, guesses in images if truth == s] for s in SOURCES]
    if any(len(group) < 2 for group in groups):  # nothing to permute or resample
        return result
    rng = np.random.default_rng(0)  # reproducible: the same answers give the same numbers
    shares = [
        np.array([np.mean([g == "real" for g in guesses]) for guesses in group]) for group in groups
    ]
    test = stats.permutation_test(
        shares,
        lambda real, synthetic: np.mean(real) - np.mean(synthetic),
        permutation_type="independent",
        n_resamples=RESAMPLES,
        rng=rng,
    )
    correct = [
        np.array([sum(g == s for g in gs) for gs in group])
        for s, group in zip(SOURCES, groups, strict=True)
    ]
    counts = [np.array([len(gs) for gs in group]) for group in groups]
    picks = [rng.integers(len(group), size=(RESAMPLES, len(group))) for group in groups]
    hits = sum(c[p].sum(axis=1) for c, p in zip(correct, picks, strict=True))
    accuracies = hits / sum(n[p].sum(axis=1) for n, p in zip(counts, picks, strict=True))
    low, high = np.quantile(accuracies, [(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2])
    if low == high:
        low, high = _clopper_pearson(result["accuracy"] * len(images), len(images))
    result.update(ci_low=float(low), ci_high=float(high))
    result["p_value"] = float(test.pvalue)
    return result


def _clopper_pearson(told: float, n: int) -> tuple[float, float]:
    """The exact binomial interval for ``told`` of ``n`` images told right; ``told`` may be
    fractional (every image told right by half its raters: n / 2 exactly, not rounded)."""
    alpha = 1 - CONFIDENCE
    low = 0.0 if told <= 0 else stats.beta.ppf(alpha / 2, told, n - told + 1)
    high = 1.0 if told >= n else stats.beta.ppf(1 - alpha / 2, told + 1, n - told)
    return float(low), float(high)


def consistency(pairs: Sequence[tuple[int, int]]) -> dict[str, Any]:
    """Agreement of a rater with themself on repeated items."""
    if not pairs:
        return {"n": 0, "exact_agreement": None, "mean_abs_difference": None}
    first, second = np.asarray(pairs, dtype=np.float64).T
    return {
        "n": len(pairs),
        "exact_agreement": float(np.mean(first == second)),
        "mean_abs_difference": float(np.mean(np.abs(first - second))),
    }


def inter_rater_alpha(ratings: dict[str, dict[int, int]], n_items: int) -> float | None:
    """Ordinal Krippendorff's alpha over raters x items (missing ratings allowed);
    None when it is undefined (fewer than two raters, or a single score value used)."""
    if len(ratings) < 2:
        return None
    matrix = np.full((len(ratings), n_items), np.nan)
    for row, by_item in enumerate(ratings.values()):
        for item, score in by_item.items():
            matrix[row, item] = score
    paired = np.sum(~np.isnan(matrix), axis=0) >= 2
    if len(np.unique(matrix[:, paired][~np.isnan(matrix[:, paired])])) < 2:
        return None
    value = krippendorff.alpha(
        reliability_data=matrix, level_of_measurement="ordinal", value_domain=[1, 2, 3, 4, 5]
    )
    return None if math.isnan(value) else float(value)


def _joining(rater: str) -> tuple[int, str]:
    digits = rater.lstrip("R")
    return (int(digits), rater) if digits.isdigit() else (-1, rater)


def summarize(items: Sequence[Item], answers: Sequence[Answer]) -> dict[str, Any]:
    """The full results: overall and per-rater MOS by source, detection, reliability."""
    first: dict[str, dict[int, Answer]] = defaultdict(dict)
    repeats: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for answer in sorted(answers, key=lambda a: (a.rater, a.position)):
        seen = first[answer.rater]
        if answer.item in seen:
            repeats[answer.rater].append((seen[answer.item].score, answer.score))
        else:
            seen[answer.item] = answer

    def block(chosen: list[Answer]) -> dict[str, Any]:
        return {
            "mos": {
                source: mos([a.score for a in chosen if items[a.item].source == source])
                for source in SOURCES
            },
            "detection": detection(
                [(a.guess, items[a.item].source) for a in chosen if a.guess is not None]
            ),
        }

    by_image: dict[int, list[Answer]] = defaultdict(list)
    for by_item in first.values():
        for item, answer in by_item.items():
            by_image[item].append(answer)
    return {
        "raters": len(first),
        "items": len(items),
        "answers": len(answers),
        "overall": {
            "mos": {
                source: pooled_mos(
                    [
                        [a.score for a in rated]
                        for i, rated in by_image.items()
                        if items[i].source == source
                    ]
                )
                for source in SOURCES
            },
            "detection": pooled_detection(
                [
                    (items[i].source, [a.guess for a in rated if a.guess is not None])
                    for i, rated in sorted(by_image.items())
                ]
            ),
            "intra_rater": consistency([p for pairs in repeats.values() for p in pairs]),
            "inter_rater_alpha_ordinal": inter_rater_alpha(
                {r: {i: a.score for i, a in by_item.items()} for r, by_item in first.items()},
                len(items),
            ),
        },
        "per_rater": {
            rater: {
                **block(list(by_item.values())),
                "intra_rater": consistency(repeats[rater]),
            }
            # Joining order: "R1000" after "R999", which text order puts before "R101".
            for rater, by_item in sorted(first.items(), key=lambda pair: _joining(pair[0]))
        },
    }

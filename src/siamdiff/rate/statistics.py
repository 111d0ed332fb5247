"""MOS with confidence intervals, the Turing-test score, and rater reliability.

Every statistic except intra-rater consistency uses each rater's *first* rating of an
item; the repeated showings only measure how consistently a rater scores the same image.
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


def mos(scores: Sequence[float], confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Mean opinion score with a Student-t confidence interval (None below two scores)."""
    values = np.asarray(scores, dtype=np.float64)
    n = int(values.size)
    if n == 0:
        return {"n": 0, "mean": None, "ci_low": None, "ci_high": None}
    mean = float(values.mean())
    if n < 2 or float(values.std()) == 0.0:
        low = high = mean if n >= 2 else None
    else:
        low, high = stats.t.interval(confidence, n - 1, loc=mean, scale=stats.sem(values))
        low, high = float(low), float(high)
    return {"n": n, "mean": mean, "ci_low": low, "ci_high": high}


def detection(guesses: Sequence[tuple[str, str]], confidence: float = CONFIDENCE) -> dict[str, Any]:
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
    ci = stats.binomtest(correct, n, 0.5).proportion_ci(confidence)
    hit_rates = [row[i] / sum(row) for i, row in enumerate(table) if sum(row)]
    return {
        "n": n,
        "accuracy": correct / n,
        "ci_low": float(ci.low),
        "ci_high": float(ci.high),
        "balanced_accuracy": float(np.mean(hit_rates)) if len(hit_rates) == 2 else None,
        "p_value": float(stats.fisher_exact(table).pvalue),
    }


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

    everything = [a for by_item in first.values() for a in by_item.values()]
    return {
        "raters": len(first),
        "items": len(items),
        "answers": len(answers),
        "overall": {
            **block(everything),
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
            for rater, by_item in sorted(first.items())
        },
    }

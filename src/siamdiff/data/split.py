"""Group-disjoint train/val/test split from a hash of the group name."""

from __future__ import annotations

import hashlib
import math

from siamdiff.errors import SiamdiffError

DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)


def split_unit(dataset: str, group: str) -> float:
    """The group's position in [0, 1): the first 8 bytes of SHA-256("dataset/group") / 2**64."""
    digest = hashlib.sha256(f"{dataset}/{group}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(
    dataset: str, group: str, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
) -> str:
    """The split ("train", "val" or "test") of every image of ``group`` in ``dataset``.

    The answer depends on the two strings and ``fractions`` only: not on file order, the
    other groups, the machine or the Python version (SHA-256, then IEEE-754 comparisons).
    Every image of a group (a patient, a video sequence) lands in the same split, so the
    split is group-disjoint. With few groups the realised fractions can differ a lot from
    ``fractions``; the hash is never tuned to fix that.
    """
    if len(fractions) != 3 or min(fractions) < 0 or not math.isclose(sum(fractions), 1.0):
        raise SiamdiffError(f"split fractions must be three numbers >= 0 summing to 1: {fractions}")
    u = split_unit(dataset, group)
    if u < fractions[0]:
        return "train"
    if u < fractions[0] + fractions[1]:
        return "val"
    return "test"

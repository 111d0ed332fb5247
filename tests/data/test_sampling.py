"""Balanced batch sampler: composition, determinism, DDP sharding, degenerate pools."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from siamdiff.data.sampling import BalancedBatchSampler
from siamdiff.errors import SiamdiffError

# 30 frames, distinct coverages: 15 above the median, 15 at or below it.
COVERAGES = list(np.random.default_rng(0).permutation(np.linspace(0.01, 0.3, 30)))
ABOVE = {i for i, c in enumerate(COVERAGES) if c > np.median(COVERAGES)}


def test_every_batch_is_two_large_lesions_to_one_small() -> None:
    sampler = BalancedBatchSampler(COVERAGES, batch_size=6)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 5
    for batch in batches:
        assert len(batch) == 6
        assert sum(i in ABOVE for i in batch) == 4


@pytest.mark.parametrize(("ratio", "batch_size", "above"), [((1, 1), 8, 4), ((3, 1), 8, 6)])
def test_ratio_is_configurable(ratio: tuple[int, int], batch_size: int, above: int) -> None:
    for batch in BalancedBatchSampler(COVERAGES, batch_size=batch_size, fg_ratio=ratio):
        assert sum(i in ABOVE for i in batch) == above


@pytest.mark.parametrize("batch_size", [1, 2, 4, 5])
def test_a_ratio_the_batch_cannot_hold_holds_over_consecutive_batches(batch_size: int) -> None:
    batches = list(BalancedBatchSampler(COVERAGES, batch_size=batch_size))
    large = [sum(i in ABOVE for i in batch) for batch in batches]
    exact = batch_size * 2 / 3
    assert all(math.floor(exact) <= n <= math.ceil(exact) for n in large)
    for end in range(1, len(batches) + 1):  # never more than one frame off 2:1 so far
        assert abs(sum(large[:end]) - end * exact) < 1


def test_without_balancing_every_frame_is_drawn_once_per_epoch() -> None:
    sampler = BalancedBatchSampler(COVERAGES, batch_size=6, fg_ratio=None)
    drawn = sorted(i for batch in sampler for i in batch)
    assert drawn == list(range(30))  # small lesions too, not only the upper half


def test_frames_at_the_median_count_as_small() -> None:
    coverages = [0.1, 0.2, 0.2, 0.2, 0.5, 0.6]  # median 0.2
    sampler = BalancedBatchSampler(coverages, batch_size=3)
    assert set(sampler.foreground) == {4, 5}
    assert set(sampler.background) == {0, 1, 2, 3}


def test_pools_are_used_evenly_within_an_epoch() -> None:
    batches = list(BalancedBatchSampler(COVERAGES, batch_size=6))
    counts = Counter(i for batch in batches for i in batch)
    large = [counts[i] for i in ABOVE]
    small = [counts[i] for i in set(range(30)) - ABOVE]
    # 20 large draws from 15 frames: each once or twice; 10 small draws: no repeat.
    assert set(large) <= {1, 2} and sum(large) == 20
    assert max(small) == 1 and sum(small) == 10


def test_same_seed_and_epoch_give_the_same_batches() -> None:
    a = BalancedBatchSampler(COVERAGES, batch_size=6, seed=3)
    b = BalancedBatchSampler(COVERAGES, batch_size=6, seed=3)
    assert list(a) == list(b) == list(a)
    a.set_epoch(1)
    assert list(a) != list(b)
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(BalancedBatchSampler(COVERAGES, batch_size=6, seed=4)) != list(b)


def test_ddp_ranks_are_disjoint_and_cover_the_global_batches() -> None:
    single = list(BalancedBatchSampler(COVERAGES, batch_size=3))  # 10 batches
    ranks = [
        list(BalancedBatchSampler(COVERAGES, batch_size=3, num_replicas=3, rank=r))
        for r in range(3)
    ]
    assert [len(r) for r in ranks] == [3, 3, 3]  # 10 // 3: equal lengths keep DDP in step
    # Rank r takes global batches r, r + 3, ...: together the first 9, each exactly once.
    interleaved = [ranks[r][k] for k in range(3) for r in range(3)]
    assert interleaved == single[:9]
    small = [i for rank in ranks for batch in rank for i in batch if i not in ABOVE]
    assert len(small) == len(set(small)) == 9  # no small-lesion frame on two ranks


def test_empty_pool_falls_back_to_the_other() -> None:
    same = [0.1] * 12  # all at the median: no "large" pool
    batches = list(BalancedBatchSampler(same, batch_size=4))
    assert len(batches) == 3 and all(len(b) == 4 for b in batches)
    assert sorted(i for b in batches for i in b) == list(range(12))


def test_drop_last_rounds_the_number_of_batches() -> None:
    assert len(BalancedBatchSampler(COVERAGES, batch_size=7)) == 4
    keep = BalancedBatchSampler(COVERAGES, batch_size=7, drop_last=False)
    assert len(keep) == 5 and all(len(b) == 7 for b in keep)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 31}, "30 frames give no batch of 31"),
        ({"batch_size": 6, "num_replicas": 6}, "for each of 6 process"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"batch_size": 6, "rank": 2, "num_replicas": 2}, "rank 2 is not in"),
        ({"batch_size": 6, "fg_ratio": (0, 0)}, "fg_ratio must be"),
    ],
)
def test_unusable_settings_are_one_line_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(SiamdiffError, match=message):
        BalancedBatchSampler(COVERAGES, **kwargs)


@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_a_frame_drawn_twice_is_two_keys_whatever_the_ranks_it_falls_to(ranks: int):
    """Keys (index, draw) count the draws of the whole epoch: counted per rank, the two draws
    of a large-lesion frame on two ranks were both draw 0, one augmentation twice."""
    coverages = list(np.linspace(0.0, 0.9, 40))
    every = [
        BalancedBatchSampler(coverages, 2, seed=5, num_replicas=ranks, rank=rank)
        for rank in range(ranks)
    ]
    keys = [key for sampler in every for batch in sampler.keyed_batches() for key in batch]
    assert len(keys) == len(set(keys))
    assert max(draw for _, draw in keys) >= 1  # the large lesions' pool is drawn again
    for sampler in every:  # the same frames as iterating, in the same batches
        assert [[i for i, _ in b] for b in sampler.keyed_batches()] == list(sampler)

"""Foreground/background balanced batches: large lesions and small ones in a fixed ratio."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from siamdiff.errors import SiamdiffError


def _pool_stream(rng: np.random.Generator, pool: np.ndarray, count: int) -> np.ndarray:
    """``count`` indices from ``pool``: successive fresh permutations, so each index is used
    once per pass (the larger-share pool is oversampled, the other undersampled)."""
    if count == 0:
        return pool[:0]
    passes = math.ceil(count / len(pool))
    return np.concatenate([rng.permutation(pool) for _ in range(passes)])[:count]


class BalancedBatchSampler(Sampler[list[int]]):
    """Batches mixing frames above the median lesion coverage with the rest, ``fg_ratio`` to 1.

    Frames at the median go to the lower pool; if a pool is empty the other fills the
    batch. ``fg_ratio=None`` draws every batch from one pool of all frames (no balancing).
    When a batch cannot hold the ratio exactly (batch 4 at 2:1), the large-lesion count of
    batch ``b`` is ``floor((b+1) k) - floor(b k)`` with ``k = batch_size * share``, so
    consecutive batches hold it on average (2:1 in 2-3-3-2-3-3... of 4, not 3:1 in each).
    Each pool is reshuffled every epoch by a generator seeded with ``(seed, epoch)``, so
    every rank builds the same global batch list and rank ``r`` takes batches ``r, r + R,
    ...``: ranks never share a batch. Pools are cycled, so every batch is full;
    ``drop_last=False`` only rounds the number of batches up instead of down.
    """

    def __init__(
        self,
        coverages: Sequence[float],
        batch_size: int,
        fg_ratio: tuple[int, int] | None = (2, 1),
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = True,
    ) -> None:
        if batch_size < 1:
            raise SiamdiffError(f"batch_size must be >= 1, got {batch_size}")
        if fg_ratio is not None and (len(fg_ratio) != 2 or min(fg_ratio) < 0 or sum(fg_ratio) <= 0):
            raise SiamdiffError(f"fg_ratio must be two non-negative weights, got {fg_ratio}")
        if not 0 <= rank < num_replicas:
            raise SiamdiffError(f"rank {rank} is not in [0, {num_replicas})")
        values = np.asarray(coverages, dtype=np.float64)
        if fg_ratio is None:
            self.foreground, self.background = np.arange(len(values)), np.arange(0)
            fg_ratio = (1, 0)
        else:
            median = np.median(values) if len(values) else 0.0
            self.foreground = np.flatnonzero(values > median)
            self.background = np.flatnonzero(values <= median)
        # Large-lesion frames among the first b * batch_size: b * _fg_weight // _weights.
        self._fg_weight, self._weights = batch_size * fg_ratio[0], sum(fg_ratio)
        if len(self.foreground) == 0:
            self._fg_weight = 0
        elif len(self.background) == 0:
            self._fg_weight = batch_size * self._weights

        self._frames, self._drop_last, self.batch_size = len(values), drop_last, batch_size
        self._length = self.batches_per_rank(num_replicas)
        if self._length == 0:
            raise SiamdiffError(
                f"{len(values)} frames give no batch of {batch_size} "
                f"for each of {num_replicas} process(es)"
            )
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0

    def batches_per_rank(self, num_replicas: int) -> int:
        """A rank's batches per epoch, with ``num_replicas`` ranks (the global count of
        batches rounded to a multiple of them: an epoch's length depends on it)."""
        rounding = math.floor if self._drop_last else math.ceil
        return rounding(rounding(self._frames / self.batch_size) / num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self._length

    def _large_before(self, batch: int) -> int:
        """Large-lesion frames in the batches before ``batch``."""
        return batch * self._fg_weight // self._weights

    def _global_batches(self) -> list[list[int]]:
        """Every rank's batches of this epoch, in order (rank ``r`` takes ``r, r + R, ...``)."""
        # One generator per pool: batch j is then the same whatever the number of batches.
        fg_rng, bg_rng = np.random.default_rng((self.seed, self.epoch)).spawn(2)
        n_batches = self._length * self.num_replicas
        n_fg = self._large_before(n_batches)
        foreground = _pool_stream(fg_rng, self.foreground, n_fg)
        background = _pool_stream(bg_rng, self.background, n_batches * self.batch_size - n_fg)
        batches = []
        for b in range(n_batches):
            fg_start, fg_end = self._large_before(b), self._large_before(b + 1)
            bg_start = b * self.batch_size - fg_start
            bg_end = (b + 1) * self.batch_size - fg_end
            batch = [*foreground[fg_start:fg_end], *background[bg_start:bg_end]]
            batches.append([int(i) for i in batch])
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._global_batches()[self.rank :: self.num_replicas]

    def keyed_batches(self) -> list[list[tuple[int, int]]]:
        """This rank's batches, each index paired with how many times the epoch drew it
        before, over every rank's batches: a frame the larger pool draws twice gets two
        augmentations (:class:`~siamdiff.data.dataset.SeededAugmentation`), also when the two
        draws fall to two ranks."""
        drawn: Counter[int] = Counter()
        keyed = []
        for batch in self._global_batches():
            keyed.append([])
            for index in batch:  # a batch spanning two passes of a pool may hold one twice
                keyed[-1].append((index, drawn[index]))
                drawn[index] += 1
        return keyed[self.rank :: self.num_replicas]

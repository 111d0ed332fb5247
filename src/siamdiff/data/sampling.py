"""Foreground/background balanced batches: large lesions and small ones in a fixed ratio."""

from __future__ import annotations

import math
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
    batch. Each pool is reshuffled every epoch by a generator seeded with ``(seed,
    epoch)``, so every rank builds the same global batch list and rank ``r`` takes batches
    ``r, r + R, ...``: ranks never share a batch. Pools are cycled, so every batch is full;
    ``drop_last=False`` only rounds the number of batches up instead of down.
    """

    def __init__(
        self,
        coverages: Sequence[float],
        batch_size: int,
        fg_ratio: tuple[int, int] = (2, 1),
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = True,
    ) -> None:
        if batch_size < 1:
            raise SiamdiffError(f"batch_size must be >= 1, got {batch_size}")
        if len(fg_ratio) != 2 or min(fg_ratio) < 0 or sum(fg_ratio) <= 0:
            raise SiamdiffError(f"fg_ratio must be two non-negative weights, got {fg_ratio}")
        if not 0 <= rank < num_replicas:
            raise SiamdiffError(f"rank {rank} is not in [0, {num_replicas})")
        values = np.asarray(coverages, dtype=np.float64)
        median = np.median(values) if len(values) else 0.0
        self.foreground = np.flatnonzero(values > median)
        self.background = np.flatnonzero(values <= median)

        n_foreground = round(batch_size * fg_ratio[0] / sum(fg_ratio))
        if len(self.foreground) == 0:
            n_foreground = 0
        elif len(self.background) == 0:
            n_foreground = batch_size
        self.per_batch = (n_foreground, batch_size - n_foreground)

        rounding = math.floor if drop_last else math.ceil
        self._length = rounding(rounding(len(values) / batch_size) / num_replicas)
        if self._length == 0:
            raise SiamdiffError(
                f"{len(values)} frames give no batch of {batch_size} "
                f"for each of {num_replicas} process(es)"
            )
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[list[int]]:
        # One generator per pool: batch j is then the same whatever the number of batches.
        fg_rng, bg_rng = np.random.default_rng((self.seed, self.epoch)).spawn(2)
        n_batches = self._length * self.num_replicas
        n_fg, n_bg = self.per_batch
        foreground = _pool_stream(fg_rng, self.foreground, n_batches * n_fg)
        background = _pool_stream(bg_rng, self.background, n_batches * n_bg)
        for b in range(self.rank, n_batches, self.num_replicas):
            batch = [*foreground[b * n_fg : (b + 1) * n_fg], *background[b * n_bg : (b + 1) * n_bg]]
            yield [int(i) for i in batch]

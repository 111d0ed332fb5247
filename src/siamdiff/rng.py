"""Seeding torch's generators for a while, restoring them after."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def cpu_seeded(seed: int) -> Iterator[None]:
    """torch's CPU generator seeded with ``seed`` inside, restored after. CUDA's generators
    are not touched: ``torch.manual_seed`` would reseed every GPU's for good, and all ranks of
    a run would then draw the same diffusion noise, whatever ``seed`` each was given."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


@contextmanager
def all_seeded(seed: int) -> Iterator[None]:
    """Every torch generator (CPU and each GPU's) seeded with ``seed`` inside, all restored
    after: for work whose GPU draws (dropout) must follow the seed too."""
    gpus = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=gpus):
        torch.manual_seed(seed)
        yield

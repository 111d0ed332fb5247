"""Seeding torch's CPU generator for a while, leaving every other one alone."""

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

"""Fixtures for the data tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def single_torch_thread() -> Iterator[None]:
    """One intra-op thread, as in a DataLoader worker: on tiny tensors thread hand-offs
    cost more than the work, badly so on a loaded 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

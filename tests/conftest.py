"""Shared fixtures: the real data in ../shared when present, tiny synthetic data always."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from siamdiff.data.phantom import make_phantom_dataset
from siamdiff.data.prepare import prepare
from tests.helpers import PHANTOM_SIZE

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SIAMDIFF_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session", autouse=True)
def single_torch_thread() -> None:
    """One intra-op thread for the whole suite: the tests' tensors are tiny, so thread
    hand-offs cost more than the work, and badly so on a loaded 2-core machine."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (real Kvasir-SEG / CVC-ClinicDB); the test skips when it is absent."""
    path = SHARED / "data"
    if not (path / "Kvasir-SEG").is_dir():
        pytest.skip(f"real data not found at {path}")
    return path


@pytest.fixture(scope="session")
def shared_weights() -> Path:
    """``../shared/weights`` (TAEF2); the test skips when it is absent."""
    path = SHARED / "weights"
    if not (path / "taef2" / "taef2_encoder.pth").is_file():
        pytest.skip(f"pretrained weights not found at {path}")
    return path


@pytest.fixture(scope="session")
def phantom_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared phantom dataset (24 pairs, 6 groups) at the tiny runs' resolution."""
    root = tmp_path_factory.mktemp("phantom")
    raw = make_phantom_dataset(root / "raw", n=24, size=64, groups=6, seed=1)
    prepare([("folder", raw)], root / "data", size=PHANTOM_SIZE, workers=1, progress=False)
    return root / "data"

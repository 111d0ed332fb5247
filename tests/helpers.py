"""Small builders shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from siamdiff.config import load_config

PHANTOM_SIZE = 32  # training resolution of the tiny test runs (DHI needs a multiple of 8)


def tiny_config(data: Path, run_dir: Path, *overrides: str) -> DictConfig:
    """The built-in tiny config, shrunk to a few-second CPU run on phantom data."""
    return load_config(
        "tiny",
        [
            f"data.root={data}",
            f"run_dir={run_dir}",
            f"data.transforms.size={PHANTOM_SIZE}",
            "train.batch_size=2",
            "train.sample_count=2",
            "train.sample_steps=2",
            "train.log_every=1",
            *overrides,
        ],
    )

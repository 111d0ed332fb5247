"""A tiny rating study: 4 real and 4 synthetic phantom images, 2 of them shown twice."""

from __future__ import annotations

from pathlib import Path

import pytest

from siamdiff.rate.study import Study, build_study
from tests.evaluate.conftest import make_synthetic

PER_SOURCE = 4
REPEATS = 2


@pytest.fixture(scope="session")
def synthetic_data(phantom_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic(phantom_data, tmp_path_factory.mktemp("rate-syn") / "syn", per_mask=1)


@pytest.fixture
def study(synthetic_data: Path, phantom_data: Path, tmp_path: Path) -> Study:
    return build_study(
        synthetic_data,
        phantom_data,
        tmp_path / "study",
        per_source=PER_SOURCE,
        repeats=REPEATS,
        seed=3,
        overlay=True,
    )

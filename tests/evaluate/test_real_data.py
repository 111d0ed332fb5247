"""The whole evaluation on real Kvasir-SEG frames (skipped when ../shared/data is absent)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from siamdiff.data.prepare import prepare
from siamdiff.evaluate.metrics import evaluate, format_metrics
from siamdiff.evaluate.segmenter import train_segmenter

from .conftest import SIZE, make_synthetic

FRAMES = 40  # the first 40 Kvasir-SEG frames by name: 36 train, 1 val, 3 test


@pytest.fixture(scope="module")
def kvasir_subset(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = shared_data / "Kvasir-SEG"
    raw = tmp_path_factory.mktemp("kvasir") / "Kvasir-SEG"
    for folder in ("images", "masks"):
        (raw / folder).mkdir(parents=True)
    for image in sorted((source / "images").iterdir())[:FRAMES]:
        (raw / "images" / image.name).symlink_to(image)
        (raw / "masks" / image.name).symlink_to(source / "masks" / image.name)
    out = raw.parent / "data"
    prepare([("kvasir-seg", raw)], out, size=SIZE, workers=1, progress=False)
    return out


def test_evaluate_on_real_frames(kvasir_subset: Path, tmp_path: Path) -> None:
    segmenter = train_segmenter(
        kvasir_subset, tmp_path / "seg", size=SIZE, epochs=1, batch_size=6, progress=False
    )
    syn = make_synthetic(kvasir_subset, tmp_path / "syn", per_mask=2, noise=25.0)
    metrics = evaluate(
        kvasir_subset,
        syn,
        tmp_path / "metrics.json",
        segmenter_dir=segmenter,
        kid_subsets=10,
        progress=False,
    )
    assert metrics["real"]["train_images"] == 36
    assert metrics["synthetic"] == {
        "root": str(syn),
        "images": 72,
        "masks": 36,
        "resolution": None,
        "crop": "crop",
    }
    assert metrics["segmenter"]["trained_on_this_real_train_split"] is True
    assert metrics["segmenter"]["real_test"]["images"] == 3
    assert 0.0 <= metrics["mask_fidelity"]["mdice"] <= 1.0
    assert metrics["fd_seg"]["value"] > 0 and np.isfinite(metrics["kid_seg"]["mean"])
    assert metrics["diversity"]["ms_ssim"]["pairs"] == 36
    assert all(w > 0 for w in metrics["pixel_stats"]["wasserstein_rgb"])
    assert "FD-seg" in format_metrics(metrics)

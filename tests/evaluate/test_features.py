"""FD, KID, CMMD and feature extraction on known feature sets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import linalg
from torch.utils.data import DataLoader

from siamdiff.evaluate.features import (
    cmmd,
    extract_features,
    frechet_distance,
    kernel_inception_distance,
)
from siamdiff.evaluate.metrics import summary_rows


def gaussian(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(99).standard_normal((d, d)) / np.sqrt(d)
    return rng.standard_normal((n, d)) @ mixing + shift


@pytest.mark.parametrize(("n", "d"), [(200, 16), (30, 64)])  # full rank, rank-deficient
def test_fd_of_a_set_with_itself_is_zero(n: int, d: int) -> None:
    x = gaussian(n, d, seed=0) * 5 + 3
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9 * np.trace(np.cov(x.T)))


def test_fd_grows_with_added_noise() -> None:
    x = gaussian(300, 32, seed=0)
    noise = np.random.default_rng(1).standard_normal(x.shape)
    distances = [frechet_distance(x, x + level * noise) for level in (0.05, 0.2, 0.5, 1.0)]
    assert 0 < distances[0] < distances[1] < distances[2] < distances[3]


def test_fd_matches_the_closed_form() -> None:
    # 1-D: (mu_a - mu_b)^2 + (sigma_a - sigma_b)^2 exactly.
    a, b = gaussian(100, 1, seed=0) * 2 + 1, gaussian(80, 1, seed=1) * 0.5 - 1
    expected = (a.mean() - b.mean()) ** 2 + (a.std(ddof=1) - b.std(ddof=1)) ** 2
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-10)
    # Full rank, d > 1: the usual sqrtm formula, whose imaginary residue is negligible here.
    a, b = gaussian(400, 12, seed=2), gaussian(300, 12, seed=3, shift=0.4) * 1.3
    sa, sb = np.cov(a.T), np.cov(b.T)
    reference = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(
        sa + sb - 2 * linalg.sqrtm(sa @ sb).real
    )
    assert frechet_distance(a, b) == pytest.approx(reference, rel=1e-8)


def test_fd_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="N >= 2"):
        frechet_distance(np.zeros((1, 4)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="feature sizes differ"):
        frechet_distance(np.zeros((3, 4)), np.zeros((3, 5)))


def biased_mmd(x: np.ndarray, y: np.ndarray) -> float:
    """The V-statistic with KID's kernel: biased upwards for equal distributions."""

    def kernel(p: np.ndarray, q: np.ndarray) -> np.ndarray:
        return (p @ q.T / p.shape[1] + 1) ** 3

    return float(kernel(x, x).mean() + kernel(y, y).mean() - 2 * kernel(x, y).mean())


def test_kid_is_unbiased_for_two_samples_of_one_distribution() -> None:
    x, y = gaussian(200, 8, seed=0), gaussian(200, 8, seed=1)
    mean, std = kernel_inception_distance(x, y, subsets=50, subset_size=50, seed=0)
    biased = np.mean([biased_mmd(x[i : i + 50], y[i : i + 50]) for i in range(0, 200, 50)])
    assert abs(mean) < 0.1 * biased
    assert std > 0
    shifted, _ = kernel_inception_distance(x, y + 1.0, subsets=50, subset_size=50, seed=0)
    assert shifted > 20 * abs(mean)


def test_kid_is_deterministic_for_a_seed_and_caps_the_subset_size() -> None:
    x, y = gaussian(40, 8, seed=0), gaussian(30, 8, seed=1, shift=0.3)
    first = kernel_inception_distance(x, y, subsets=10, subset_size=1000, seed=3)
    assert first == kernel_inception_distance(x, y, subsets=10, subset_size=1000, seed=3)
    assert first == kernel_inception_distance(x, y, subsets=10, subset_size=30, seed=3)  # cap
    assert first != kernel_inception_distance(x, y, subsets=10, subset_size=20, seed=3)
    assert first != kernel_inception_distance(x, y, subsets=10, subset_size=30, seed=4)


def test_kid_of_whole_sets_has_no_std() -> None:
    """30 and 30 images at subset size 1000: every subset is both whole sets, std 0 exactly,
    which a report would print as an exact KID."""
    x, y = gaussian(30, 8, seed=0), gaussian(30, 8, seed=1)
    mean, std = kernel_inception_distance(x, y, subsets=10, subset_size=1000, seed=0)
    assert np.isfinite(mean) and std is None
    row = dict(summary_rows({"kid_seg": {"available": True, "mean": mean, "std": std}}))
    assert row["KID-seg (lower is better)"] == f"{mean:.4f} (whole sets, no subset spread)"
    # One subset has no spread either; subsets of one image have no estimate (NaN in JSON).
    mean, std = kernel_inception_distance(x, y, subsets=1, subset_size=10, seed=0)
    one = {"available": True, "mean": mean, "std": std, "subsets": 1}
    row = dict(summary_rows({"kid_seg": one}))
    assert row["KID-seg (lower is better)"] == f"{mean:.4f} (one subset, no subset spread)"
    for subsets, size in ((0, 10), (5, 1)):
        with pytest.raises(ValueError, match="KID needs subsets >= 1 of size >= 2"):
            kernel_inception_distance(x, y, subsets=subsets, subset_size=size)


def test_cmmd_is_zero_on_equal_sets_and_ignores_embedding_norms() -> None:
    x, y = gaussian(50, 16, seed=0), gaussian(60, 16, seed=1, shift=0.5)
    assert cmmd(x, x) == pytest.approx(0.0, abs=1e-12)
    assert cmmd(x, y) > 0
    assert cmmd(3 * x, y) == pytest.approx(cmmd(x, y), rel=1e-9)
    assert cmmd(x, y + 0.5) > cmmd(x, y)  # further along the same shift direction


def test_extract_features_keeps_order_for_datasets_and_loaders() -> None:
    images = torch.arange(5 * 3 * 4 * 4, dtype=torch.float32).reshape(5, 3, 4, 4)

    def mean_colour(batch: torch.Tensor) -> torch.Tensor:
        return batch.mean(dim=(2, 3))

    expected = images.mean(dim=(2, 3)).numpy()
    as_dicts = [{"image": image, "meta": {"id": str(i)}} for i, image in enumerate(images)]
    np.testing.assert_array_equal(extract_features(mean_colour, as_dicts, batch_size=2), expected)
    loader = DataLoader(images, batch_size=3)  # bare tensors, batched by the caller
    np.testing.assert_array_equal(extract_features(mean_colour, loader), expected)

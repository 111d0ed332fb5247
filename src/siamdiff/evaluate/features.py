"""Distances between two sets of feature vectors, for any feature extractor.

The same three functions serve the domain metrics (FD-seg / KID-seg on the pooled
features of siamdiff's own polyp segmenter) and the standard ones (Inception FID / KID on
2048-d pool features, CMMD on CLIP embeddings): only the features change.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from siamdiff.errors import SiamdiffError


def _as_2d(features: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2 or len(array) < 2:
        raise ValueError(f"{name} must be an N x D array with N >= 2, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise SiamdiffError(
            "features are not finite: the feature network (a segmenter that diverged?) "
            "outputs NaN/Inf; retrain it"
        )
    return array


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (Heusel et al., 2017).

    ``d² = |μa - μb|² + tr Σa + tr Σb - 2 tr (Σa Σb)^½``. ``scipy.linalg.sqrtm(Σa Σb)`` of
    the non-symmetric product returns complex residue (and is unstable for the
    rank-deficient covariances of fewer samples than dimensions). The cross term is taken
    from the centred features A, B instead: the nonzero eigenvalues of ``Σa Σb`` are the
    squared singular values of ``A Bᵀ / sqrt((na - 1)(nb - 1))``, so ``tr (Σa Σb)^½`` is its
    nuclear norm: real and >= 0 by construction, no covariance is ever formed, and
    FD(X, X) is 0 up to rounding. Thin QR factors shrink ``A Bᵀ`` to at most D x D
    without changing its singular values.
    """
    a, b = _as_2d(feats_a, "feats_a"), _as_2d(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} vs {b.shape[1]}")
    centred_a, centred_b = a - a.mean(axis=0), b - b.mean(axis=0)
    scale_a, scale_b = len(a) - 1, len(b) - 1
    r_a, r_b = np.linalg.qr(centred_a, mode="r"), np.linalg.qr(centred_b, mode="r")
    cross = np.linalg.svd(r_a @ r_b.T, compute_uv=False).sum() / np.sqrt(scale_a * scale_b)
    mean_term = np.sum((a.mean(axis=0) - b.mean(axis=0)) ** 2)
    traces = np.sum(centred_a**2) / scale_a + np.sum(centred_b**2) / scale_b
    # Rounding can leave -1e-12 where the sets are equal; a distance is never negative.
    return max(0.0, float(mean_term + traces - 2.0 * cross))


def kernel_inception_distance(
    feats_a: np.ndarray,
    feats_b: np.ndarray,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float | None]:
    """KID (Bińkowski et al., "Demystifying MMD GANs", ICLR 2018): mean and std over
    ``subsets`` random subsets of the unbiased MMD² with the cubic polynomial kernel
    ``k(x, y) = (x·y / d + 1)³``.

    Computed by torch-fidelity's ``kid_features_to_metric`` (the reference implementation
    behind torchmetrics' KID). The estimator is unbiased, so two samples of one distribution
    give a mean near 0 and may give a slightly negative one. ``subset_size`` is capped at the
    smaller set: the expectation does not depend on it, only the spread does. The std is
    None when every subset is both whole sets, or there is one subset (its 0 would claim an
    exact value).
    """
    if subsets < 1 or subset_size < 2:  # the unbiased MMD of one image divides by zero
        raise ValueError(f"KID needs subsets >= 1 of size >= 2, got {subsets} of {subset_size}")
    from torch_fidelity.metric_kid import (
        KEY_METRIC_KID_MEAN,
        KEY_METRIC_KID_STD,
        kid_features_to_metric,
    )

    a, b = _as_2d(feats_a, "feats_a"), _as_2d(feats_b, "feats_b")
    size = min(subset_size, len(a), len(b))
    result = kid_features_to_metric(
        torch.from_numpy(a),
        torch.from_numpy(b),
        kid_subsets=subsets,
        kid_subset_size=size,
        rng_seed=seed,
        verbose=False,
    )
    spread = subsets > 1 and not size == len(a) == len(b)
    return result[KEY_METRIC_KID_MEAN], result[KEY_METRIC_KID_STD] if spread else None


def cmmd(feats_a: np.ndarray, feats_b: np.ndarray, sigma: float = 10.0) -> float:
    """CMMD (Jayasumana et al., "Rethinking FID", CVPR 2024): MMD² with a Gaussian kernel of
    bandwidth ``sigma`` between L2-normalised CLIP embeddings, times 1000.

    Same estimator as the authors' code (google-research/cmmd, ``distance.py``): the
    plain V-statistic, diagonal included, which needs no Gaussian assumption.
    """
    a, b = (_as_2d(f, name) for f, name in ((feats_a, "feats_a"), (feats_b, "feats_b")))
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)

    def mean_kernel(x: np.ndarray, y: np.ndarray) -> float:
        squared = (x**2).sum(1)[:, None] + (y**2).sum(1)[None, :] - 2.0 * x @ y.T
        return float(np.exp(-np.clip(squared, 0.0, None) / (2.0 * sigma**2)).mean())

    return 1000.0 * (mean_kernel(a, a) + mean_kernel(b, b) - 2.0 * mean_kernel(a, b))


def extract_features(
    model_fn: Callable[[torch.Tensor], torch.Tensor],
    data: Dataset | DataLoader,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    *,
    workers: int = 0,
    progress: bool = False,
    desc: str = "features",
) -> np.ndarray:
    """``model_fn`` applied to every image of ``data``, in order: an N x D float32 array.

    ``data`` yields samples ``{"image": tensor, ...}`` (siamdiff datasets) or bare image
    tensors; a Dataset is batched here without shuffling, a DataLoader is used as given.
    """
    loader = (
        data
        if isinstance(data, DataLoader)
        else DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=workers)
    )
    chunks = []
    with torch.inference_mode():
        for batch in tqdm(loader, desc=desc, unit="batch", disable=not progress, leave=False):
            images = batch["image"] if isinstance(batch, dict) else batch
            features = model_fn(images.to(device))
            chunks.append(features.reshape(len(images), -1).float().cpu().numpy())
    return np.concatenate(chunks)

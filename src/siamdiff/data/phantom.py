"""Procedural "phantom" colonoscopy frames with one polyp each and its exact mask.

Demo and test data that needs no download: pinkish mucosa with low-frequency shading,
haustral folds around a dark lumen, scope vignetting and specular highlights; the polyp is
a redder, dome-shaded blob whose own pixels are the mask. NumPy only and deterministic for
a seed: frame ``i`` depends only on ``(seed, i)``, its group's look on ``(seed, group)``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from siamdiff.atomic import atomic_output_dir, atomic_save_png
from siamdiff.errors import SiamdiffError

COVERAGE_RANGE = (0.02, 0.30)
_MUCOSA = np.array([0.86, 0.50, 0.40])
_POLYP = np.array([0.80, 0.34, 0.28])
_LIGHT = np.array([-0.5, -0.6, 0.62])  # upper-left, towards the viewer


def smooth_noise(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """Zero-mean, unit-std periodic noise with features about ``scale`` pixels wide."""
    radius2 = np.fft.fftfreq(size)[:, None] ** 2 + np.fft.rfftfreq(size)[None, :] ** 2
    spectrum = np.fft.rfft2(rng.standard_normal((size, size))) * np.exp(-2 * radius2 * scale**2)
    noise = np.fft.irfft2(spectrum, s=(size, size))
    return (noise - noise.mean()) / (noise.std() + 1e-12)


def _polyp_mask(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Mask and dome height (0 at the rim, 1 at the top) of an irregular blob.

    The blob is an ellipse whose radius is perturbed by a few low harmonics; it is redrawn
    until its coverage lies in ``COVERAGE_RANGE``.
    """
    yy, xx = np.mgrid[0:size, 0:size] / size
    while True:
        coverage = rng.uniform(0.03, 0.25)
        aspect = rng.uniform(0.7, 1.4)
        radius = np.sqrt(coverage / np.pi)
        cy, cx = rng.uniform(0.25, 0.75, size=2)
        tilt = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u = (dx * np.cos(tilt) + dy * np.sin(tilt)) / (radius * aspect)
        v = (-dx * np.sin(tilt) + dy * np.cos(tilt)) * aspect / radius
        angle = np.arctan2(v, u)
        rim = np.ones_like(angle)
        for k in range(2, 6):
            rim += rng.uniform(0, 0.12 / (k - 1)) * np.cos(k * angle + rng.uniform(0, 2 * np.pi))
        rho = np.hypot(u, v) / rim
        mask = rho < 1
        if COVERAGE_RANGE[0] <= mask.mean() <= COVERAGE_RANGE[1]:
            return mask, np.sqrt(np.clip(1 - rho**2, 0, 1))


def _shade(height: np.ndarray, strength: float) -> np.ndarray:
    """Lambert shading of a height field lit by ``_LIGHT``."""
    gy, gx = np.gradient(height * strength)
    normal = np.stack([-gx, -gy, np.ones_like(height)])
    normal /= np.linalg.norm(normal, axis=0)
    return np.clip(np.tensordot(_LIGHT / np.linalg.norm(_LIGHT), normal, axes=1), 0, 1)


def _highlights(rng: np.random.Generator, size: int, where: np.ndarray, count: int) -> np.ndarray:
    """``count`` small specular spots at random pixels of ``where``."""
    yy, xx = np.mgrid[0:size, 0:size]
    spots = np.zeros((size, size))
    candidates = np.flatnonzero(where)
    for index in rng.choice(candidates, size=min(count, len(candidates)), replace=False):
        y, x = divmod(int(index), size)
        width = size * rng.uniform(0.004, 0.012)
        spots = np.maximum(spots, np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * width**2)))
    return spots


def render_phantom(
    frame_rng: np.random.Generator, group_rng: np.random.Generator, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """One frame: RGB uint8 (size x size x 3) and its mask (bool). ``group_rng`` sets the
    look shared by a group (tint, fold spacing, lumen side) and is consumed identically
    by every frame of the group."""
    tint = group_rng.normal(0, 0.04, size=3)
    fold_period = group_rng.uniform(0.22, 0.34)
    lumen = group_rng.uniform(0.2, 0.8, size=2) + frame_rng.normal(0, 0.05, size=2)

    yy, xx = np.mgrid[0:size, 0:size] / size
    # Haustral folds: rings around the lumen, wobbled by smooth noise.
    distance = np.hypot(yy - lumen[0], xx - lumen[1])
    wobble = 0.03 * smooth_noise(frame_rng, size, size / 6)
    folds = np.sin(np.pi * (distance + wobble) / fold_period) ** 4
    # One fine-bump field serves mucosa and polyp: they never share a pixel.
    bumps = smooth_noise(frame_rng, size, size / 36)
    mucosa_height = 0.5 * folds + 0.01 * bumps
    lumen_dark = 1 - 0.9 * np.exp(-(distance**2) / 0.015)
    texture = 0.05 * smooth_noise(frame_rng, size, size / 10)

    mask, dome = _polyp_mask(frame_rng, size)
    polyp_height = 1.2 * dome + 0.015 * bumps
    height = np.where(mask, polyp_height, mucosa_height)
    shading = 0.35 + 0.75 * _shade(height, strength=size / 8)

    colour = np.where(mask[..., None], _POLYP, _MUCOSA + tint)
    colour = colour * (1 + texture[..., None]) * (shading * lumen_dark)[..., None]

    # The scope lights the centre; the corners fall to black.
    radius = np.hypot(yy - 0.5, xx - 0.5) / 0.68
    vignette = np.clip(1 - radius**3, 0, 1)
    image = colour * vignette[..., None]

    gloss = _highlights(
        frame_rng, size, (height > 0.5) & (vignette > 0.5), frame_rng.integers(2, 7)
    )
    image = image + (1 - image) * gloss[..., None]
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8), mask


def make_phantom_dataset(
    out: Path, n: int = 32, size: int = 128, groups: int = 8, seed: int = 0, overwrite: bool = False
) -> Path:
    """Write ``n`` pairs ``phantom-p{g:02d}-{i:04d}.png`` + ``..._mask.png`` (0/255) to ``out``.

    Frames are split into ``groups`` contiguous groups (like video sequences), the folder
    layout that the generic folder reader parses as ``{dataset}-{group}-{frame}``.
    """
    out = Path(out)
    # A blob of 3-25% coverage needs a few pixels across; below that its redraw never ends.
    for name, value, least in (
        ("n", n, 1),
        ("size", size, 16),
        ("seed", seed, 0),
        ("groups", groups, 1),
    ):
        if value < least:
            raise SiamdiffError(f"phantom data needs {name} >= {least} (got {name}={value})")
    groups = min(groups, n)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        for i in range(n):
            group = i * groups // n
            image, mask = render_phantom(
                np.random.default_rng((seed, 0, i)), np.random.default_rng((seed, 1, group)), size
            )
            stem = f"phantom-p{group:02d}-{i:04d}"
            atomic_save_png(tmp / f"{stem}.png", image)
            atomic_save_png(tmp / f"{stem}_mask.png", mask.astype(np.uint8) * 255)
    return out

"""Paired transforms: the mask never drifts from the image, and each op does what it says."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from siamdiff.data.transforms import (
    PairedResize,
    SeparableElasticTransform,
    TransformConfig,
    build_transforms,
    lab_normalized_to_rgb,
    lesion_centre,
    rgb_to_lab_normalized,
)
from siamdiff.errors import SiamdiffError

SIZE = 48
# Every photometric and geometric op fires; the large alpha makes the elastic field move
# pixels by several pixels, so a drift between image and mask could not hide in it.
ALL_ON = TransformConfig(size=SIZE, photometric_p=1.0, geometric_p=1.0, elastic_alpha=300.0)
NO_GEOMETRY = dataclasses.replace(ALL_ON, rot90=False, hflip=False, elastic_alpha=0.0)


def ellipse(shape: tuple[int, int], centre: tuple[float, float], radii: tuple[float, float]):
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    return ((yy - centre[0]) / radii[0]) ** 2 + ((xx - centre[1]) / radii[1]) ** 2 <= 1


def red_is_mask_sample(mask: np.ndarray, seed: int = 0) -> dict:
    """An image whose red channel is the mask (255 / 0) and whose other channels are noise."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(*mask.shape, 3), dtype=np.uint8)
    image[..., 0] = mask * 255
    return {"image": image, "mask": mask, "meta": {"id": "x", "coverage": float(mask.mean())}}


@pytest.fixture
def lesion() -> np.ndarray:
    """A non-square frame with an off-centre, non-convex lesion (two overlapping ellipses)."""
    shape = (60, 84)
    return ellipse(shape, (28, 52), (12, 8)) | ellipse(shape, (36, 60), (6, 14))


def misaligned(out: dict) -> np.ndarray:
    """Pixels where the red channel clearly says one thing and the mask the other.

    The image is resampled with a blending filter (bilinear, antialiased resize) and the mask
    by nearest neighbour, so where an output pixel's source footprint straddles the lesion
    edge the red channel is a blend and either label is honest. Where the red channel is
    unambiguous (< 0.1 or > 0.9 in [0, 1]) every source pixel under the footprint has the
    same label, and so must the mask. Photometric jitter moves 0 and 1 by at most 0.05.
    """
    red = (out["image"][0].numpy() + 1) / 2
    mask = out["mask"][0].numpy() > 0.5
    assert ((red > 0.1) & (red < 0.9)).mean() < 0.1  # blends stay a thin rim
    return ((red > 0.9) & ~mask) | ((red < 0.1) & mask)


def test_alignment_check_catches_a_drift(lesion: np.ndarray) -> None:
    """The tolerance is tight enough to see a flip applied to the image alone."""
    out = build_transforms(TransformConfig(size=SIZE), train=False)(red_is_mask_sample(lesion))
    assert not misaligned(out).any()
    drifted = {**out, "image": out["image"].flip(-1)}
    assert misaligned(drifted).sum() > 50


@pytest.mark.parametrize(
    "cfg",
    [
        ALL_ON,
        dataclasses.replace(ALL_ON, crop="pad"),
        dataclasses.replace(NO_GEOMETRY, rot90=True),
        dataclasses.replace(NO_GEOMETRY, hflip=True),
        dataclasses.replace(NO_GEOMETRY, elastic_alpha=300.0),
        dataclasses.replace(NO_GEOMETRY, size=37),
    ],
    ids=["all-crop", "all-pad", "rot90", "hflip", "elastic", "crop-resize-odd"],
)
def test_mask_follows_the_image(cfg: TransformConfig, lesion: np.ndarray) -> None:
    transform = build_transforms(cfg, train=True)
    unmoved = build_transforms(cfg, train=False)(red_is_mask_sample(lesion))["mask"]
    moved = False
    for seed in range(12):
        torch.manual_seed(seed)
        out = transform(red_is_mask_sample(lesion, seed))
        assert not misaligned(out).any(), f"seed {seed}"
        assert set(out["mask"].unique().tolist()) == {0.0, 1.0}
        moved |= not torch.equal(out["mask"], unmoved)
    # The geometric ops really moved the pair (a pipeline doing nothing would pass above).
    assert moved == (cfg.rot90 or cfg.hflip or cfg.elastic_alpha > 0)


def test_output_types_ranges_and_meta(lesion: np.ndarray) -> None:
    sample = red_is_mask_sample(lesion)
    for cfg in (ALL_ON, dataclasses.replace(ALL_ON, colour="lab")):
        out = build_transforms(cfg, train=True)(sample)
        assert type(out["image"]) is torch.Tensor and type(out["mask"]) is torch.Tensor
        assert out["image"].shape == (3, SIZE, SIZE) and out["image"].dtype == torch.float32
        assert out["mask"].shape == (1, SIZE, SIZE) and out["mask"].dtype == torch.float32
        assert out["image"].min() >= -1.0 and out["image"][0].max() <= 1.0
        assert out["meta"] == sample["meta"]
    rgb = build_transforms(TransformConfig(size=SIZE), train=False)(sample)["image"]
    assert rgb.min() == -1.0 and rgb.max() == 1.0  # the full [-1, 1] range, not [0, 1]


def test_same_seed_same_sample(lesion: np.ndarray) -> None:
    transform = build_transforms(ALL_ON, train=True)
    outs = []
    for _ in range(2):
        torch.manual_seed(7)
        outs.append(transform(red_is_mask_sample(lesion)))
    assert torch.equal(outs[0]["image"], outs[1]["image"])
    assert torch.equal(outs[0]["mask"], outs[1]["mask"])


def test_lesion_centre_is_inside_a_non_convex_lesion() -> None:
    ring = ellipse((41, 41), (20, 20), (15, 15)) & ~ellipse((41, 41), (20, 20), (8, 8))
    ys, xs = np.nonzero(ring)
    assert not ring[round(ys.mean()), round(xs.mean())]  # the centroid misses it
    assert ring[lesion_centre(ring)]
    assert lesion_centre(np.zeros((30, 50), bool)) == (15, 25)


def centroid(mask: torch.Tensor) -> np.ndarray:
    ys, xs = np.nonzero(mask[0].numpy())
    return np.array([ys.mean(), xs.mean()])


@pytest.mark.parametrize("crop", ["crop", "pad"])
def test_lesion_is_centred_when_the_frame_allows(crop: str) -> None:
    # Crop: a 60x120 frame, the lesion at column 70 -> window columns 40..100.
    # Pad: the lesion at row 20 -> the frame sits in rows 40..100 of the 120 px square.
    where = (30, 70) if crop == "crop" else (20, 60)
    mask = ellipse((60, 120), where, (7, 7))
    cfg = TransformConfig(size=60, crop=crop)
    out = build_transforms(cfg, train=False)(red_is_mask_sample(mask))
    np.testing.assert_allclose(centroid(out["mask"]), [29.5, 29.5], atol=1.0)
    if crop == "pad":
        assert (out["image"][:, :19] == -1).all() and not out["mask"][:, :19].any()


def test_a_lesion_that_fits_the_window_is_never_cut() -> None:
    """A big blob at column 40 and a small one at column 80 of a 120 px wide frame: centred on
    the big one (columns 10..69) the window cut the small one off; both fit in 24..83."""
    mask = ellipse((60, 120), (30, 40), (12, 12)) | ellipse((60, 120), (30, 80), (3, 3))
    out = build_transforms(TransformConfig(size=60), train=False)(red_is_mask_sample(mask))
    assert out["mask"].sum() == mask.sum()
    # Wider than the window: centred on its widest part, as before.
    wide = ellipse((60, 120), (30, 40), (10, 10)) | ellipse((60, 120), (30, 110), (3, 3))
    out = build_transforms(TransformConfig(size=60), train=False)(red_is_mask_sample(wide))
    np.testing.assert_allclose(centroid(out["mask"]), [29.5, 29.5], atol=1.0)


def test_window_stays_inside_the_frame_for_a_lesion_at_the_edge() -> None:
    mask = ellipse((60, 120), (30, 110), (7, 7))
    image = np.zeros((60, 120, 3), np.uint8)
    image[:, :, 1] = np.arange(120, dtype=np.uint8)[None, :]  # green = column index
    out = build_transforms(TransformConfig(size=60), train=False)(
        {"image": image, "mask": mask, "meta": {}}
    )
    columns = ((out["image"][1, 0] + 1) / 2 * 255).round()
    assert columns[0] == 60 and columns[-1] == 119  # the rightmost 60 columns, no padding
    assert out["mask"].sum() == mask.sum()  # the whole lesion is in the window


def test_photometric_jitter_stays_in_range_and_leaves_the_mask_alone(lesion: np.ndarray) -> None:
    sample = red_is_mask_sample(lesion)
    reference = build_transforms(NO_GEOMETRY, train=False)(sample)
    before = (reference["image"] + 1) / 2
    gammas, contrasts = [], []
    for gamma, contrast, found in ((0.05, 0.0, gammas), (0.0, 0.03, contrasts)):
        cfg = dataclasses.replace(NO_GEOMETRY, gamma=gamma, contrast=contrast)
        transform = build_transforms(cfg, train=True)
        for seed in range(40):
            torch.manual_seed(seed)
            out = transform(sample)
            assert torch.equal(out["mask"], reference["mask"])
            after = (out["image"] + 1) / 2
            inside = (before > 0.05) & (before < 0.95) & (after > 0.01) & (after < 0.99)
            if gamma:
                ratio = after[inside].log() / before[inside].log()
                assert ratio.std() < 1e-3  # one gamma for the whole image
                found.append(ratio.mean().item())
            else:
                # ColorJitter: after = c * before + (1 - c) * grey mean, per channel pixel.
                slope = np.polyfit(before[inside].numpy(), after[inside].numpy(), 1)[0]
                found.append(slope)
    assert 0.95 - 1e-3 <= min(gammas) < 0.97 and 1.03 < max(gammas) <= 1.05 + 1e-3
    assert 0.97 - 1e-3 <= min(contrasts) < 0.985 and 1.015 < max(contrasts) <= 1.03 + 1e-3


def test_probability_zero_is_the_eval_pipeline(lesion: np.ndarray) -> None:
    sample = red_is_mask_sample(lesion)
    off = dataclasses.replace(ALL_ON, photometric_p=0.0, geometric_p=0.0)
    out = build_transforms(off, train=True)(sample)
    ref = build_transforms(off, train=False)(sample)
    assert torch.equal(out["image"], ref["image"]) and torch.equal(out["mask"], ref["mask"])


def test_separable_elastic_matches_torchvision() -> None:
    inputs = [tv_tensors.Image(torch.rand(3, 40, 56))]
    torch.manual_seed(3)
    expected = v2.ElasticTransform(alpha=10.0, sigma=5.0).make_params(inputs)["displacement"]
    torch.manual_seed(3)
    actual = SeparableElasticTransform(alpha=10.0, sigma=5.0).make_params(inputs)["displacement"]
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)
    assert expected.abs().max() > 1e-4


def test_lab_known_colours_and_round_trip() -> None:
    colours = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]).T[:, :, None]
    lab = rgb_to_lab_normalized(colours)
    scale = torch.tensor([50.0, 110.0, 110.0])[:, None, None]
    offset = torch.tensor([50.0, 0.0, 0.0])[:, None, None]
    expected = torch.tensor([[100.0, 0.0, 0.0], [0.0, 0.0, 0.0], [53.2408, 80.0925, 67.2032]])
    torch.testing.assert_close((lab * scale + offset)[..., 0].T, expected, atol=1e-3, rtol=0)

    rgb = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    lab = rgb_to_lab_normalized(rgb)
    assert lab.abs().max() <= 1.0
    torch.testing.assert_close(lab_normalized_to_rgb(lab), rgb, atol=1e-5, rtol=0)


def test_lab_pipeline_is_the_lab_of_the_rgb_pipeline(lesion: np.ndarray) -> None:
    sample = red_is_mask_sample(lesion)
    rgb = build_transforms(TransformConfig(size=SIZE), train=False)(sample)["image"]
    lab = build_transforms(TransformConfig(size=SIZE, colour="lab"), train=False)(sample)["image"]
    torch.testing.assert_close(lab, rgb_to_lab_normalized((rgb + 1) / 2))


def test_config_from_dict_and_its_errors() -> None:
    assert TransformConfig.from_dict({"size": 64, "crop": "pad"}) == TransformConfig(
        size=64, crop="pad"
    )
    with pytest.raises(SiamdiffError, match="unknown transform settings \\['sise'\\]"):
        TransformConfig.from_dict({"sise": 64})
    for bad in ({"crop": "zoom"}, {"photometric_p": 1.5}, {"size": "256"}, {"gamma": -0.1}):
        with pytest.raises(SiamdiffError, match=f"transform setting {next(iter(bad))} must be"):
            TransformConfig.from_dict(bad)


def test_real_frames_keep_their_lesion_centred(shared_data) -> None:
    from siamdiff.data.readers import load_mask, load_rgb

    transform = build_transforms(TransformConfig(size=64), train=False)
    checked = 0
    for name in sorted((shared_data / "Kvasir-SEG" / "masks").iterdir())[:6]:
        mask = load_mask(name)
        image = load_rgb(shared_data / "Kvasir-SEG" / "images" / name.name)
        out = transform({"image": image, "mask": mask, "meta": {}})
        assert out["mask"].any()
        # The window slides along the long axis; where it can centre the lesion, it does.
        axis = int(np.argmax(mask.shape))
        side, centre = min(mask.shape), lesion_centre(mask)[axis]
        if side / 2 <= centre <= mask.shape[axis] - side / 2:
            checked += 1
            out_centre = lesion_centre(out["mask"][0].numpy() > 0)[axis]
            assert abs(out_centre - 32) <= 3, name.name
    assert checked


@pytest.mark.parametrize("size", [8, 16])
def test_elastic_works_at_every_size_the_config_accepts(size: int) -> None:
    """sigma 5 means a 41-pixel blur kernel, whose reflect padding fails below 21 px."""
    config = dataclasses.replace(ALL_ON, size=size)
    sample = red_is_mask_sample(ellipse((24, 24), (12, 12), (5, 7)))
    out = build_transforms(config, train=True)(sample)
    assert out["image"].shape == (3, size, size) and out["mask"].shape == (1, size, size)


def test_a_resized_mask_stays_centred_on_its_image_pixels() -> None:
    """7 -> 3 px: the centre column (x = 3) lands on output column 1 with centre-aligned
    sampling; legacy NEAREST would take source column floor(7/3) = 2 and lose it."""
    from torchvision import tv_tensors

    column = torch.zeros(1, 7, 7, dtype=torch.uint8)
    column[..., 3] = 1
    resized = PairedResize(3)(tv_tensors.Mask(column))
    assert isinstance(resized, tv_tensors.Mask) and resized.dtype == torch.uint8
    assert resized[0].tolist() == [[0, 1, 0]] * 3

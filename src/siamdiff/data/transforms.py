"""Paired image-mask transforms: every geometric op moves the image and the mask together.

Built on ``torchvision.transforms.v2``: the image travels as ``tv_tensors.Image`` and the
mask as ``tv_tensors.Mask``, so each geometric op draws its parameters once and applies
them to both (masks with nearest interpolation) while photometric ops leave the mask
alone. Only what torchvision lacks is written here: the lesion-centred crop-or-pad, the
random 90° rotation and a random gamma. Every random draw uses torch's global RNG, so
``torch.manual_seed`` and DataLoader worker seeding make a run reproducible.

A sample is a dict ``{"image", "mask", "meta"}`` and optionally ``"hints"``. Input:
``image`` an RGB uint8 HxWx3 array (or PIL image), ``mask`` an HxW array (or PIL image)
whose nonzero pixels are lesion, ``hints`` a uint8 HxWxK array of extra hint maps;
``meta`` is passed through untouched. Output: ``image`` float32 3xSxS, ``mask`` float32
1xSxS in {0, 1}, ``hints`` float32 KxSxS in [0, 1] (K = 0 without hints). The hints
travel inside the mask tensor through every op, so they can never drift from it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from siamdiff.errors import SiamdiffError

Sample = dict[str, Any]

CROP_MODES = ("crop", "pad")
COLOURS = ("rgb", "lab")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _probability(value: Any) -> bool:
    return _number(value) and 0.0 <= value <= 1.0


_RULES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("size", lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "an integer > 0"),
    ("crop", lambda v: v in CROP_MODES, f"one of {CROP_MODES}"),
    ("colour", lambda v: v in COLOURS, f"one of {COLOURS}"),
    ("photometric_p", _probability, "a probability in [0, 1]"),
    ("gamma", lambda v: _number(v) and 0.0 <= v < 1.0, "in [0, 1)"),
    ("contrast", lambda v: _number(v) and 0.0 <= v < 1.0, "in [0, 1)"),
    ("geometric_p", _probability, "a probability in [0, 1]"),
    ("rot90", lambda v: isinstance(v, bool), "true or false"),
    ("hflip", lambda v: isinstance(v, bool), "true or false"),
    ("elastic_alpha", lambda v: _number(v) and v >= 0.0, "a number >= 0"),
    ("elastic_sigma", lambda v: _number(v) and v > 0.0, "a number > 0"),
)


@dataclass(frozen=True)
class TransformConfig:
    """Every knob of the data pipeline; the probabilities apply to each op independently.

    ``colour="lab"`` is for pixel-space models only: an RGB-pretrained VAE must get RGB.
    ``elastic_alpha``/``elastic_sigma`` follow torchvision's ``ElasticTransform``: the
    displacement in pixels is about ``alpha / 2`` times uniform noise blurred with ``sigma``;
    ``elastic_alpha=0`` disables the elastic op.
    """

    size: int = 256
    crop: str = "crop"
    colour: str = "rgb"
    photometric_p: float = 0.3
    gamma: float = 0.05
    contrast: float = 0.03
    geometric_p: float = 0.2
    rot90: bool = True
    hflip: bool = True
    elastic_alpha: float = 10.0
    elastic_sigma: float = 5.0

    def __post_init__(self) -> None:
        for name, valid, expected in _RULES:
            value = getattr(self, name)
            if not valid(value):
                raise SiamdiffError(f"transform setting {name} must be {expected}, got {value!r}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TransformConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SiamdiffError(f"unknown transform settings {unknown} (known: {sorted(known)})")
        return cls(**values)


# The fixed (eval) view's revision: latent caches name it, so a change of its pixels (2: the
# window holds a whole lesion that fits) is never served an older view's latents.
VIEW_VERSION = 2


def cached_view_name(config: TransformConfig) -> str:
    """The name a latent cache files the fixed view of ``config`` under."""
    return f"{config.crop}{config.size}-{VIEW_VERSION}"


def lesion_centre(mask: np.ndarray) -> tuple[int, int]:
    """(row, col) of the most interior lesion pixel; the image centre for an empty mask.

    The argmax of the distance transform lies inside the lesion even when the lesion is
    not convex, where a centroid may not. The mask is framed with background first so a
    lesion cut by the image border is centred on its visible part.
    """
    if not mask.any():
        return mask.shape[0] // 2, mask.shape[1] // 2
    distance = ndimage.distance_transform_edt(np.pad(mask != 0, 1))[1:-1, 1:-1]
    row, col = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return int(row), int(col)


def _window_start(centre: int, side: int, extent: int, lesion: tuple[int, int] | None) -> int:
    """Where a window of ``side`` starts on an axis of ``extent``: centred on ``centre``,
    moved as little as needed to hold the whole ``lesion`` (first, last) when it fits,
    then kept inside the image (``side <= extent``) or the image inside it (``side >=``).
    Negative starts (pad mode) make F.crop zero-pad."""
    start = centre - side // 2
    if lesion is not None and lesion[1] - lesion[0] < side:
        start = min(max(start, lesion[1] - side + 1), lesion[0])
    return int(np.clip(start, min(0, extent - side), max(0, extent - side)))


class LesionCentredCropOrPad(v2.Transform):
    """Square window centred on the lesion as far as the image allows, and holding all of
    it wherever it fits (an elongated lesion, or one in two parts, is not cut for the sake
    of centring its widest part).

    ``"crop"``: side ``min(H, W)``, the window kept inside the image. ``"pad"``: side
    ``max(H, W)``, the short side zero-padded; the image stays whole inside the window.
    """

    _transformed_types = (tv_tensors.Image, tv_tensors.Mask)

    def __init__(self, mode: str = "crop") -> None:
        super().__init__()
        if mode not in CROP_MODES:
            raise ValueError(f"mode must be one of {CROP_MODES}, got {mode!r}")
        self.mode = mode

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        mask = next(x for x in flat_inputs if isinstance(x, tv_tensors.Mask))
        height, width = mask.shape[-2:]
        lesion = mask.reshape(-1, height, width)[0].numpy() != 0  # hints ride behind
        centre = lesion_centre(lesion)
        side = min(height, width) if self.mode == "crop" else max(height, width)
        spans = []
        for axis in (1, 0):  # rows holding lesion pixels, then columns
            found = np.flatnonzero(lesion.any(axis=axis))
            spans.append((int(found[0]), int(found[-1])) if found.size else None)
        top, left = (
            _window_start(c, side, extent, span)
            for c, extent, span in zip(centre, (height, width), spans, strict=True)
        )
        return {"top": top, "left": left, "height": side, "width": side}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.crop, inpt, **params)


class PairedResize(v2.Resize):
    """``v2.Resize`` whose masks use centre-aligned nearest sampling, like the image's filter.

    torchvision resizes masks with legacy ``NEAREST``, which samples source pixel
    ``floor(i * scale)``: the mask lands ``(scale - 1) / 2`` source pixels off the image.
    """

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.Mask):
            # The image kernel on the plain tensor: older torchvision's mask kernel ignores the
            # interpolation it is given and samples with legacy NEAREST.
            resized = F.resize_image(
                inpt.as_subclass(torch.Tensor),
                self.size,
                interpolation=v2.InterpolationMode.NEAREST_EXACT,
                max_size=self.max_size,
                antialias=False,
            )
            return tv_tensors.wrap(resized, like=inpt)
        return super().transform(inpt, params)


class RandomRot90(v2.Transform):
    """With probability ``p``, rotate image and mask by the same random multiple of 90°."""

    _transformed_types = (tv_tensors.Image, tv_tensors.Mask)

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        applied = bool(torch.rand(()) < self.p)
        return {"k": int(torch.randint(1, 4, ())) if applied else 0}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if params["k"] == 0:
            return inpt
        # torch.rot90 is an exact permutation of pixels, unlike an interpolated rotation.
        rotated = torch.rot90(inpt.as_subclass(torch.Tensor), params["k"], dims=(-2, -1))
        return tv_tensors.wrap(rotated, like=inpt)


class SeparableElasticTransform(v2.ElasticTransform):
    """torchvision's ``ElasticTransform`` with the displacement noise blurred in two 1-D passes.

    A Gaussian kernel is separable, so the fields are the same (same RNG draws, same
    kernel), about 12x faster: torchvision's 41x41 2-D kernel at sigma 5 costs ~0.2 s per
    256 px sample (~0.6 s at 512 px) on one CPU core, enough to starve the training loop.
    """

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        fields = []
        for alpha, sigma, extent in zip(self.alpha, self.sigma, (width, height), strict=True):
            noise = torch.rand(1, 1, height, width) * 2 - 1
            kernel = int(8 * sigma + 1) | 1  # torchvision's size, made odd
            # Reflect padding needs kernel // 2 < the side: small images get a cut kernel.
            along_x, along_y = min(kernel, 2 * width - 1), min(kernel, 2 * height - 1)
            noise = F.gaussian_blur(noise, [along_x, 1], [sigma, sigma])
            noise = F.gaussian_blur(noise, [1, along_y], [sigma, sigma])
            fields.append(noise * alpha / extent)
        return {"displacement": torch.cat(fields, dim=1).permute(0, 2, 3, 1)}


class RandomGamma(v2.Transform):
    """Gamma drawn uniformly from ``[1 - gamma, 1 + gamma]``; masks pass through."""

    def __init__(self, gamma: float) -> None:
        super().__init__()
        self.gamma = gamma

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"gamma": 1.0 + self.gamma * float(torch.empty(()).uniform_(-1.0, 1.0))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.adjust_gamma, inpt, params["gamma"])


def to_tv_tensors(sample: Sample) -> Sample:
    """Wrap a raw sample so torchvision knows which tensor is the image and which the mask.

    The mask (channel 0, {0, 1}) and the hints (channels 1.., 0..255) become one ``Mask``:
    nearest-neighbour through every geometric op, untouched by the photometric ones.
    """
    image = np.array(sample["image"], dtype=np.uint8)  # a copy: PIL-backed arrays are read-only
    mask = np.asarray(sample["mask"]) != 0
    hints = np.asarray(sample.get("hints", np.zeros((*mask.shape, 0), np.uint8)), np.uint8)
    if image.ndim != 3 or image.shape[2] != 3 or mask.shape != image.shape[:2]:
        raise ValueError(
            f"expected an HxWx3 image and an HxW mask, got {image.shape} and {mask.shape}"
        )
    if hints.ndim != 3 or hints.shape[:2] != mask.shape:
        raise ValueError(f"expected HxWxK hints for a {mask.shape} mask, got {hints.shape}")
    channels = np.concatenate([mask[..., None].astype(np.uint8), hints], axis=-1)
    return {
        **sample,
        "image": tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1)),
        "mask": tv_tensors.Mask(torch.from_numpy(channels).permute(2, 0, 1).contiguous()),
    }


class ToModelTensors:
    """Plain float32 tensors for the model: the image in the chosen colour space, the mask {0, 1},
    the hints in [0, 1].

    Thresholding the mask here keeps it exactly binary whatever the geometric ops did.
    """

    def __init__(self, colour: str) -> None:
        self.colour = colour

    def __call__(self, sample: Sample) -> Sample:
        image = sample["image"].as_subclass(torch.Tensor)
        channels = sample["mask"].as_subclass(torch.Tensor)
        image = rgb_to_lab_normalized(image) if self.colour == "lab" else image * 2.0 - 1.0
        return {
            **sample,
            "image": image,
            "mask": (channels[:1] > 0.5).to(torch.float32),
            "hints": channels[1:].to(torch.float32) / 255.0,
        }


def build_transforms(
    cfg: TransformConfig, train: bool, shown_at: int | None = None
) -> Callable[[Sample], Sample]:
    """The sample pipeline; ``train=False`` keeps only the crop, resize and conversion.
    ``shown_at``: a second resize, to that size, after the crop (a view at ``cfg.size``
    looked at by a metric of another size)."""
    steps: list[Callable[[Sample], Sample]] = [
        to_tv_tensors,
        v2.ToDtype(torch.float32, scale=True),
        LesionCentredCropOrPad(cfg.crop),
        PairedResize((cfg.size, cfg.size), antialias=True),
    ]
    if shown_at is not None and shown_at != cfg.size:
        steps.append(PairedResize((shown_at, shown_at), antialias=True))
    if train:
        if cfg.rot90:
            steps.append(RandomRot90(cfg.geometric_p))
        if cfg.hflip:
            steps.append(v2.RandomHorizontalFlip(cfg.geometric_p))
        if cfg.elastic_alpha > 0:
            elastic = SeparableElasticTransform(alpha=cfg.elastic_alpha, sigma=cfg.elastic_sigma)
            steps.append(v2.RandomApply([elastic], p=cfg.geometric_p))
        if cfg.gamma > 0:
            steps.append(v2.RandomApply([RandomGamma(cfg.gamma)], p=cfg.photometric_p))
        if cfg.contrast > 0:
            contrast = v2.ColorJitter(contrast=cfg.contrast)
            steps.append(v2.RandomApply([contrast], p=cfg.photometric_p))
    steps.append(ToModelTensors(cfg.colour))
    return v2.Compose(steps)


# sRGB (D65) -> CIE XYZ, IEC 61966-2-1. Its row sums are the D65 white point, so white
# maps to exactly L=100, a=b=0.
_RGB_TO_XYZ = torch.tensor(
    [
        [0.4124564, 0.3575761, 0.1804375],
        [0.2126729, 0.7151522, 0.0721750],
        [0.0193339, 0.1191920, 0.9503041],
    ],
    dtype=torch.float64,
)
_WHITE = _RGB_TO_XYZ.sum(dim=1)
_DELTA = 6.0 / 29.0


def _channels_last(image: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Apply a 3x3 colour matrix over the channel axis (-3) of a ...x3xHxW tensor."""
    return torch.einsum("ij,...jhw->...ihw", matrix.to(image), image)


def rgb_to_lab_normalized(image: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1] (...x3xHxW) -> CIE Lab (D65) scaled to about [-1, 1]: L/50-1, a/110, b/110."""
    linear = torch.where(image <= 0.04045, image / 12.92, ((image + 0.055) / 1.055) ** 2.4)
    xyz = _channels_last(linear, _RGB_TO_XYZ) / _WHITE.to(image).view(3, 1, 1)
    f = torch.where(
        xyz > _DELTA**3, xyz.clamp_min(_DELTA**3) ** (1 / 3), xyz / (3 * _DELTA**2) + 4 / 29
    )
    fx, fy, fz = f.unbind(dim=-3)
    lightness = 116 * fy - 16
    return torch.stack((lightness / 50 - 1, 500 * (fx - fy) / 110, 200 * (fy - fz) / 110), dim=-3)


def lab_normalized_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_lab_normalized`; out-of-gamut colours are clipped to [0, 1]."""
    lightness, a, b = (lab[..., 0, :, :] + 1) * 50, lab[..., 1, :, :] * 110, lab[..., 2, :, :] * 110
    fy = (lightness + 16) / 116
    f = torch.stack((fy + a / 500, fy, fy - b / 200), dim=-3)
    xyz = torch.where(f > _DELTA, f**3, 3 * _DELTA**2 * (f - 4 / 29))
    xyz = xyz * _WHITE.to(lab).view(3, 1, 1)
    linear = _channels_last(xyz, torch.linalg.inv(_RGB_TO_XYZ)).clamp(0.0, 1.0)
    return torch.where(linear <= 0.0031308, linear * 12.92, 1.055 * linear ** (1 / 2.4) - 0.055)

"""Property-based: any image file is either read aligned with its mask or refused in one line."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from siamdiff.data.readers import load_mask, load_rgb
from siamdiff.data.transforms import TransformConfig, build_transforms
from siamdiff.errors import SiamdiffError

MODES = ("L", "RGB", "RGBA", "P", "I;16")
BOUNDED = settings(max_examples=30, deadline=None)


def encode(mode: str, height: int, width: int, seed: int, fmt: str) -> bytes:
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    else:
        channels = {"L": 1, "P": 1, "RGB": 3, "RGBA": 4}[mode]
        pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
        image = Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels)
        image = image.convert("P") if mode == "P" else image
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def damage(data: bytes, kind: str, where: float) -> bytes:
    cut = int(len(data) * where)
    if kind == "truncate":
        return data[:cut]
    if kind == "flip":
        return data[:cut] + bytes([data[cut] ^ 0xFF]) + data[cut + 1 :]
    return data


files = st.tuples(
    st.sampled_from(MODES),
    st.integers(1, 48),
    st.integers(1, 48),
    st.integers(0, 2**32 - 1),
    st.sampled_from(["PNG", "TIFF"]),
    st.sampled_from(["none", "none", "truncate", "flip"]),
    st.floats(0.0, 0.99),
)


def one_line_refusal(call):
    try:
        return call()
    except SiamdiffError as exc:
        assert "\n" not in str(exc) and str(exc)
        return None


@BOUNDED
@given(image_file=files, mask_file=files)
def test_readers_align_or_refuse_in_one_line(image_file, mask_file):
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for name, (mode, height, width, seed, fmt, kind, where) in (
            ("image", image_file),
            ("mask", mask_file),
        ):
            path = Path(tmp) / f"{name}.{fmt.lower()}"
            path.write_bytes(damage(encode(mode, height, width, seed, fmt), kind, where))
            paths.append((path, height, width, kind))
        (image_path, h, w, image_kind), (mask_path, mh, mw, mask_kind) = paths
        image = one_line_refusal(lambda: load_rgb(image_path))
        mask = one_line_refusal(lambda: load_mask(mask_path))
    if image is not None:
        assert image.dtype == np.uint8 and image.shape == (h, w, 3)
    else:
        assert image_kind != "none"  # an intact file is never refused
    if mask is not None:
        assert mask.dtype == np.bool_ and mask.shape == (mh, mw)
    else:
        assert mask_kind != "none"


@BOUNDED
@given(
    height=st.integers(8, 64),
    width=st.integers(8, 64),
    seed=st.integers(0, 2**32 - 1),
    coverage=st.floats(0.0, 1.0),
)
def test_train_transforms_keep_the_mask_binary_and_aligned(height, width, seed, coverage):
    rng = np.random.default_rng(seed)
    mask = rng.random((height, width)) < coverage
    # The image carries the mask in its red channel, so misalignment shows as a mismatch.
    image = rng.integers(0, 64, (height, width, 3), dtype=np.uint8)
    image[..., 0] = np.where(mask, 255, 0)
    transform = build_transforms(TransformConfig(size=32), train=True)
    torch.manual_seed(seed)
    sample = transform({"image": image, "mask": mask, "meta": {}})
    out_image, out_mask = sample["image"], sample["mask"]
    assert out_image.shape == (3, 32, 32) and out_mask.shape == (1, 32, 32)
    assert set(out_mask.unique().tolist()) <= {0.0, 1.0}
    # Where the mask is confidently in or out, the red channel (in [-1, 1]) agrees with it.
    red = out_image[0]
    assert not ((out_mask[0] == 1) & (red < -0.9)).any()
    assert not ((out_mask[0] == 0) & (red > 0.9)).any()

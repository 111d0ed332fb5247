"""Dense Hint Input (DHI): the ControlNet hint encoder of Siamese-Diffusion.

It replaces ControlNet's strided-conv hint embedding and maps a pixel-space hint
``[B, hint_channels, H, W]`` to the latent grid ``[B, out_channels, H/8, W/8]``
(method.md, "Model")::

    conv3x3 hint->b, ResidualBlock(b), conv3x3 b->2b, ResidualBlock(2b),
    3x [PatchMerging (2x2 -> LayerNorm(4C) -> Linear(4C->2C)), conv3x3, ResidualBlock]
        at 4b, 8b, 16b channels,
    zero-initialised conv3x3 16b->out_channels

with ``b = base_channels`` (16 in the paper: 16, 32, 64, 128, 256 -> 320).

Shapes for the sizes we train at (SD v1.5 widths, ``out_channels=320``)::

    hint 3 x 256 x 256 -> 320 x 32 x 32
    hint 3 x 384 x 384 -> 320 x 48 x 48
    hint 3 x 512 x 512 -> 320 x 64 x 64

Hints: the mask hint is a {0, 1} mask repeated to 3 channels, the image hint an
RGB image in [0, 1]. With extra hint maps (``data.hints``, docs/hints.md) both carry
them behind those 3 channels, so the shared DHI takes ``3 + K`` channels.
:func:`mask_to_hint` and :func:`image_to_hint` convert the data pipeline's tensors
into these.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torchvision.models.swin_transformer import PatchMerging

from siamdiff.errors import SiamdiffError

BASE_HINT_CHANNELS = 3  # the mask x3 or the RGB image; extra hint maps follow them


def _with_extra(hint: Tensor, extra: Tensor | None) -> Tensor:
    if extra is None or extra.shape[1] == 0:
        return hint
    return torch.cat([hint, extra.to(hint.dtype)], dim=1)


def mask_to_hint(mask: Tensor, extra: Tensor | None = None) -> Tensor:
    """A ``[B, 1, H, W]`` mask in [-1, 1] (or {0, 1}) and the ``[B, K, H, W]`` extra hint maps
    in [0, 1] -> the ``[B, 3 + K, H, W]`` mask hint ({0, 1} x3, then the maps)."""
    dtype = mask.dtype if mask.is_floating_point() else torch.float32
    return _with_extra((mask > 0).to(dtype).expand(-1, BASE_HINT_CHANNELS, -1, -1), extra)


def image_to_hint(image: Tensor, extra: Tensor | None = None) -> Tensor:
    """A ``[B, 3, H, W]`` image in [-1, 1] and the extra hint maps -> the image hint: the
    image in [0, 1], then the maps."""
    return _with_extra(((image + 1) / 2).clamp(0, 1), extra)


class ResidualBlock(nn.Module):
    """conv3x3, SiLU, conv3x3, + identity skip, SiLU (method.md; channels never change here)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(x + self.conv2(self.act(self.conv1(x))))


class ChannelsFirstPatchMerging(PatchMerging):
    """torchvision's Swin PatchMerging (2x2 -> LayerNorm(4C) -> Linear(4C->2C)) on NCHW tensors."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class DenseHintInput(nn.Module):
    """Pixel hint ``[B, hint_channels, H, W]`` -> ``[B, out_channels, H/8, W/8]``, zero at init."""

    downscale = 8

    def __init__(self, out_channels: int, hint_channels: int = 3, base_channels: int = 16) -> None:
        super().__init__()
        b = base_channels
        layers: list[nn.Module] = [
            nn.Conv2d(hint_channels, b, 3, padding=1),
            ResidualBlock(b),
            nn.Conv2d(b, 2 * b, 3, padding=1),
            ResidualBlock(2 * b),
        ]
        channels = 2 * b
        for _ in range(3):
            layers += [
                ChannelsFirstPatchMerging(channels),
                nn.Conv2d(2 * channels, 2 * channels, 3, padding=1),
                ResidualBlock(2 * channels),
            ]
            channels *= 2
        self.body = nn.Sequential(*layers)
        # Zero output: at initialisation the ControlNet sees exactly the UNet encoder's input.
        self.conv_out = nn.Conv2d(channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        self._reused: tuple[Tensor, Tensor] | None = None

    @contextmanager
    def reuse(self, hint: Tensor) -> Iterator[None]:
        """Inside the block, calls with this very ``hint`` tensor return one precomputed output.

        Sampling feeds the same mask hint at every denoising step (and to both guidance passes):
        its embedding does not depend on the step, so it is computed once (no gradients).
        """
        with torch.no_grad():  # a cached graph would be backpropagated through twice
            self._reused = (hint, self(hint))
        try:
            yield
        finally:
            self._reused = None

    def forward(self, hint: Tensor) -> Tensor:
        if self._reused is not None and hint is self._reused[0]:
            return self._reused[1]
        height, width = hint.shape[-2:]
        if height % self.downscale or width % self.downscale:
            # PatchMerging would pad silently and the result would not match the latent grid.
            raise SiamdiffError(f"hint size {height}x{width} is not a multiple of {self.downscale}")
        return self.conv_out(self.body(hint))

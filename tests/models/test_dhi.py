"""Dense Hint Input: shapes, zero output at init, patch-merging layout, hint conversion."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from siamdiff.errors import SiamdiffError
from siamdiff.models.dhi import (
    ChannelsFirstPatchMerging,
    DenseHintInput,
    ResidualBlock,
    image_to_hint,
    mask_to_hint,
)


@pytest.mark.parametrize(("size", "latent"), [(256, 32), (384, 48), (512, 64)])
def test_paper_dhi_maps_hint_to_latent_grid(size: int, latent: int) -> None:
    # Paper widths (16..256 -> 320) on the meta device: real shape logic, no arithmetic.
    with torch.device("meta"):
        dhi = DenseHintInput(out_channels=320)
        out = dhi(torch.empty(2, 3, size, size))
    assert out.shape == (2, 320, latent, latent)
    widths = [m.out_channels for m in dhi.body if isinstance(m, nn.Conv2d)]
    assert widths == [16, 32, 64, 128, 256]


def test_output_is_zero_at_init_and_trainable_away_from_zero() -> None:
    torch.manual_seed(0)
    dhi = DenseHintInput(out_channels=8, base_channels=4)
    hint = torch.rand(2, 3, 32, 32)
    out = dhi(hint)
    assert out.shape == (2, 8, 4, 4)
    assert torch.count_nonzero(out) == 0
    # Zero output, yet the zero conv's weight gets gradient: the hint path can start learning.
    out.sum().backward()
    assert torch.count_nonzero(dhi.conv_out.weight.grad) > 0
    torch.nn.init.normal_(dhi.conv_out.weight)
    assert torch.count_nonzero(dhi(hint)) > 0


def test_hint_output_depends_on_hint_and_accepts_more_channels() -> None:
    torch.manual_seed(0)
    dhi = DenseHintInput(out_channels=8, hint_channels=4, base_channels=4)
    torch.nn.init.normal_(dhi.conv_out.weight)
    a, b = torch.rand(1, 4, 16, 16), torch.rand(1, 4, 16, 16)
    assert not torch.allclose(dhi(a), dhi(b))


def test_hint_size_must_be_multiple_of_8() -> None:
    dhi = DenseHintInput(out_channels=8, base_channels=4)
    with pytest.raises(SiamdiffError, match="36x32 is not a multiple of 8"):
        dhi(torch.rand(1, 3, 36, 32))


def test_residual_block_keeps_its_identity_skip() -> None:
    """SiLU(x + conv2(SiLU(conv1(x)))): with both convs zero only the skip is left, SiLU(x);
    without the skip the block would output SiLU(0) = 0 and cut the hint path."""
    torch.manual_seed(0)
    block = ResidualBlock(3)
    for conv in (block.conv1, block.conv2):
        nn.init.zeros_(conv.weight)
        nn.init.zeros_(conv.bias)
    x = torch.randn(2, 3, 5, 4)
    torch.testing.assert_close(block(x), F.silu(x))
    # A constant second conv bias adds to x before the outer SiLU.
    nn.init.constant_(block.conv2.bias, 0.5)
    torch.testing.assert_close(block(x), F.silu(x + 0.5))


def test_patch_merging_concatenates_2x2_neighbours_then_norm_and_linear() -> None:
    torch.manual_seed(0)
    merge = ChannelsFirstPatchMerging(3)
    x = torch.randn(1, 3, 2, 4)
    out = merge(x)
    assert out.shape == (1, 6, 1, 2)
    for col in range(2):
        patch = x[0, :, :, 2 * col : 2 * col + 2]  # C x 2 x 2 (rows, cols)
        # torchvision's order: (row 0, col 0), (row 1, col 0), (row 0, col 1), (row 1, col 1).
        flat = torch.cat([patch[:, 0, 0], patch[:, 1, 0], patch[:, 0, 1], patch[:, 1, 1]])
        expected = merge.reduction(F.layer_norm(flat, (12,), merge.norm.weight, merge.norm.bias))
        torch.testing.assert_close(out[0, :, 0, col], expected)


def test_hint_conversions_from_minus_one_one() -> None:
    mask = torch.tensor([[-1.0, 1.0], [1.0, -1.0]]).view(1, 1, 2, 2)
    hint = mask_to_hint(mask)
    assert hint.shape == (1, 3, 2, 2)
    assert torch.equal(hint[0, 2], torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    assert torch.equal(mask_to_hint((mask > 0).to(torch.uint8)), hint)  # {0, 1} masks too
    image = torch.tensor([-1.0, 0.0, 1.0, 1.5]).view(1, 1, 2, 2)
    assert torch.equal(image_to_hint(image).flatten(), torch.tensor([0.0, 0.5, 1.0, 1.0]))

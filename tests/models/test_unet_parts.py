"""The split UNet pass (shared encoder, per-branch decoder) against diffusers' own forward."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from torch import Tensor

from siamdiff.errors import SiamdiffError
from siamdiff.models.backbone import build_backbone
from siamdiff.models.unet_parts import UNetDecoder, check_supported, encode

THREE_LEVELS = {
    "block_out_channels": [16, 32, 32],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "norm_num_groups": 8,
}


def random_residuals(unet: UNet2DConditionModel, zt: Tensor, context: Tensor, t: Tensor):
    """Control-shaped residuals: the skips' and middle block's shapes, random values."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        features = encode(unet, zt, t, context)
    down = tuple(torch.randn(s.shape, generator=gen) for s in features.skips)
    return down, torch.randn(features.mid.shape, generator=gen)


@pytest.mark.parametrize(
    "unet_args, side",
    [({}, 4), ({}, 5), (THREE_LEVELS, 8), (THREE_LEVELS, 6)],  # 5 and 6: explicit upsample sizes
)
def test_split_pass_equals_the_whole_pass_values_and_gradients(unet_args: dict, side: int) -> None:
    unet = build_backbone({"kind": "tiny", "unet": unet_args}, latent_channels=4).unet
    gen = torch.Generator().manual_seed(0)
    zt = torch.randn(3, 4, side, side, generator=gen)
    context = torch.randn(3, 8, unet.config.cross_attention_dim, generator=gen)
    t = torch.tensor([5, 500, 999])
    down, mid = random_residuals(unet, zt, context, t)
    grads = []
    for split in (False, True):
        residuals = [r.clone().requires_grad_(True) for r in (*down, mid)]
        if split:
            eps = UNetDecoder(unet)(
                encode(unet, zt, t, context), tuple(residuals[:-1]), residuals[-1]
            )
        else:
            eps = unet(
                zt,
                t,
                encoder_hidden_states=context,
                down_block_additional_residuals=tuple(residuals[:-1]),
                mid_block_additional_residual=residuals[-1],
                return_dict=False,
            )[0]
        unet.zero_grad()
        eps.pow(2).mean().backward()
        grads.append(
            (eps.detach(), [r.grad for r in residuals], [p.grad.clone() for p in unet.parameters()])
        )
    (eps_whole, res_whole, par_whole), (eps_split, res_split, par_split) = grads
    torch.testing.assert_close(eps_split, eps_whole, rtol=1e-5, atol=1e-6)
    for got, want in zip(res_split + par_split, res_whole + par_whole, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_unsupported_unet_options_are_refused() -> None:
    unet = build_backbone(
        {"kind": "tiny", "unet": {"class_embed_type": "timestep"}}, latent_channels=4
    ).unet
    with pytest.raises(SiamdiffError, match="class_embed_type"):
        check_supported(unet)

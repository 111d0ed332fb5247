"""A ControlNet-conditioned UNet pass in two halves, so both Siamese branches share the first.

With ControlNet residuals, diffusers' ``UNet2DConditionModel.forward`` adds the control only
*after* the encoder: to the skip connections and to the middle block's output. Everything up
to there (time embedding, ``conv_in``, down blocks, middle block) sees only ``(zt, t, text)``,
which the Mask- and Image-Diffusion branches share. :func:`encode` runs that part once;
:class:`UNetDecoder` runs the rest under each branch's control. ``decoder(encode(...), ...)``
equals ``unet(..., down_block_additional_residuals=..., mid_block_additional_residual=...)``;
the tests hold the two to the same numbers.

Only what siamdiff's backbones use is supported (no class / added embeddings, no attention
masks, no adapters); :func:`check_supported` says so early for any other UNet.
"""

from __future__ import annotations

from typing import NamedTuple

from diffusers import UNet2DConditionModel
from torch import Tensor, nn

from siamdiff.errors import SiamdiffError


class UNetFeatures(NamedTuple):
    """The control-independent half of a UNet pass."""

    emb: Tensor  # time embedding, [B, D]
    skips: tuple[Tensor, ...]  # conv_in and down-block outputs, before the control is added
    mid: Tensor  # middle-block output, before the control is added
    context: Tensor  # the text context [B, L, D]

    def detach(self) -> UNetFeatures:
        return UNetFeatures(
            self.emb.detach(),
            tuple(s.detach() for s in self.skips),
            self.mid.detach(),
            self.context.detach(),
        )


def check_supported(unet: UNet2DConditionModel) -> None:
    """Refuse UNet options that :func:`encode` / :class:`UNetDecoder` do not reproduce."""
    config = unet.config
    unsupported = {
        "class_embed_type": config.class_embed_type,
        "addition_embed_type": config.addition_embed_type,
        "encoder_hid_dim_type": config.encoder_hid_dim_type,
        "time_cond_proj_dim": config.time_cond_proj_dim,
        "center_input_sample": config.center_input_sample or None,
        "num_class_embeds": config.num_class_embeds,
    }
    used = {key: value for key, value in unsupported.items() if value is not None}
    if used:
        raise SiamdiffError(f"the split UNet pass does not support {used}")


def encode(unet: UNet2DConditionModel, zt: Tensor, t: Tensor, context: Tensor) -> UNetFeatures:
    """Time embedding, conv_in, down blocks and middle block of ``unet`` on ``zt``."""
    emb = unet.time_embedding(unet.get_time_embed(sample=zt, timestep=t))
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    sample = unet.conv_in(zt)
    skips: tuple[Tensor, ...] = (sample,)
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            sample, outputs = block(hidden_states=sample, temb=emb, encoder_hidden_states=context)
        else:
            sample, outputs = block(hidden_states=sample, temb=emb)
        skips += outputs
    if getattr(unet.mid_block, "has_cross_attention", False):
        sample = unet.mid_block(sample, emb, encoder_hidden_states=context)
    else:
        sample = unet.mid_block(sample, emb)
    return UNetFeatures(emb, skips, sample, context)


class UNetDecoder(nn.Module):
    """The up blocks and output layers of ``unet``, on :class:`UNetFeatures` plus a control.

    A module (holding the UNet) so that ``torch.func.functional_call`` can run it with
    detached weights: the Image-Diffusion branch's gradient must reach the control only.
    """

    def __init__(self, unet: UNet2DConditionModel) -> None:
        super().__init__()
        check_supported(unet)
        self.unet = unet

    def forward(
        self, features: UNetFeatures, down_residuals: tuple[Tensor, ...], mid_residual: Tensor
    ) -> Tensor:
        unet = self.unet
        skips = tuple(s + r for s, r in zip(features.skips, down_residuals, strict=True))
        sample = features.mid + mid_residual
        # diffusers passes explicit upsample sizes when the latent is not a multiple of the
        # total downsampling factor (e.g. 384 px -> 48x48 latents through 3 upsamplers is fine,
        # 360 px -> 45x45 is not).
        factor = 2**unet.num_upsamplers
        forward_size = any(dim % factor for dim in features.skips[0].shape[-2:])
        for i, block in enumerate(unet.up_blocks):
            res, skips = skips[-len(block.resnets) :], skips[: -len(block.resnets)]
            size = skips[-1].shape[2:] if forward_size and i < len(unet.up_blocks) - 1 else None
            if getattr(block, "has_cross_attention", False):
                sample = block(
                    hidden_states=sample,
                    temb=features.emb,
                    res_hidden_states_tuple=res,
                    encoder_hidden_states=features.context,
                    upsample_size=size,
                )
            else:
                sample = block(
                    hidden_states=sample,
                    temb=features.emb,
                    res_hidden_states_tuple=res,
                    upsample_size=size,
                )
        if unet.conv_norm_out is not None:
            sample = unet.conv_act(unet.conv_norm_out(sample))
        return unet.conv_out(sample)

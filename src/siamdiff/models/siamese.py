"""Siamese-Diffusion: the Mask- and Image-Diffusion branches and their four loss terms.

One shared ControlNet conditions one UNet (method.md, "Training (one step)")::

    c_m   = ControlNet(zt, t, c, hint=mask)        eps_m   = UNet(zt, t, c, control=c_m)
    c_i   = ControlNet(zt, t, c, hint=image)
    c_mix = w_m * sg(c_m) + w_i * c_i              eps_mix = UNet(zt, t, c, control=c_mix)

    Loss = L_m + L_i + lambda_c * L_c + L_aug

The UNet's output is eps (method.md) or, with ``prediction_type="v_prediction"`` in the noise
scheduler's config, v = sqrt(a_t) eps - sqrt(1 - a_t) z0 (the default for from-scratch
backbones, see :data:`siamdiff.models.backbone.FROM_SCRATCH_PREDICTION_TYPE`). Every loss term then
compares predictions of that kind, and L_c pulls v_m towards sg(v_mix).

``c_m`` is computed once per step and reused, detached, by the image branch (the authors' code
recomputes it on deep copies of the networks). The UNet's encoder and middle block see the same
``(zt, t, c)`` in both branches and the control enters only after them, so they run once per step
(:mod:`siamdiff.models.unet_parts`); each branch runs its own decoder pass. The image branch's
UNet pass sends gradient only to the ControlNet, through ``c_i``. Hints come from
:func:`siamdiff.models.dhi.mask_to_hint` and :func:`siamdiff.models.dhi.image_to_hint`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from siamdiff.errors import SiamdiffError
from siamdiff.models.backbone import Backbone
from siamdiff.models.unet_parts import UNetDecoder, UNetFeatures, check_supported, encode

MODES = ("siamese", "mask-only")


class Control(NamedTuple):
    """A ControlNet's residuals for the UNet's skip connections and middle block."""

    down: tuple[Tensor, ...]
    mid: Tensor

    def scaled(self, scale: float) -> Control:
        return Control(tuple(scale * r for r in self.down), scale * self.mid)


def mix_controls(mask_control: Control, image_control: Control, image_weight: float) -> Control:
    """c_mix = w_m * sg(c_m) + w_i * c_i with w_m = 1 and w_i = ``image_weight``."""

    def mix(mask_residual: Tensor, image_residual: Tensor) -> Tensor:
        return mask_residual.detach() + image_weight * image_residual

    return Control(
        down=tuple(mix(m, i) for m, i in zip(mask_control.down, image_control.down, strict=True)),
        mid=mix(mask_control.mid, image_control.mid),
    )


@contextmanager
def gradient_checkpointing_paused(module: nn.Module) -> Iterator[None]:
    """Turn diffusers' per-block gradient checkpointing off inside the block, then back on."""
    blocks = [m for m in module.modules() if getattr(m, "gradient_checkpointing", False)]
    for block in blocks:
        block.gradient_checkpointing = False
    try:
        yield
    finally:
        for block in blocks:
            block.gradient_checkpointing = True


def denoising_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """||prediction - target||^2 (mean over all elements): L_m, L_i and L_aug."""
    return F.mse_loss(prediction.float(), target.float())


def noise_consistency_loss(mask_prediction: Tensor, image_prediction: Tensor) -> Tensor:
    """Noise Consistency Loss, L_c = ||eps_m - sg(eps_mix)||^2 (mean over all elements).

    The Image-Diffusion prediction is the target: it carries no gradient, so L_c pulls only the
    Mask-Diffusion branch towards the image-conditioned noise estimate.
    """
    return F.mse_loss(mask_prediction.float(), image_prediction.detach().float())


def controlled_prediction(
    unet: nn.Module, zt: Tensor, t: Tensor, text_emb: Tensor, control: Control
) -> Tensor:
    """``unet``'s output (eps or v) for ``zt`` with ControlNet residuals ``control``: one
    whole UNet pass."""
    return unet(
        zt,
        t,
        encoder_hidden_states=text_emb,
        down_block_additional_residuals=control.down,
        mid_block_additional_residual=control.mid,
        return_dict=False,
    )[0]


class SiameseDiffusion(nn.Module):
    """The two branches of Siamese-Diffusion (``mode="siamese"``) or plain ControlNet+DHI
    training on the mask hint alone (``mode="mask-only"``, the ablation baseline)."""

    def __init__(
        self,
        backbone: Backbone,
        mode: str = "siamese",
        aug_t_max: int = 200,
        aug_start: float = 1 / 3,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise SiamdiffError(f"unknown model mode {mode!r} (choose one of {', '.join(MODES)})")
        self.unet = backbone.unet
        self.controlnet = backbone.controlnet
        self.text = backbone.text
        self.noise_scheduler = backbone.noise_scheduler
        check_supported(backbone.unet)
        self.mode = mode
        self.aug_t_max = aug_t_max
        self.aug_start = aug_start
        self.prediction_type = backbone.noise_scheduler.config.prediction_type
        self.register_buffer(
            "alphas_cumprod", backbone.noise_scheduler.alphas_cumprod.clone(), persistent=False
        )

    def loss_terms(
        self,
        z0: Tensor,
        mask_hint: Tensor,
        image_hint: Tensor,
        text_emb: Tensor,
        *,
        progress: float,
        consistency_weight: float,
        noise: Tensor | None = None,
        timesteps: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """One training step's loss terms on clean latents ``z0`` ``[B, C, h, w]``.

        Hints are ``[B, 3, H, W]`` (see :mod:`siamdiff.models.dhi`), ``text_emb`` is ``[B, L, D]``.

        ``progress`` is step / max_steps in [0, 1]: it is the image-branch weight w_i and turns
        the augmentation term on once past ``aug_start``. Returns ``mask``, ``image``,
        ``consistency`` and ``augment`` (zero when inactive) and ``loss``, their weighted sum, to
        backpropagate. In mask-only mode only ``mask`` is non-zero.
        """
        if noise is None:
            noise = torch.randn_like(z0)
        if timesteps is None:
            timesteps = torch.randint(
                0, self.noise_scheduler.config.num_train_timesteps, (z0.shape[0],), device=z0.device
            )
        zt = self.noise_scheduler.add_noise(z0, noise, timesteps)
        target = self.target(z0, noise, timesteps)
        mask_prediction, image_prediction = self.branch_predictions(
            zt, timesteps, text_emb, mask_hint, image_hint, progress
        )

        zero = zt.new_zeros((), dtype=torch.float32)
        terms = {
            "mask": denoising_loss(mask_prediction, target),
            "image": zero,
            "consistency": zero,
            "augment": zero,
        }
        if image_prediction is not None:
            terms["image"] = denoising_loss(image_prediction, target)
            terms["consistency"] = noise_consistency_loss(mask_prediction, image_prediction)
            if progress > self.aug_start:
                terms["augment"] = self.augment_loss(
                    zt, timesteps, noise, image_prediction, text_emb, mask_hint
                )
        terms["loss"] = (
            terms["mask"]
            + terms["image"]
            + consistency_weight * terms["consistency"]
            + terms["augment"]
        )
        return terms

    # A DDP-wrapped model must be called as model(...) for its gradient hooks to fire.
    forward = loss_terms

    def branch_predictions(
        self,
        zt: Tensor,
        t: Tensor,
        text_emb: Tensor,
        mask_hint: Tensor,
        image_hint: Tensor,
        image_weight: float,
    ) -> tuple[Tensor, Tensor | None]:
        """Mask-Diffusion's and Image-Diffusion's predictions (None in mask-only mode) for
        one noised batch, as training computes them: c_m once, the UNet encoder once."""
        mask_control = self.control(zt, t, text_emb, mask_hint)
        features = encode(self.unet, zt, t, text_emb)  # shared by both branches
        mask_prediction = self.decode(features, mask_control)
        if self.mode != "siamese":
            return mask_prediction, None
        image_prediction = self.predict_image(
            zt, t, text_emb, image_hint, mask_control, image_weight, features
        )
        return mask_prediction, image_prediction

    def control(self, zt: Tensor, t: Tensor, text_emb: Tensor, hint: Tensor) -> Control:
        down, mid = self.controlnet(
            zt, t, encoder_hidden_states=text_emb, controlnet_cond=hint, return_dict=False
        )
        return Control(tuple(down), mid)

    def denoise(self, zt: Tensor, t: Tensor, text_emb: Tensor, control: Control) -> Tensor:
        """The UNet's prediction (eps or v) under ``control``: one whole UNet pass."""
        return controlled_prediction(self.unet, zt, t, text_emb, control)

    def decode(self, features: UNetFeatures, control: Control, *, unet_grad: bool = True) -> Tensor:
        """The prediction from shared encoder ``features`` under ``control``; ``unet_grad=False``
        keeps gradient off the UNet (weights and encoder features) and lets it reach the
        control."""
        # Built per call, not registered: a second path to the UNet's weights would duplicate
        # them in the state dict.
        decoder = UNetDecoder(self.unet)
        if unet_grad:
            return decoder(features, control.down, control.mid)
        # The same modules with detached weights: no copy, and no gradient reaches the UNet.
        # Checkpointing would recompute in backward with the real weights and fail on the
        # mismatch, so this pass keeps its (decoder-only) activations instead.
        detached = {name: p.detach() for name, p in decoder.named_parameters()}
        with gradient_checkpointing_paused(self.unet):
            return functional_call(
                decoder, detached, (features.detach(), control.down, control.mid)
            )

    def predict_mask(
        self,
        zt: Tensor,
        t: Tensor,
        text_emb: Tensor,
        mask_hint: Tensor,
        control_scale: float = 1.0,
    ) -> Tensor:
        """Mask-Diffusion's prediction, eps or v (the only branch used for sampling), with the
        ControlNet's residuals multiplied by ``control_scale`` (diffusers'
        ``controlnet_conditioning_scale``: 0 ignores the mask, > 1 follows it harder)."""
        control = self.control(zt, t, text_emb, mask_hint)
        if control_scale != 1.0:  # training's path stays free of the extra tensors
            control = control.scaled(control_scale)
        return self.denoise(zt, t, text_emb, control)

    def predict_image(
        self,
        zt: Tensor,
        t: Tensor,
        text_emb: Tensor,
        image_hint: Tensor,
        mask_control: Control,
        image_weight: float,
        features: UNetFeatures,
    ) -> Tensor:
        """Image-Diffusion's prediction (eps_mix or v_mix) under c_mix = sg(c_m) + w_i * c_i;
        ``features`` are the mask branch's UNet encoder features of the same
        ``(zt, t, text_emb)``. L_i trains the ControlNet alone, through c_i: the text
        embedding enters detached (a learned one is trained by the mask branch)."""
        image_control = self.control(zt, t, text_emb.detach(), image_hint)
        mixed = mix_controls(mask_control, image_control, image_weight)
        return self.decode(features, mixed, unet_grad=False)

    def target(self, z0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the UNet learns to output for ``zt = q(z0, t, noise)``: eps, or v."""
        if self.prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(z0, noise, t)
        return noise

    def _alpha(self, zt: Tensor, t: Tensor) -> Tensor:
        return self.alphas_cumprod[t].to(zt.dtype).view(-1, *([1] * (zt.dim() - 1)))

    def predict_x0(self, zt: Tensor, t: Tensor, prediction: Tensor) -> Tensor:
        """x0 = (zt - sqrt(1 - a_t) eps) / sqrt(a_t) = sqrt(a_t) zt - sqrt(1 - a_t) v, a_t the
        cumulative alpha product."""
        alpha = self._alpha(zt, t)
        if self.prediction_type == "v_prediction":
            return alpha.sqrt() * zt - (1 - alpha).sqrt() * prediction
        return (zt - (1 - alpha).sqrt() * prediction) / alpha.sqrt()

    def predict_eps(self, zt: Tensor, t: Tensor, prediction: Tensor) -> Tensor:
        """The noise estimate a prediction implies: eps, or sqrt(a_t) v + sqrt(1 - a_t) zt."""
        if self.prediction_type == "v_prediction":
            alpha = self._alpha(zt, t)
            return alpha.sqrt() * prediction + (1 - alpha).sqrt() * zt
        return prediction

    def augment_loss(
        self,
        zt: Tensor,
        t: Tensor,
        noise: Tensor,
        image_prediction: Tensor,
        text_emb: Tensor,
        mask_hint: Tensor,
    ) -> Tensor:
        """L_aug = ||eps_theta_mask(sg(zt'), t) - eps||^2 on the samples with t <= aug_t_max, where
        zt' = q(z0', t, eps) re-noises z0' = predict_x0(zt, t, eps_mix) with the same t and eps
        (under v-prediction the target is z0' and eps's v).

        As in the authors' code, the other samples count as zero loss: the term is a mean over
        the whole batch, so a kept sample weighs what it weighs in L_m. Only the kept samples
        are computed, though (the authors run the whole batch and multiply by 0)."""
        keep = t <= self.aug_t_max
        if not keep.any():
            return zt.new_zeros((), dtype=torch.float32)
        kept_fraction = keep.float().mean()
        zt, t, noise = zt[keep], t[keep], noise[keep]
        x0 = self.predict_x0(zt, t, image_prediction[keep]).detach()
        renoised = self.noise_scheduler.add_noise(x0, noise, t)
        prediction = self.predict_mask(renoised, t, text_emb[keep], mask_hint[keep])
        return denoising_loss(prediction, self.target(x0, noise, t)) * kept_fraction

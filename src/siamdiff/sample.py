"""Sampling from Mask-Diffusion: a mask hint (and the prompt) -> latents.

method.md, "Sampling": only the Mask-Diffusion branch, DDIM with 50 steps, eta = 0 and
classifier-free guidance 9.0, whose unconditional pass keeps the mask hint and uses the empty
prompt. The scheduler comes from diffusers, configured from the model's training noise schedule.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    SchedulerMixin,
    UniPCMultistepScheduler,
)
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from siamdiff.errors import SiamdiffError
from siamdiff.models.dhi import DenseHintInput
from siamdiff.models.siamese import SiameseDiffusion

SCHEDULERS = ("ddim", "dpmsolver++", "unipc")
# The solvers' timesteps span T-1..0 at any count. Named, not left to their default: a saved
# and reloaded noise schedule (every export) states "leading", and the solvers then started
# as low as t=501 and sampled other images than the same model before export.
SOLVER_SPACING = "linspace"


def step_range(scheduler: str, timesteps: int) -> tuple[int, int]:
    """The step counts ``scheduler`` samples whole over ``timesteps`` training timesteps.
    DDIM's leading spacing (Stable Diffusion's; method.md's 50 steps run 981..1) is
    ``timesteps // steps`` apart: 1 step is t=1 alone, and past T/2 the schedule starts at
    t=steps and its last step stops short of x0."""
    return (2, timesteps // 2) if scheduler == "ddim" else (1, timesteps - 1)


def make_scheduler(name: str, model: SiameseDiffusion) -> SchedulerMixin:
    """The named diffusers scheduler on the model's training noise schedule."""
    config = model.noise_scheduler.config
    if name == "ddim":
        return DDIMScheduler.from_config(config)
    if name == "dpmsolver++":
        return DPMSolverMultistepScheduler.from_config(
            config, algorithm_type="dpmsolver++", timestep_spacing=SOLVER_SPACING
        )
    if name == "unipc":
        return UniPCMultistepScheduler.from_config(config, timestep_spacing=SOLVER_SPACING)
    raise SiamdiffError(
        f"unknown sampling scheduler {name!r} (choose one of {', '.join(SCHEDULERS)})"
    )


@torch.no_grad()
def ddim_sample(
    model: SiameseDiffusion,
    mask_hint: Tensor,
    text_emb: Tensor,
    uncond_emb: Tensor,
    *,
    steps: int = 50,
    guidance: float = 9.0,
    control_scale: float = 1.0,
    eta: float = 0.0,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    latent_shape: tuple[int, ...] | None = None,
    scheduler: str = "ddim",
) -> Tensor:
    """Denoise pure noise into latents ``[B, C, h, w]`` under the mask hints ``[B, 3 + K, H, W]``
    (K extra hint maps, docs/hints.md).

    ``text_emb`` / ``uncond_emb`` are the prompt's and ""'s embeddings (batch 1 or B). Each
    step runs the conditional and unconditional passes as one batch of 2B; the mask hint's DHI
    embedding is computed once for all steps. ``control_scale`` multiplies the ControlNet's
    residuals (mask adherence; 1 = as trained). ``generator`` may be
    one generator per sample: then a sample depends only on its mask and its generator's seed,
    whatever the batch it is drawn in. ``eta`` (DDIM only) > 0 adds per-step noise.
    ``latent_shape`` is ``(C, h, w)``; by default (UNet channels, H/8, W/8).
    """
    if eta and scheduler != "ddim":
        raise SiamdiffError(f"eta applies to the ddim scheduler only, not {scheduler!r}")
    noise_scheduler = make_scheduler(scheduler, model)
    lowest, highest = step_range(scheduler, noise_scheduler.config.num_train_timesteps)
    if not lowest <= steps <= highest:
        raise SiamdiffError(f"{scheduler} samples in {lowest}..{highest} steps, got {steps}")
    noise_scheduler.set_timesteps(steps, device=mask_hint.device)
    batch = mask_hint.shape[0]
    if latent_shape is None:
        height, width = (size // DenseHintInput.downscale for size in mask_hint.shape[-2:])
        latent_shape = (model.unet.config.in_channels, height, width)
    generators = list(generator) if isinstance(generator, Sequence) else generator
    # fp32 latents whatever the weights' dtype: the scheduler's updates need its precision
    # (autocast runs the networks in bf16 on CUDA; bf16-stored frozen weights must not leak in).
    latents = randn_tensor(
        (batch, *latent_shape), generator=generators, device=mask_hint.device, dtype=torch.float32
    )
    latents = latents * noise_scheduler.init_noise_sigma
    # Unconditional first: out = out_u + guidance * (out_c - out_u), out = eps or v. At
    # guidance 1 that is out_c: the unconditional half is not computed.
    passes = 1 if guidance == 1 else 2
    embeddings = [text_emb] if passes == 1 else [uncond_emb, text_emb]
    context = torch.cat([emb.expand(batch, -1, -1) for emb in embeddings])
    hints = torch.cat([mask_hint] * passes)
    step_kwargs = {"eta": eta, "generator": generators} if scheduler == "ddim" else {}
    with model.controlnet.controlnet_cond_embedding.reuse(hints):
        for t in noise_scheduler.timesteps:
            model_input = noise_scheduler.scale_model_input(torch.cat([latents] * passes), t)
            prediction = model.predict_mask(model_input, t, context, hints, control_scale)
            if passes == 2:  # in fp32: a bf16 difference times 9 would carry its rounding
                pred_uncond, pred_cond = prediction.float().chunk(2)
                prediction = pred_uncond + guidance * (pred_cond - pred_uncond)
            latents = noise_scheduler.step(prediction, t, latents, **step_kwargs).prev_sample
    return latents

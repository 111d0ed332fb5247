"""Mask-Diffusion sampling: determinism, batch independence, guidance, step count."""

from __future__ import annotations

from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler
from torch import Tensor

from siamdiff.errors import SiamdiffError
from siamdiff.models.backbone import method_noise_scheduler
from siamdiff.models.siamese import SiameseDiffusion
from siamdiff.sample import SCHEDULERS, ddim_sample, make_scheduler, step_range
from tests.models.test_siamese import PROMPT, tiny_model


@pytest.fixture(scope="module")
def model() -> SiameseDiffusion:
    return tiny_model().eval()


@pytest.fixture(scope="module")
def prompts(model: SiameseDiffusion) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        return model.text([PROMPT]), model.text([""])


def masks(count: int) -> Tensor:
    gen = torch.Generator().manual_seed(7)
    return (torch.rand(count, 1, 32, 32, generator=gen) > 0.5).float().expand(-1, 3, -1, -1)


def seeded(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def test_same_seed_same_latents(model: SiameseDiffusion, prompts: tuple[Tensor, Tensor]) -> None:
    first = ddim_sample(model, masks(2), *prompts, steps=3, generator=seeded(0, 1))
    again = ddim_sample(model, masks(2), *prompts, steps=3, generator=seeded(0, 1))
    other = ddim_sample(model, masks(2), *prompts, steps=3, generator=seeded(2, 3))
    assert first.shape == (2, 4, 4, 4)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    stochastic = ddim_sample(model, masks(2), *prompts, steps=3, eta=0.5, generator=seeded(0, 1))
    assert not torch.allclose(first, stochastic)  # eta > 0 adds noise at every step


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_per_sample_seeds_make_results_batch_independent(
    model: SiameseDiffusion, prompts: tuple[Tensor, Tensor], eta: float
) -> None:
    hints = masks(3)
    alone = ddim_sample(model, hints[:1], *prompts, steps=3, eta=eta, generator=seeded(0))
    batched = ddim_sample(model, hints, *prompts, steps=3, eta=eta, generator=seeded(0, 1, 2))
    torch.testing.assert_close(batched[:1], alone, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(batched[1], batched[2])


def test_guidance_one_is_the_conditional_prediction(
    model: SiameseDiffusion, prompts: tuple[Tensor, Tensor]
) -> None:
    hints, (cond, uncond) = masks(2), prompts
    sampled = ddim_sample(model, hints, cond, uncond, steps=4, guidance=1.0, generator=seeded(0, 1))

    scheduler = DDIMScheduler.from_config(model.noise_scheduler.config)
    scheduler.set_timesteps(4)
    latents = torch.stack([torch.randn(4, 4, 4, generator=g) for g in seeded(0, 1)])
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = model.predict_mask(latents, t, cond.expand(2, -1, -1), hints)
            latents = scheduler.step(eps, t, latents).prev_sample
    torch.testing.assert_close(sampled, latents, rtol=1e-4, atol=1e-5)
    guided = ddim_sample(model, hints, cond, uncond, steps=4, guidance=9.0, generator=seeded(0, 1))
    assert (guided - latents).abs().max() > 1e-2


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize(("guidance", "passes"), [(9.0, 2), (1.0, 1)])
def test_steps_respected_with_one_batched_pass_each(
    model: SiameseDiffusion,
    prompts: tuple[Tensor, Tensor],
    scheduler: str,
    guidance: float,
    passes: int,
) -> None:
    batch_sizes: list[int] = []
    handle = model.unet.register_forward_pre_hook(lambda _, args: batch_sizes.append(len(args[0])))
    try:
        out = ddim_sample(
            model, masks(3), *prompts, steps=5, guidance=guidance, scheduler=scheduler
        )
    finally:
        handle.remove()
    # Conditional + unconditional in one pass of 2B per step; guidance 1 needs the first alone.
    assert batch_sizes == [3 * passes] * 5
    assert torch.isfinite(out).all()


def test_control_scale_multiplies_the_controlnet_residuals(
    model: SiameseDiffusion, prompts: tuple[Tensor, Tensor]
) -> None:
    gen = torch.Generator().manual_seed(3)
    zt, t, hint = torch.randn(2, 4, 4, 4, generator=gen), torch.tensor([500, 80]), masks(2)
    text = prompts[0].expand(2, -1, -1)
    with torch.no_grad():
        down, mid = model.controlnet(
            zt, t, encoder_hidden_states=text, controlnet_cond=hint, return_dict=False
        )

        def unet(scale: float) -> Tensor:
            return model.unet(
                zt,
                t,
                encoder_hidden_states=text,
                down_block_additional_residuals=[scale * d for d in down],
                mid_block_additional_residual=scale * mid,
            ).sample

        for scale in (0.0, 0.5, 2.0):
            torch.testing.assert_close(
                model.predict_mask(zt, t, text, hint, scale), unet(scale), rtol=1e-5, atol=1e-6
            )
        bare = model.unet(zt, t, encoder_hidden_states=text).sample
        assert torch.equal(unet(0.0), bare)
        assert (model.predict_mask(zt, t, text, hint) - bare).abs().max() > 1e-3

    # Scale 0 ignores the mask: any two masks give the same samples; scale 1 does not.
    other = 1 - masks(2)
    for scale, same in ((0.0, True), (1.0, False)):
        a, b = (
            ddim_sample(model, m, *prompts, steps=3, control_scale=scale, generator=seeded(0, 1))
            for m in (masks(2), other)
        )
        assert torch.allclose(a, b) is same


def test_sampler_errors_are_one_line(
    model: SiameseDiffusion, prompts: tuple[Tensor, Tensor]
) -> None:
    with pytest.raises(SiamdiffError, match="unknown sampling scheduler 'euler'"):
        ddim_sample(model, masks(1), *prompts, steps=2, scheduler="euler")
    with pytest.raises(SiamdiffError, match="eta applies to the ddim scheduler only"):
        ddim_sample(model, masks(1), *prompts, steps=2, eta=0.5, scheduler="unipc")


class _OracleDenoiser:
    """The exact eps- or v-predictor for a data distribution that is a single point ``x_star``."""

    def __init__(self, x_star: torch.Tensor, prediction_type: str) -> None:
        self.x_star = x_star
        self.noise_scheduler = method_noise_scheduler(prediction_type)
        self.unet = SimpleNamespace(
            config=SimpleNamespace(in_channels=x_star.shape[1]), dtype=torch.float32
        )
        no_hint_encoder = SimpleNamespace(reuse=lambda hint: nullcontext())
        self.controlnet = SimpleNamespace(controlnet_cond_embedding=no_hint_encoder)

    def predict_mask(self, zt, t, text_emb, mask_hint, control_scale=1.0):
        abar = self.noise_scheduler.alphas_cumprod[int(t)]
        eps = (zt - abar.sqrt() * self.x_star) / (1 - abar).sqrt()
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            return abar.sqrt() * eps - (1 - abar).sqrt() * self.x_star
        return eps


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("scheduler", ["ddim", "dpmsolver++", "unipc"])
def test_sampling_with_the_exact_denoiser_lands_on_the_data(
    scheduler: str, prediction_type: str
) -> None:
    x_star = torch.randn(1, 4, 2, 2)
    oracle = _OracleDenoiser(x_star, prediction_type)
    hint = torch.zeros(2, 3, 16, 16)
    text = torch.zeros(1, 1, 1)
    latents = ddim_sample(
        oracle,
        hint,
        text,
        text,
        steps=10,
        guidance=9.0,
        scheduler=scheduler,
        generator=[torch.Generator().manual_seed(i) for i in range(2)],
    )
    torch.testing.assert_close(latents, x_star.expand(2, -1, -1, -1), atol=2e-3, rtol=0)


class _Bf16Denoiser(_OracleDenoiser):
    """The exact denoiser answering in bf16, as the networks do under CUDA's autocast."""

    def predict_mask(self, zt, t, text_emb, mask_hint, control_scale=1.0):
        prediction = super().predict_mask(zt, t, text_emb, mask_hint, control_scale)
        return (prediction + text_emb.mean()).to(torch.bfloat16)


def test_guidance_is_combined_in_fp32_when_the_network_answers_in_bf16(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """u + 9 (c - u) in bf16 would round the 9x-inflated difference to 8 bits of mantissa."""
    handed: list[torch.dtype] = []
    real_step = DDIMScheduler.step

    def recording_step(self, model_output, *args, **kwargs):
        handed.append(model_output.dtype)
        return real_step(self, model_output, *args, **kwargs)

    monkeypatch.setattr(DDIMScheduler, "step", recording_step)
    oracle = _Bf16Denoiser(torch.randn(1, 4, 2, 2), "v_prediction")
    text, empty = torch.full((1, 1, 1), 0.3), torch.zeros(1, 1, 1)
    ddim_sample(oracle, torch.zeros(2, 3, 16, 16), text, empty, steps=3, guidance=9.0)
    assert handed == [torch.float32] * 3


def test_hint_embedding_is_computed_once_per_sampling_run(
    model: SiameseDiffusion, prompts: tuple[Tensor, Tensor]
) -> None:
    dhi = model.controlnet.controlnet_cond_embedding
    calls = []
    hook = dhi.body.register_forward_hook(lambda *_: calls.append(1))
    try:
        latents = ddim_sample(model, masks(2), *prompts, steps=4, generator=seeded(0, 1))
    finally:
        hook.remove()
    assert len(calls) == 1  # not 4 steps x 1 batched pass
    assert dhi._reused is None  # and nothing is left cached for later calls
    # The same denoising steps recomputing the embedding every time give the same latents.
    scheduler = DDIMScheduler.from_config(model.noise_scheduler.config)
    scheduler.set_timesteps(4)
    generators = seeded(0, 1)
    recomputed = torch.stack([torch.randn(4, 4, 4, generator=g) for g in generators])
    cond, uncond = (p.expand(2, -1, -1) for p in prompts)
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps_u = model.predict_mask(recomputed, t, uncond, masks(2))
            eps_c = model.predict_mask(recomputed, t, cond, masks(2))
            eps = eps_u + 9.0 * (eps_c - eps_u)
            recomputed = scheduler.step(eps, t, recomputed, generator=generators).prev_sample
    torch.testing.assert_close(latents, recomputed, rtol=1e-4, atol=1e-5)


def test_schedules_survive_an_export_and_ddim_ends_on_x0(tmp_path) -> None:
    """A saved noise schedule states "leading": the solvers, reloaded, started at t=941 (20
    steps) or 501 (1 step) and sampled other images than the model before its export."""
    from diffusers import DDPMScheduler

    method_noise_scheduler().save_pretrained(tmp_path)
    before = SimpleNamespace(noise_scheduler=method_noise_scheduler())
    after = SimpleNamespace(noise_scheduler=DDPMScheduler.from_pretrained(tmp_path))
    for name in SCHEDULERS:
        lowest, highest = step_range(name, 1000)
        for steps in (lowest, 20, 50, highest):
            schedules = []
            for model in (before, after):
                scheduler = make_scheduler(name, model)
                scheduler.set_timesteps(steps)
                schedules.append(scheduler.timesteps.tolist())
            assert schedules[0] == schedules[1], (name, steps)
            if name != "ddim":
                assert schedules[0][0] == 999, (name, steps)
            else:  # the step after the last lands below t=0: its output is x0
                assert schedules[0][-1] - 1000 // steps < 0 and len(schedules[0]) == steps
    with pytest.raises(SiamdiffError, match=r"ddim samples in 2\.\.500 steps, got 1"):
        model = tiny_model()
        ddim_sample(model, torch.zeros(1, 3, 16, 16), *([torch.zeros(1, 8, 32)] * 2), steps=1)

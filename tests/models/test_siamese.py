"""Siamese-Diffusion loss terms on the tiny backbone, checked against hand computations."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from siamdiff.errors import SiamdiffError
from siamdiff.models.backbone import build_backbone, freeze_for_training
from siamdiff.models.siamese import SiameseDiffusion, noise_consistency_loss
from siamdiff.models.unet_parts import encode

PROMPT = "a polyp"
T = torch.tensor([10, 150, 200, 201, 900])  # three samples at t <= 200, two above


def wake_zero_convs(model: SiameseDiffusion, std: float = 0.1) -> None:
    """Randomise the zero-initialised layers, as training would, so that hints matter."""
    controlnet = model.controlnet
    for module in (
        controlnet.controlnet_down_blocks,
        controlnet.controlnet_mid_block,
        controlnet.controlnet_cond_embedding.conv_out,
    ):
        for param in module.parameters():
            nn.init.normal_(param, std=std)


def tiny_model(
    mode: str = "siamese", seed: int = 0, prediction_type: str = "epsilon"
) -> SiameseDiffusion:
    """The tiny backbone, frozen for training, with its zero convs woken."""
    cfg = {"kind": "tiny", "prompt": PROMPT, "seed": seed, "prediction_type": prediction_type}
    backbone = build_backbone(cfg, latent_channels=4)
    freeze_for_training(backbone)
    model = SiameseDiffusion(backbone, mode=mode)
    torch.manual_seed(seed)
    wake_zero_convs(model)
    return model


def fixed_batch(size: int = 5, seed: int = 0) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "z0": torch.randn(size, 4, 4, 4, generator=gen),
        "mask_hint": (torch.rand(size, 1, 32, 32, generator=gen) > 0.5)
        .float()
        .expand(-1, 3, -1, -1),
        "image_hint": torch.rand(size, 3, 32, 32, generator=gen),
        "noise": torch.randn(size, 4, 4, 4, generator=gen),
    }


def run_loss(
    model: SiameseDiffusion,
    batch: dict[str, Tensor],
    context: Tensor,
    *,
    progress: float = 0.5,
    timesteps: Tensor = T,
    consistency_weight: float = 1.0,
) -> dict[str, Tensor]:
    return model.loss_terms(
        batch["z0"],
        batch["mask_hint"],
        batch["image_hint"],
        context,
        progress=progress,
        consistency_weight=consistency_weight,
        noise=batch["noise"],
        timesteps=timesteps,
    )


def alpha_bar(t: Tensor) -> Tensor:
    """method.md's schedule by hand: scaled-linear betas 0.00085..0.012 over T=1000."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)[t].float().view(-1, 1, 1, 1)


def eps_under(model: SiameseDiffusion, zt: Tensor, t: Tensor, context: Tensor, down, mid) -> Tensor:
    return model.unet(
        zt,
        t,
        encoder_hidden_states=context,
        down_block_additional_residuals=down,
        mid_block_additional_residual=mid,
    ).sample


def test_consistency_loss_value_and_stop_gradient() -> None:
    eps_mask = torch.tensor([1.0, 2.0], requires_grad=True)
    eps_image = torch.tensor([0.0, 4.0], requires_grad=True)
    loss = noise_consistency_loss(eps_mask, eps_image)
    assert loss.item() == pytest.approx((1 + 4) / 2)
    loss.backward()
    assert torch.equal(eps_mask.grad, torch.tensor([1.0, -2.0]))  # d/dx mean((x - y)^2)
    assert eps_image.grad is None  # sg(eps_mix): the target carries no gradient


@torch.no_grad()
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_terms_match_hand_computation(prediction_type: str) -> None:
    model = tiny_model(prediction_type=prediction_type)
    batch = fixed_batch()
    z0, noise, mask, image = batch["z0"], batch["noise"], batch["mask_hint"], batch["image_hint"]
    context = model.text([PROMPT, "", PROMPT, PROMPT, ""])
    progress, weight = 0.6, 0.7
    terms = run_loss(model, batch, context, progress=progress, consistency_weight=weight)

    a = alpha_bar(T)
    zt = a.sqrt() * z0 + (1 - a).sqrt() * noise

    def target(x0: Tensor, t_keep: Tensor | slice = slice(None)) -> Tensor:  # eps, or v
        if prediction_type == "epsilon":
            return noise[t_keep]
        return a[t_keep].sqrt() * noise[t_keep] - (1 - a[t_keep]).sqrt() * x0

    down_m, mid_m = model.controlnet(zt, T, context, mask, return_dict=False)
    down_i, mid_i = model.controlnet(zt, T, context, image, return_dict=False)
    eps_m = eps_under(model, zt, T, context, down_m, mid_m)
    mixed_down = [m + progress * i for m, i in zip(down_m, down_i, strict=True)]
    eps_mix = eps_under(model, zt, T, context, mixed_down, mid_m + progress * mid_i)
    # Augmentation on t <= 200 only: z0' from eps_mix, re-noised with the same t and eps.
    keep = T <= 200
    if prediction_type == "epsilon":
        z0_pred = (zt - (1 - a).sqrt() * eps_mix) / a.sqrt()
    else:
        z0_pred = a.sqrt() * zt - (1 - a).sqrt() * eps_mix
    zt_aug = (a.sqrt() * z0_pred + (1 - a).sqrt() * noise)[keep]
    down_a, mid_a = model.controlnet(zt_aug, T[keep], context[keep], mask[keep], return_dict=False)
    eps_aug = eps_under(model, zt_aug, T[keep], context[keep], down_a, mid_a)

    expected = {
        "mask": (eps_m - target(z0)).pow(2).mean(),
        "image": (eps_mix - target(z0)).pow(2).mean(),
        "consistency": (eps_m - eps_mix).pow(2).mean(),
        # Per-sample losses, the samples with t > 200 counting as 0 (the authors' weighting).
        "augment": (eps_aug - target(z0_pred[keep], keep)).pow(2).flatten(1).mean(1).sum() / len(T),
    }
    expected["loss"] = (
        expected["mask"]
        + expected["image"]
        + weight * expected["consistency"]
        + expected["augment"]
    )
    assert terms.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(terms[name], value, rtol=1e-4, atol=1e-6, msg=name)
    assert terms["consistency"] > 0


@torch.no_grad()
def test_branches_agree_at_zero_image_weight_only() -> None:
    model = tiny_model()
    batch = fixed_batch(size=2)
    zt, t = batch["z0"][:2], T[:2]
    context = model.text([PROMPT, PROMPT])
    mask_control = model.control(zt, t, context, batch["mask_hint"])
    eps_mask = model.denoise(zt, t, context, mask_control)
    assert torch.equal(eps_mask, model.predict_mask(zt, t, context, batch["mask_hint"]))
    features = encode(model.unet, zt, t, context)
    image = batch["image_hint"]
    at_zero = model.predict_image(zt, t, context, image, mask_control, 0.0, features)
    torch.testing.assert_close(at_zero, eps_mask, rtol=0, atol=1e-6)
    at_half = model.predict_image(zt, t, context, image, mask_control, 0.5, features)
    assert (at_half - eps_mask).abs().max() > 1e-3


@pytest.mark.parametrize("checkpointing", [False, True])
def test_image_branch_trains_only_the_controlnet(checkpointing: bool) -> None:
    model = tiny_model()
    if checkpointing:
        model.unet.enable_gradient_checkpointing()
        model.controlnet.enable_gradient_checkpointing()
    batch = fixed_batch()
    batch["mask_hint"] = batch["mask_hint"].clone().requires_grad_()
    batch["image_hint"].requires_grad_()
    terms = run_loss(model, batch, model.text([PROMPT] * 5))
    terms["image"].backward(retain_graph=True)
    assert model.unet.is_gradient_checkpointing == checkpointing
    assert all(p.grad is None for p in model.unet.parameters())
    assert all(p.grad is None for p in model.text.parameters())
    # c_mix = sg(c_m) + w_i * c_i: the mask control is a constant for L_i.
    assert batch["mask_hint"].grad is None
    assert batch["image_hint"].grad.abs().sum() > 0
    hint_encoder = model.controlnet.controlnet_cond_embedding
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in hint_encoder.parameters())
    # The mask branch, by contrast, trains the UNet decoder too.
    terms["mask"].backward()
    assert model.unet.conv_out.weight.grad.abs().sum() > 0


def test_optimizer_steps_change_trainable_and_keep_frozen_bit_identical() -> None:
    model = tiny_model()
    trainable = [p for p in model.parameters() if p.requires_grad]
    trainable_ids = {id(p) for p in trainable}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(trainable, lr=1e-3, weight_decay=1e-2)
    batch = fixed_batch()
    for _ in range(2):
        terms = run_loss(model, batch, model.text([PROMPT, "", PROMPT, "", ""]), progress=0.5)
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
    frozen = [name for name, p in model.named_parameters() if id(p) not in trainable_ids]
    assert any(name.startswith("unet.down_blocks") for name in frozen)
    for name, param in model.named_parameters():
        changed = not torch.equal(param, before[name])
        assert changed == (id(param) in trainable_ids), name


@pytest.mark.parametrize(
    ("progress", "timesteps", "active"),
    [
        (0.33, T, False),  # before 1/3 of training
        (1 / 3, T, False),  # "after 1/3" is strict
        (0.34, torch.tensor([201, 500, 999, 300, 250]), False),  # no sample with t <= 200
        (0.34, T, True),
    ],
)
@torch.no_grad()
def test_augment_term_only_after_a_third_and_for_small_t(
    progress: float, timesteps: Tensor, active: bool
) -> None:
    model = tiny_model()
    batch = fixed_batch()
    context = model.text([PROMPT] * 5)
    terms = run_loss(model, batch, context, progress=progress, timesteps=timesteps)
    assert (terms["augment"] > 0) == active
    if active:
        # Samples with t > 200 do not enter the term: changing them changes nothing.
        shifted = {**batch, "z0": batch["z0"].clone()}
        shifted["z0"][timesteps > 200] += 5.0
        again = run_loss(model, shifted, context, progress=progress, timesteps=timesteps)
        torch.testing.assert_close(again["augment"], terms["augment"])
        assert not torch.allclose(again["mask"], terms["mask"])


def test_augment_term_trains_mask_diffusion_on_a_constant_re_noised_estimate() -> None:
    """L_aug's input sg(zt') is Image-Diffusion's estimate made a constant: the term's
    gradient reaches neither the image hint nor what only the image branch uses."""
    model = tiny_model()
    batch = fixed_batch()
    batch["image_hint"].requires_grad_()
    terms = run_loss(model, batch, model.text([PROMPT] * 5), progress=0.34)
    terms["augment"].backward()
    assert batch["image_hint"].grad is None
    assert model.unet.conv_out.weight.grad.abs().sum() > 0  # Mask-Diffusion learns from it


@torch.no_grad()
def test_mask_only_mode_has_only_the_mask_term() -> None:
    model = tiny_model(mode="mask-only")
    batch = fixed_batch()
    # No image hint at all: mask-only training never looks at it.
    terms = run_loss(model, {**batch, "image_hint": None}, model.text([PROMPT] * 5), progress=0.9)
    assert terms["mask"] > 0
    assert terms["image"] == terms["consistency"] == terms["augment"] == 0
    assert torch.equal(terms["loss"], terms["mask"])


def test_unknown_mode_is_rejected() -> None:
    with pytest.raises(SiamdiffError, match="unknown model mode 'image-only'"):
        tiny_model(mode="image-only")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_predictions_convert_to_x0_and_eps_exactly(prediction_type: str) -> None:
    model = tiny_model(prediction_type=prediction_type)
    batch = fixed_batch()
    z0, noise = batch["z0"], batch["noise"]
    zt = model.noise_scheduler.add_noise(z0, noise, T)
    exact = model.target(z0, noise, T)  # what a perfect network would output
    torch.testing.assert_close(model.predict_x0(zt, T, exact), z0, rtol=0, atol=1e-4)
    torch.testing.assert_close(model.predict_eps(zt, T, exact), noise, rtol=0, atol=1e-5)
    if prediction_type == "epsilon":
        assert torch.equal(exact, noise)
    else:  # v = sqrt(a) eps - sqrt(1 - a) z0: nearly -z0 at t = 900, nearly eps at t = 10
        a = alpha_bar(T)
        torch.testing.assert_close(exact, a.sqrt() * noise - (1 - a).sqrt() * z0)

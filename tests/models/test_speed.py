"""Speed levers: each computes what the plain model computes (tiny backbone, CPU)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from siamdiff.bench import PRESETS, build, make_batch, siamdiff_loss
from siamdiff.errors import SiamdiffError
from siamdiff.models.siamese import SiameseDiffusion
from siamdiff.models.speed import apply_levers, compiled_regions, parse_levers
from siamdiff.sample import ddim_sample

BATCH = 4


def step_and_sample(model: SiameseDiffusion, bf16: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Loss and gradients of a training step past 1/3 (every term on), and a 3-step sample."""
    b = make_batch(model, PRESETS["tiny"], BATCH, "cpu")
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = siamdiff_loss(model, b, 0.5)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    generators = [torch.Generator().manual_seed(i) for i in range(BATCH)]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        latents = ddim_sample(
            model,
            b["mask_hint"],
            b["context"],
            torch.zeros_like(b["context"]),
            steps=3,
            generator=generators,
        )
    return loss.detach().float(), grads.float(), latents


def tiny(levers: tuple[str, ...] = ()) -> SiameseDiffusion:
    model, vae = build(PRESETS["tiny"], "cpu")  # UNet encoder frozen, as for SD1.5 weights
    # Norm weights as trained ones are, not the initial 1 and 0 that any rounding keeps.
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            for parameter in module.parameters(recurse=False):
                parameter.data += 0.1 * torch.randn(parameter.shape, generator=generator)
    # aot_eager: dynamo and autograd tracing of every region as inductor gets them, without
    # the C++ kernel builds (minutes on CI's 2 cores, cold); the bench checks inductor's
    # numbers on the GPU, lever by lever.
    apply_levers(model, levers, vae, compile_backend="aot_eager")
    return model


def test_levers_parse_from_lists_and_comma_strings_in_one_order() -> None:
    assert parse_levers("compile, channels_last") == ("channels_last", "compile")
    assert parse_levers(["bf16_frozen"]) == ("bf16_frozen",)
    assert parse_levers(None) == parse_levers("") == ()
    with pytest.raises(SiamdiffError, match=r"unknown speed lever 'cuda_graphs' \(choose from"):
        parse_levers("cuda_graphs,compile")


@pytest.mark.parametrize("levers", [("channels_last",), ("channels_last", "compile")])
def test_fp32_levers_give_the_plain_models_losses_gradients_and_samples(levers) -> None:
    plain = step_and_sample(tiny())
    model = tiny(levers)
    fast = step_and_sample(model)
    torch.testing.assert_close(fast[0], plain[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast[1], plain[1], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fast[2], plain[2], rtol=1e-4, atol=1e-4)
    conv = model.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    # Compiled in place: the state dict's names (checkpoints, exports) do not change.
    assert list(model.state_dict()) == list(tiny().state_dict())


def test_compile_wraps_every_unet_and_controlnet_block() -> None:
    model = tiny(("compile",))
    regions = compiled_regions(model)
    assert len(regions) == 2 * 2 + 2 + 2 + 1  # down blocks and mid of both, up blocks, DHI body
    assert all(region._compiled_call_impl is not None for region in regions)


def test_bf16_frozen_weights_give_the_same_numbers_under_bf16_autocast() -> None:
    plain = step_and_sample(tiny(), bf16=True)
    model = tiny(("bf16_frozen",))
    frozen = {
        type(m): m.weight.dtype for m in model.unet.down_blocks.modules() if hasattr(m, "weight")
    }
    assert frozen[torch.nn.Conv2d] == frozen[torch.nn.Linear] == torch.bfloat16
    assert frozen[torch.nn.GroupNorm] == frozen[torch.nn.LayerNorm] == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    fast = step_and_sample(model, bf16=True)
    # Autocast rounds the same weights to bf16 on the fly and runs norms in fp32: bit-identical.
    assert torch.equal(fast[0], plain[0]) and torch.equal(fast[1], plain[1])
    assert fast[2].dtype == torch.float32  # the scheduler's latents stay fp32
    assert torch.equal(fast[2], plain[2])

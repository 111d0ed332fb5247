"""Speed levers for training and sampling, each off by default, each measured on its own by
``python -m siamdiff.bench --speed ...`` (docs/performance.md).

- ``channels_last``: NHWC layout for every convolution weight, and so for the activations they
  produce. Tensor-core convolutions (cuDNN) run natively in NHWC; in NCHW each one pays layout
  transposes.
- ``bf16_frozen``: the weights of linear and convolution layers that do not train are stored
  in bf16. Under bf16 autocast each matmul or convolution casts its weight to bf16 on every
  call (autocast caches the cast only for weights that require grad); stored in bf16 they are
  read once per use, at half the memory, and give the same numbers. Norm layers and
  embeddings stay fp32: autocast runs norms in fp32 and leaves embeddings alone, so rounding
  their weights would change results. Needs bf16 autocast around every forward pass.
  Checkpoints and exports of such a run hold those frozen weights as stored, rounded to bf16
  (8 mantissa bits; SD's published fp16 weights have 10); resuming without the lever keeps
  the rounded values.
- ``compile``: ``torch.compile`` of each UNet and ControlNet block and of the DHI body, in place
  ("regional" compilation). The repeated blocks compile in seconds rather than the whole graph
  in minutes, parameter names stay as they are (checkpoints and exports unchanged), and the
  data-dependent Python around them (the augmentation term's subset, the DHI reuse during
  sampling, the image branch's detached weights) stays eager.

The levers change how the same numbers are computed, not what is computed: outputs agree with
the plain model to float (bf16) rounding, which the bench reports for every lever.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from siamdiff.errors import SiamdiffError
from siamdiff.models.siamese import SiameseDiffusion

LEVERS = ("channels_last", "bf16_frozen", "compile")
# Each block class's forward is one code object for dynamo, cached per instance (shapes),
# grad mode, batch size and weight layout: an SD1.5 UNet needs more entries than the default 8.
RECOMPILE_LIMIT = 64
# The layers bf16 autocast computes in bf16, casting their weights on every call.
AUTOCAST_BF16_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d)


def parse_levers(levers: Iterable[str] | str | None) -> tuple[str, ...]:
    """Lever names from a list or a comma-separated string, in :data:`LEVERS` order."""
    if levers is None:
        return ()
    names = [name.strip() for name in (levers.split(",") if isinstance(levers, str) else levers)]
    names = [name for name in names if name]
    unknown = sorted(set(names) - set(LEVERS))
    if unknown:
        raise SiamdiffError(
            f"unknown speed lever {', '.join(map(repr, unknown))} (choose from {', '.join(LEVERS)})"
        )
    return tuple(name for name in LEVERS if name in names)


def compiled_regions(model: SiameseDiffusion) -> list[nn.Module]:
    """The blocks ``compile`` compiles: where nearly all of a pass's FLOPs are."""
    regions: list[nn.Module] = []
    for network in (model.unet, model.controlnet):
        regions += [*network.down_blocks, network.mid_block]
    regions += list(model.unet.up_blocks)
    regions.append(model.controlnet.controlnet_cond_embedding.body)
    return regions


def apply_levers(
    model: SiameseDiffusion,
    levers: Iterable[str] | str | None,
    *extra: nn.Module,
    compile_backend: str = "inductor",
) -> tuple[str, ...]:
    """Apply ``levers`` to ``model`` in place (``channels_last`` also to the ``extra`` modules,
    e.g. the VAE); returns the levers applied. Call after freezing: ``bf16_frozen`` casts the
    parameters that do not require grad at the time of the call. ``compile_backend`` is
    torch.compile's (``aot_eager`` traces and runs the same graphs without generating kernels:
    seconds instead of minutes on a CPU, for checking the plumbing)."""
    chosen = parse_levers(levers)
    if "channels_last" in chosen:
        for module in (model, *extra):
            module.to(memory_format=torch.channels_last)
    if "bf16_frozen" in chosen:
        for module in model.modules():
            if isinstance(module, AUTOCAST_BF16_LAYERS):
                for parameter in module.parameters(recurse=False):
                    if not parameter.requires_grad:
                        parameter.data = parameter.data.to(torch.bfloat16)
    if "compile" in chosen:
        torch._dynamo.config.recompile_limit = max(
            torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT
        )
        for region in compiled_regions(model):
            region.compile(backend=compile_backend)
    return chosen

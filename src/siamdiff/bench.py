"""``python -m siamdiff.bench``: siamdiff's training step and sampler against a naive reference.

One process measures, on the current device:

- the Siamese training step (forward, backward, AdamW) of siamdiff and of a naive reference
  (:func:`naive_siamese_loss`: the authors' step written with diffusers modules: the image
  branch recomputes the mask control on a deep copy of the ControlNet and runs a deep copy of
  the whole UNet; the augmentation term runs on the whole batch and is zeroed where t > 200):
  images/s, peak memory, FLOPs per step, model FLOP utilisation (MFU) against a measured
  matmul peak, and how far the two steps' losses and gradients differ;
- Mask-Diffusion sampling (DDIM, guidance 9) with VAE decode: siamdiff's
  :func:`~siamdiff.sample.ddim_sample` (conditional and unconditional passes in one batch)
  against a loop that runs them one after the other, as the authors' sampler does;
- the same for siamdiff with each speed lever of :mod:`siamdiff.models.speed` added in turn
  (``--speed``; all of them by default on CUDA), against the same naive reference;
- FLOPs per training step at the full SD1.5 size, counted on the ``meta`` device (no memory,
  no compute), so the FLOP ratio is known on any machine.

Weights are random (speed does not depend on them). ``--preset sd15`` is the SD1.5
architecture (UNet 860M + DHI ControlNet, 512 px); ``tiny`` is the CPU-sized backbone (CI's
smoke run). Writes ``bench/results/<device>-<date>.json`` and ``.md`` (the table) after each
variant, and prints the table.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import math
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from siamdiff import __version__
from siamdiff.atomic import atomic_write_json, atomic_write_text, check_writable_file
from siamdiff.cli import at_least
from siamdiff.errors import SiamdiffError, compile_failure
from siamdiff.models.autoencoder import random_kl_vae
from siamdiff.models.backbone import (
    Backbone,
    DHIControlNetModel,
    LearnedTextConditioner,
    build_backbone,
    freeze_for_training,
    method_noise_scheduler,
)
from siamdiff.models.siamese import (
    Control,
    SiameseDiffusion,
    controlled_prediction,
    denoising_loss,
    mix_controls,
)
from siamdiff.models.speed import LEVERS, apply_levers, parse_levers
from siamdiff.models.unet_parts import encode
from siamdiff.runtime import device_label
from siamdiff.sample import ddim_sample, make_scheduler

AUG_PROGRESS = 0.5  # a step after 1/3 of training: every loss term is active
# The largest difference to the naive reference, relative to the reference's largest value,
# that still counts as the same computation: one step's loss, gradients and eps differ by
# rounding alone (bf16 autocast on CUDA: a few units of its 2^-7 precision; fp32 on CPU);
# images after 50 guided DDIM steps, where guidance multiplies every difference, by more.
TOLERANCE = {"cuda": {"step": 2**-5, "image": 2**-4}, "cpu": {"step": 1e-4, "image": 1e-3}}
META = torch.device("meta")  # FLOPs counted without memory or compute


@dataclass(frozen=True)
class Preset:
    name: str
    resolution: int  # hint / image side in pixels; latents are resolution / 8
    context_tokens: int
    train_batches: tuple[int, ...]
    sample_batches: tuple[int, ...]


PRESETS = {
    "sd15": Preset("sd15", 512, 77, (8, 16), (8, 32)),
    "tiny": Preset("tiny", 64, 8, (2, 4), (2, 4)),
}


def sd15_backbone(device: str | torch.device = "cpu") -> Backbone:
    """The SD1.5 UNet architecture (random weights) with siamdiff's DHI ControlNet."""
    with torch.device(device):
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
        controlnet = DHIControlNetModel.from_unet(
            unet, dhi_base_channels=16, load_weights_from_unet=str(device) != "meta"
        )
        text = LearnedTextConditioner(["bench"], dim=768)
    return Backbone(unet, controlnet, text, method_noise_scheduler())


def sd15_vae() -> AutoencoderKL:
    """Stable Diffusion's VAE architecture, random weights."""
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
    )


def build(preset: Preset, device: str | torch.device) -> tuple[SiameseDiffusion, AutoencoderKL]:
    """The preset's Siamese model (sd15: encoder frozen, as for pretrained weights) and VAE."""
    torch.manual_seed(0)
    if preset.name == "sd15":
        backbone, vae = sd15_backbone(device), sd15_vae()  # built in place: 1.2B parameters
    else:
        backbone, vae = build_backbone({"kind": "tiny"}, latent_channels=4), random_kl_vae()
    freeze_for_training(backbone, train_unet_encoder=False)
    backbone.text.requires_grad_(False)  # the bench feeds the text context directly
    with torch.no_grad():  # wake the zero-initialised convs, or the image branch adds nothing
        for parameter in backbone.controlnet.parameters():
            if not parameter.any():
                parameter.normal_(std=0.02)
    model = SiameseDiffusion(backbone).to(device)
    return model, vae.to(device).requires_grad_(False).eval()


def make_batch(
    model: SiameseDiffusion, preset: Preset, batch: int, device: str | torch.device
) -> dict[str, Tensor]:
    """Latents, hints, context, noise and timesteps. t is evenly spaced over [0, 999]: 1/2,
    1/4, 1/4, 1/4 of batches 2, 4, 8, 16 fall at t <= 200, at or above the 20 % of training's
    uniform t, so the augmentation term's cost is never under-timed."""
    gen = torch.Generator().manual_seed(batch)
    side = preset.resolution // 8
    width = model.unet.config.cross_attention_dim

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen).to(device)

    mask = torch.rand(batch, 1, preset.resolution, preset.resolution, generator=gen) > 0.5
    return {
        "z0": randn(batch, 4, side, side),
        "noise": randn(batch, 4, side, side),
        "mask_hint": mask.float().expand(-1, 3, -1, -1).to(device),
        "image_hint": torch.rand(batch, 3, preset.resolution, preset.resolution, generator=gen).to(
            device
        ),
        "context": randn(batch, preset.context_tokens, width),
        "timesteps": torch.linspace(0, 999, batch).long().to(device),
    }


# ---- the two training steps ------------------------------------------------------------------


def siamdiff_loss(model: SiameseDiffusion, b: dict[str, Tensor], progress: float) -> Tensor:
    terms = model.loss_terms(
        b["z0"],
        b["mask_hint"],
        b["image_hint"],
        b["context"],
        progress=progress,
        consistency_weight=1.0,
        noise=b["noise"],
        timesteps=b["timesteps"],
    )
    return terms["loss"]


def naive_branch_predictions(
    model: SiameseDiffusion, b: dict[str, Tensor], zt: Tensor, progress: float
) -> tuple[Tensor, Tensor]:
    """Mask- and Image-Diffusion's predictions the straightforward way: the mask control run
    twice, each branch a whole UNet pass, the networks copied per step (the authors' code)."""
    t, context = b["timesteps"], b["context"]
    mask_prediction = model.predict_mask(zt, t, context, b["mask_hint"])
    controlnet_copy = copy.deepcopy(model.controlnet).requires_grad_(False)
    unet_copy = copy.deepcopy(model.unet)  # its decoder still requires grad: wasted work
    with torch.no_grad():
        down, mid = controlnet_copy(
            zt, t, context, b["mask_hint"], return_dict=False
        )  # the mask control, a second time
    image_control = model.control(zt, t, context, b["image_hint"])
    mixed = mix_controls(Control(tuple(down), mid), image_control, progress)
    return mask_prediction, controlled_prediction(unet_copy, zt, t, context, mixed)


def naive_siamese_loss(model: SiameseDiffusion, b: dict[str, Tensor], progress: float) -> Tensor:
    """The same loss as :meth:`SiameseDiffusion.loss_terms`, computed the straightforward way."""
    zt = model.noise_scheduler.add_noise(b["z0"], b["noise"], b["timesteps"])
    t, context, noise = b["timesteps"], b["context"], b["noise"]
    target = model.target(b["z0"], noise, t)
    mask_prediction, image_prediction = naive_branch_predictions(model, b, zt, progress)
    loss = (
        denoising_loss(mask_prediction, target)
        + denoising_loss(image_prediction, target)
        + F.mse_loss(mask_prediction.float(), image_prediction.detach().float())
    )
    if progress > model.aug_start:
        x0 = model.predict_x0(zt, t, image_prediction).detach()
        renoised = model.noise_scheduler.add_noise(x0, noise, t)
        augmented = model.predict_mask(renoised, t, context, b["mask_hint"])
        per_sample = (augmented.float() - model.target(x0, noise, t).float()).pow(2).flatten(1)
        loss = loss + (per_sample.mean(1) * (t <= model.aug_t_max)).mean()
    return loss


LossFn = Callable[[SiameseDiffusion, dict[str, Tensor], float], Tensor]
STEPS: dict[str, LossFn] = {
    "naive": naive_siamese_loss,
    "siamdiff": siamdiff_loss,
}


# ---- measuring -------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def autocast(device: torch.device) -> Iterator[None]:
    """bf16 autocast on CUDA (both implementations); fp32 on CPU."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        yield


def count_flops(fn: Callable[[], Any], device: torch.device) -> int:
    # The counter has no formula for the CPU flash-attention kernel (it would count attention
    # as 0 FLOPs): on CPU the counted pass runs the math kernel, the same FLOPs.
    kernel = sdpa_kernel(SDPBackend.MATH) if device.type == "cpu" else nullcontext()
    with kernel, FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def seconds_per_call(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / iters


def matmul_peak_flops(device: torch.device) -> float:
    """Measured dense matmul throughput (bf16 on CUDA, fp32 on CPU): the MFU denominator."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    seconds = seconds_per_call(lambda: a @ b, device, warmup=2, iters=10)
    return 2 * n**3 / seconds


GIB = 2**30  # every memory figure, peak or AdamW state, in GiB (what nvidia-smi calls MiB x 1024)


def peak_memory_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def relative_difference(a: Tensor, b: Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


class StepOutputs(NamedTuple):
    """What one implementation's step computes, on the CPU (kept out of the peak memory of
    the steps measured after it): the loss, the trainable parameters' gradients, and both
    branches' noise estimates (eps), concatenated."""

    loss: Tensor
    grads: Tensor
    eps: Tensor


def step_outputs(
    model: SiameseDiffusion, b: dict[str, Tensor], naive: bool, device: torch.device
) -> StepOutputs:
    model.zero_grad(set_to_none=True)
    with autocast(device):
        loss = (naive_siamese_loss if naive else siamdiff_loss)(model, b, AUG_PROGRESS)
    loss.backward()
    grads = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.requires_grad])
    model.zero_grad(set_to_none=True)
    t, zt = b["timesteps"], model.noise_scheduler.add_noise(b["z0"], b["noise"], b["timesteps"])
    with torch.no_grad(), autocast(device):
        if naive:
            predictions = naive_branch_predictions(model, b, zt, AUG_PROGRESS)
        else:
            hints = (b["mask_hint"], b["image_hint"])
            predictions = model.branch_predictions(zt, t, b["context"], *hints, AUG_PROGRESS)
        eps = torch.cat([model.predict_eps(zt, t, p).float().flatten() for p in predictions])
    return StepOutputs(loss.detach().float().cpu(), grads.cpu(), eps.cpu())


@dataclass
class Bench:
    """What every measurement of one run shares."""

    model: SiameseDiffusion
    vae: AutoencoderKL
    preset: Preset
    device: torch.device
    peak_flops: float
    warmup: int
    iters: int
    sample_steps: int
    guidance: float


def bench_training(
    bench: Bench, row: dict[str, Any], variant: str, reference: StepOutputs | None
) -> StepOutputs:
    """Measure ``variant`` (naive, siamdiff or siamdiff with levers) at ``row["batch"]`` into
    ``row[variant]``; returns what its step computes. ``reference`` is the naive step's: the
    variant's distance to it is reported, and judged against :data:`TOLERANCE`. FLOPs are
    counted on the plain implementations (the levers change how, not what, is computed)."""
    model, device, batch = bench.model, bench.device, row["batch"]
    b = make_batch(model, bench.preset, batch, device)
    loss_fn = naive_siamese_loss if variant == "naive" else siamdiff_loss
    result = step_outputs(model, b, variant == "naive", device)
    # lr 0: every variant times the same update on the same weights.
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=0.0,
        fused=variant != "naive" and device.type == "cuda",
    )

    def step() -> None:
        with autocast(device):
            loss = loss_fn(model, b, AUG_PROGRESS)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    flops = count_flops(step, device) if variant in STEPS else row["siamdiff"]["flops_per_step"]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = seconds_per_call(step, device, bench.warmup, bench.iters)
    row[variant] = {
        "images_per_s": batch / seconds,
        "seconds_per_step": seconds,
        "flops_per_step": flops,
        "mfu": flops / seconds / bench.peak_flops,
        "peak_memory_gb": peak_memory_gb(device),
    }
    if reference is not None:
        differences = {
            f"{name}_relative_difference": relative_difference(mine, naive)
            for name, mine, naive in zip(("loss", "grad", "eps"), result, reference, strict=True)
        }
        row[variant] |= differences | {
            "speedup": row[variant]["images_per_s"] / row["naive"]["images_per_s"],
            "within_tolerance": max(differences.values()) <= TOLERANCE[device.type]["step"],
        }
    return result


def naive_sample(
    model: SiameseDiffusion,
    mask_hint: Tensor,
    cond: Tensor,
    uncond: Tensor,
    noise: Tensor,
    steps: int,
    guidance: float,
) -> Tensor:
    """DDIM with the conditional and unconditional passes run one after the other."""
    scheduler = make_scheduler("ddim", model)
    scheduler.set_timesteps(steps, device=mask_hint.device)
    latents = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        pred_cond = model.predict_mask(latents, t, cond, mask_hint)
        guided = pred_cond
        if guidance != 1.0:  # the authors' sampler, too, skips the unconditional pass at 1
            pred_uncond = model.predict_mask(latents, t, uncond, mask_hint)
            guided = pred_uncond + guidance * (pred_cond - pred_uncond)
        latents = scheduler.step(guided, t, latents).prev_sample
    return latents


@torch.no_grad()
def bench_sampling(
    bench: Bench, row: dict[str, Any], variant: str, reference: Tensor | None
) -> Tensor:
    """Time one sampling run of ``variant`` into ``row[variant]`` (long enough to need no
    repeats; a 2-step run first warms kernels, allocator and compiled code up); returns its
    images, whose distance to the naive sampler's (``reference``) is reported."""
    model, vae, device = bench.model, bench.vae, bench.device
    batch, guidance = row["batch"], bench.guidance
    b = make_batch(model, bench.preset, batch, device)
    cond, uncond = b["context"], torch.zeros_like(b["context"])
    seeds = [torch.Generator(device).manual_seed(i) for i in range(batch)]
    noise = torch.stack([torch.randn(b["z0"].shape[1:], generator=g, device=device) for g in seeds])

    def sample(steps: int) -> Tensor:
        with autocast(device):
            if variant == "naive":
                latents = naive_sample(model, b["mask_hint"], cond, uncond, noise, steps, guidance)
            else:
                generators = [torch.Generator(device).manual_seed(i) for i in range(batch)]
                latents = ddim_sample(
                    model,
                    b["mask_hint"],
                    cond,
                    uncond,
                    steps=steps,
                    guidance=guidance,
                    generator=generators,
                )
            return vae.decode(latents.float() / vae.config.scaling_factor).sample.float()

    if bench.warmup:
        sample(2)
    synchronize(device)  # the warm-up's kernels finish outside the timed run
    start = time.perf_counter()
    images = sample(bench.sample_steps)
    synchronize(device)
    seconds = time.perf_counter() - start
    row[variant] = {"images_per_s": batch / seconds, "seconds_per_batch": seconds}
    if reference is not None:
        relative = relative_difference(images.cpu(), reference)
        row[variant] |= {
            "speedup": row[variant]["images_per_s"] / row["naive"]["images_per_s"],
            "image_max_abs_difference": float((images.cpu() - reference).abs().max()),
            "image_relative_difference": relative,
            "within_tolerance": relative <= TOLERANCE[device.type]["image"],
        }
    return images.cpu()


def meta_flops(batch: int = 8) -> dict[str, Any]:
    """FLOPs per Siamese step at the SD1.5 size, both phases, without memory or compute.

    Data-dependent shapes do not exist on ``meta``, so the augmentation term (a Mask-Diffusion
    forward + backward on the samples with t <= 200) is counted on its own and added: siamdiff
    runs it on the expected 201/1000 of the batch, the naive step on all of it.
    """
    backbone = sd15_backbone("meta")
    trainable = sum(p.numel() for p in freeze_for_training(backbone, train_unet_encoder=False))
    model = SiameseDiffusion(backbone)
    b = make_batch(model, PRESETS["sd15"], batch, "meta")

    def step_flops(loss_fn: Callable, progress: float) -> int:
        return count_flops(lambda: loss_fn(model, b, progress).backward(), META)

    def mask_branch_flops(n: int) -> int:
        def run() -> None:
            prediction = model.predict_mask(
                b["z0"][:n], b["timesteps"][:n], b["context"][:n], b["mask_hint"][:n]
            )
            denoising_loss(prediction, b["noise"][:n]).backward()

        return count_flops(run, META)

    kept = round(batch * 201 / 1000)
    result: dict[str, Any] = {
        "batch": batch,
        "resolution": 512,
        "augmented_samples": kept,
        "trainable_parameters": trainable,
        # AdamW's two moments: fp32 (torch) or uint8 (optim.name=adamw8bit), 8 or 2 bytes each.
        "adamw_state_gb": {"adamw": trainable * 8 / GIB, "adamw8bit": trainable * 2 / GIB},
    }
    one = {key: value[:1] for key, value in b.items()}
    parts = {
        "unet_encoder_mid": lambda: encode(model.unet, one["z0"], one["timesteps"], one["context"]),
        "unet": lambda: model.unet(one["z0"], one["timesteps"], one["context"]),
        "controlnet": lambda: model.control(
            one["z0"], one["timesteps"], one["context"], one["mask_hint"]
        ),
        "dhi": lambda: model.controlnet.controlnet_cond_embedding(one["mask_hint"]),
    }
    result["forward_gflops_per_image"] = {
        name: count_flops(part, META) / 1e9 for name, part in parts.items()
    }
    for name, loss_fn in STEPS.items():
        before = step_flops(loss_fn, 0.0)
        augment = mask_branch_flops(batch if name == "naive" else kept)
        result[name] = {
            "before_augmentation": before,
            "with_augmentation": before + augment,
            "training_average": (before + 2 * (before + augment)) / 3,
        }
    for phase in ("before_augmentation", "with_augmentation", "training_average"):
        result[f"ratio_{phase}"] = result["siamdiff"][phase] / result["naive"][phase]
    return result


# ---- the command -----------------------------------------------------------------------------


# Memory, not speed: the last training variant when asked for (sampling keeps no activations).
CHECKPOINTING = "gradient_checkpointing"


def variant_plan(
    levers: tuple[str, ...], checkpointing: bool = False
) -> list[tuple[str, tuple[str, ...]]]:
    """(variant name, lever to add before measuring it): naive, siamdiff, then one lever more
    per variant, so each lever's gain is measured on top of the ones before it. Gradient
    checkpointing (turned off again after it) comes before ``compile``, whose compilation
    may use up a time-boxed run."""
    plan: list[tuple[str, tuple[str, ...]]] = [("naive", ()), ("siamdiff", ())]
    plan += [("+".join(("siamdiff", *levers[: i + 1])), (lever,)) for i, lever in enumerate(levers)]
    if checkpointing:
        at = next((i for i, (_, lever) in enumerate(plan) if lever == ("compile",)), len(plan))
        plan.insert(at, (f"{plan[at - 1][0]}+{CHECKPOINTING}", (CHECKPOINTING,)))
    return plan


def results_path(out_dir: Path, device: str, date: str) -> Path:
    """``DEVICE-DATE.json`` in ``out_dir``, numbered (``-2``, ``-3``) after the day's first:
    a second run never replaces the results of an earlier one."""
    stem = re.sub(r"[^A-Za-z0-9]+", "-", f"{device}-{date}").strip("-").lower()
    path, number = out_dir / f"{stem}.json", 1
    while path.exists():
        number += 1
        path = out_dir / f"{stem}-{number}.json"
    return path


def run(
    preset_name: str,
    device: torch.device,
    out_dir: Path,
    *,
    train_batches: tuple[int, ...] | None = None,
    sample_batches: tuple[int, ...] | None = None,
    sample_steps: int = 50,
    guidance: float = 9.0,
    warmup: int = 2,
    iters: int = 5,
    meta: bool = True,
    levers: tuple[str, ...] = (),
    checkpointing: bool = False,
) -> tuple[dict[str, Any], Path]:
    """Every measurement; returns the results and the JSON file they were written to, which
    is rewritten after each variant (a time-boxed run keeps what it measured)."""
    preset = PRESETS[preset_name]
    model, vae = build(preset, device)
    peak = matmul_peak_flops(device)
    bench = Bench(model, vae, preset, device, peak, warmup, iters, sample_steps, guidance)
    results: dict[str, Any] = {
        "siamdiff": __version__,
        "torch": torch.__version__,
        "device": device_label(device),
        "date": dt.date.today().isoformat(),
        "preset": preset.name,
        "resolution": preset.resolution,
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "equivalence_tolerance": TOLERANCE[device.type],
        "matmul_peak_tflops": peak / 1e12,
        "speed_levers": list(levers),
        "variants": [],  # those measured so far
        "training": [{"batch": n} for n in train_batches or preset.train_batches],
        "sampling": [
            {"batch": n, "steps": sample_steps, "guidance": guidance}
            for n in sample_batches or preset.sample_batches
        ],
    }
    path = results_path(out_dir, results["device"], results["date"])

    def save() -> None:
        atomic_write_json(path, results)
        atomic_write_text(path.with_suffix(".md"), f"```\n{format_results(results)}\n```\n")

    naive_training: dict[int, StepOutputs] = {}
    naive_images: dict[int, Tensor] = {}
    for variant, lever in variant_plan(levers, checkpointing):
        for network in (model.unet, model.controlnet):
            if lever == (CHECKPOINTING,):
                network.enable_gradient_checkpointing()
            elif network.is_gradient_checkpointing:
                network.disable_gradient_checkpointing()
        apply_levers(model, tuple(x for x in lever if x != CHECKPOINTING), vae)
        for row in results["training"]:
            measured = bench_training(bench, row, variant, naive_training.get(row["batch"]))
            naive_training.setdefault(row["batch"], measured)
            if variant == "siamdiff":
                row["flop_ratio"] = (
                    row["siamdiff"]["flops_per_step"] / row["naive"]["flops_per_step"]
                )
        for row in results["sampling"] if CHECKPOINTING not in variant else ():
            measured = bench_sampling(bench, row, variant, naive_images.get(row["batch"]))
            naive_images.setdefault(row["batch"], measured)
        results["variants"].append(variant)
        save()
    if meta:
        results["sd15_meta_flops"] = meta_flops()
        save()
    return results, path


def format_results(results: dict[str, Any]) -> str:
    lines = [
        f"siamdiff bench: {results['device']}, preset {results['preset']} "
        f"({results['resolution']} px, {results['precision']}), "
        f"matmul peak {results['matmul_peak_tflops']:.2f} TFLOP/s"
    ]
    width = max(len(variant) for variant in results["variants"])
    whole_run = (
        "; the SD1.5 FLOP count below has the whole run" if "sd15_meta_flops" in results else ""
    )
    lines.append(
        f"training step (a step after 1/3 of training: the augmentation term on{whole_run})"
    )
    tolerance = results.get("equivalence_tolerance")  # absent from older versions' results
    if tolerance:
        lines.append(
            f"same computation as naive: largest difference / naive's largest value <= "
            f"{tolerance['step']:.1e} for a step, {tolerance['image']:.1e} for a sample"
        )
    lines.append(
        f"{'':15}batch  {'variant':<{width}}  img/s     speedup  MFU    peak GiB"
        "  loss / grad / eps rel. diff to naive"
    )
    for row in results["training"]:
        for variant in results["variants"]:
            m = row[variant]
            memory = "-" if m["peak_memory_gb"] is None else f"{m['peak_memory_gb']:.1f}"
            names = ("loss", "grad", "eps")
            diff = (
                " / ".join(
                    f"{m[f'{n}_relative_difference']:.1e}"
                    for n in names
                    if f"{n}_relative_difference" in m
                )
                + _verdict(m)
                if "speedup" in m
                else "-"
            )
            lines.append(
                f"{'':15}{row['batch']:>5}  {variant:<{width}}  {m['images_per_s']:>8.2f}  "
                f"{m.get('speedup', 1.0):>6.2f}x  {m['mfu']:.3f}  {memory:>7}  {diff}"
            )
        if "flop_ratio" in row:
            lines.append(f"{'':22}FLOP ratio siamdiff / naive: {row['flop_ratio']:.3f}")
    lines.append(
        f"sampling (DDIM) batch  {'variant':<{width}}  img/s     speedup  max |image diff| (rel.)"
    )
    for row in results["sampling"]:
        for variant in (v for v in results["variants"] if v in row):
            m = row[variant]
            diff = "-"
            if "speedup" in m:
                relative = m.get("image_relative_difference")
                diff = f"{m['image_max_abs_difference']:.1e}" + (
                    f" ({relative:.1e}){_verdict(m)}" if relative is not None else ""
                )
            lines.append(
                f"{'':15}{row['batch']:>5}  {variant:<{width}}  {m['images_per_s']:>8.3f}  "
                f"{m.get('speedup', 1.0):>6.2f}x  {diff}"
            )
    meta = results.get("sd15_meta_flops")
    if meta:
        lines.append(
            f"SD1.5 FLOPs per step (batch {meta['batch']}, 512 px, meta device), siamdiff / naive: "
            f"{meta['ratio_before_augmentation']:.3f} before the augmentation term starts, "
            f"{meta['ratio_with_augmentation']:.3f} with it, "
            f"{meta['ratio_training_average']:.3f} over a whole training run"
        )
        state = meta.get("adamw_state_gb")  # absent from results of older versions
        if state:
            lines.append(
                f"SD1.5 trainable parameters: {meta['trainable_parameters'] / 1e9:.3f} B; AdamW "
                f"state {state['adamw']:.1f} GiB, {state['adamw8bit']:.1f} GiB with "
                "optim.name=adamw8bit"
            )
    return "\n".join(lines)


def _verdict(measured: dict[str, Any]) -> str:
    if "within_tolerance" not in measured:
        return ""
    return "  ok" if measured["within_tolerance"] else "  OVER TOLERANCE"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m siamdiff.bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--preset",
        choices=("auto", *PRESETS),
        default="auto",
        help="auto: sd15 on CUDA, tiny on CPU",
    )
    parser.add_argument("--device", default=None, help="default: cuda when available")
    parser.add_argument("--train-batches", type=at_least(1), nargs="+", default=None)
    parser.add_argument("--sample-batches", type=at_least(1), nargs="+", default=None)
    parser.add_argument("--sample-steps", type=at_least(2), default=50, help="2 to 500 (DDIM)")
    parser.add_argument("--guidance", type=float, default=9.0)
    parser.add_argument("--warmup", type=at_least(0), default=2)
    parser.add_argument("--iters", type=at_least(1), default=5)
    parser.add_argument("--no-meta", action="store_true", help="skip the SD1.5 meta FLOP count")
    parser.add_argument(
        "--speed",
        default=None,
        help=f"speed levers to measure, one more per variant, comma-separated from "
        f"{','.join(LEVERS)} (default: all on CUDA, none on CPU; bf16_frozen needs CUDA)",
    )
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="also measure training with the UNet's and ControlNet's gradient checkpointing on "
        "top of the levers (the memory lever)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    if args.sample_steps > 500:  # DDIM over 1000 training timesteps (sample.step_range)
        parser.error(f"--sample-steps must be at most 500, got {args.sample_steps}")
    if not 0 <= args.guidance < math.inf:  # as siamdiff sample refuses it
        parser.error(f"--guidance must be a finite number >= 0, got {args.guidance}")
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as exc:
        parser.error(f"--device {args.device}: {exc}")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {args.device}: the bench measures on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA GPU here")
    preset = args.preset if args.preset != "auto" else ("sd15" if device.type == "cuda" else "tiny")
    try:
        default = LEVERS if device.type == "cuda" else ()
        levers = parse_levers(default if args.speed is None else args.speed)
        # Before minutes of measuring: the results are written after the first variant.
        check_writable_file(args.out / "results.json")
    except SiamdiffError as exc:
        parser.error(str(exc))
    if "bf16_frozen" in levers and device.type != "cuda":
        parser.error("bf16_frozen needs bf16 autocast, which the bench uses on CUDA only")
    try:
        results, path = run(
            preset,
            device,
            args.out,
            train_batches=tuple(args.train_batches) if args.train_batches else None,
            sample_batches=tuple(args.sample_batches) if args.sample_batches else None,
            sample_steps=args.sample_steps,
            guidance=args.guidance,
            warmup=args.warmup,
            iters=args.iters,
            meta=not args.no_meta,
            levers=levers,
            checkpointing=args.gradient_checkpointing,
        )
    except RuntimeError as exc:
        failure = compile_failure(exc)
        if failure is None:
            raise
        # The variants measured before it are written already.
        print(f"siamdiff bench: error: {failure} (measured so far: {args.out})", file=sys.stderr)
        return 1
    print(format_results(results))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

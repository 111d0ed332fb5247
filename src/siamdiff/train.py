"""Siamese-Diffusion training loop: read it top to bottom.

    data (PairedDataset + balanced sampler) -> frozen autoencoder -> SiameseDiffusion
    -> AdamW + warm-up/cosine -> checkpoints, TensorBoard, sample grids, loss curve.

One file, one function (`train`), a few helpers above it. Multi-GPU / multi-node
through ``accelerate launch`` (or ``torchrun``): each rank draws its own batches from
the balanced sampler; DDP keeps the weights identical.

Resume is exact: the batch order is a function of (seed, epoch), every sample's
augmentation is seeded by (seed, epoch, index, occurrence), and accelerate restores the model,
optimiser, scheduler and RNG states, so a resumed run continues the same sequence.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import (
    SAFE_WEIGHTS_NAME,
    DistributedType,
    InitProcessGroupKwargs,
    ProjectConfiguration,
    parse_flag_from_env,
    set_seed,
)
from diffusers.optimization import get_cosine_schedule_with_warmup
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from siamdiff.atomic import (
    atomic_write_json,
    atomic_write_text,
    check_apart,
    fsync_dir,
    fsync_tree,
)
from siamdiff.config import RUN_CONFIG, check_resume_config, with_absolute_paths
from siamdiff.data.cache import LatentCache, WithCachedLatents, build_latent_cache
from siamdiff.data.dataset import PairedDataset, SeededAugmentation
from siamdiff.data.manifest import load_manifest, require_intact, sha256_file
from siamdiff.data.sampling import BalancedBatchSampler
from siamdiff.data.transforms import TransformConfig, build_transforms, cached_view_name
from siamdiff.errors import SiamdiffError, first_line, out_of_memory_error
from siamdiff.export import build_model
from siamdiff.models.autoencoder import LatentAutoencoder
from siamdiff.models.backbone import (
    FROM_SCRATCH_PREDICTION_TYPE,
    drop_prompts,
    freeze_for_training,
    requested_prediction_type,
)
from siamdiff.models.dhi import image_to_hint, mask_to_hint
from siamdiff.models.siamese import SiameseDiffusion
from siamdiff.models.speed import apply_levers, parse_levers
from siamdiff.report import save_loss_curve, save_sample_grid, truncate_loss_log
from siamdiff.runtime import notice
from siamdiff.sample import ddim_sample

CHECKPOINT_RE = re.compile(r"^step-(\d{8})$")
CHECKSUMS_NAME = "checksums.json"
LOSS_KEYS = ("loss", "mask", "image", "consistency", "augment")
LOSS_LOG = "losses.jsonl"
MIN_LOSS_SCALE = 1.0  # fp16: gradients overflowing even at this scale count as NaN/Inf
# How long a rank waits for the others: rank 0 builds the latent cache alone (a large dataset
# takes longer than NCCL's default 10 minutes, which would end the run).
RANK_WAIT = timedelta(hours=12)
# What to change when a training step does not fit in GPU memory.
MEMORY_ADVICE = (
    "lower train.batch_size (raise optim.grad_accum to keep the effective batch), or set "
    "train.gradient_checkpointing=true, train.mixed_precision=bf16 or train.speed=[bf16_frozen]; "
    "the run's checkpoints are kept (--resume continues)"
)


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (partial ones never match the name)."""
    root = run_dir / "checkpoints"
    found = [p for p in root.glob("step-*") if p.is_dir() and CHECKPOINT_RE.match(p.name)]
    return sorted(found, key=lambda p: p.name)


def checkpoint_digests(checkpoint: Path) -> dict[str, str]:
    """SHA-256 of every file of a checkpoint directory but the checksum file itself."""
    return {
        p.relative_to(checkpoint).as_posix(): sha256_file(p)
        for p in sorted(checkpoint.rglob("*"))
        if p.is_file() and p.name != CHECKSUMS_NAME
    }


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why ``checkpoint`` must not be resumed from, or None when it matches its checksums.

    A renamed checkpoint is complete, but a disk error or a stray edit can still damage
    its files later; resuming from one would silently train on garbage.
    """
    try:
        expected = json.loads((checkpoint / CHECKSUMS_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: not JSON, or not UTF-8
        return f"no readable {CHECKSUMS_NAME} ({type(exc).__name__})"
    if not isinstance(expected, dict):
        return f"{CHECKSUMS_NAME} is not a mapping of files to digests"
    actual = checkpoint_digests(checkpoint)
    bad = sorted(k for k in expected.keys() | actual.keys() if expected.get(k) != actual.get(k))
    return f"checksum mismatch in {', '.join(bad)}" if bad else None


def last_valid_checkpoint(run_dir: Path) -> Path:
    """The newest checkpoint that passes its checksums; damaged newer ones are skipped."""
    for candidate in reversed(checkpoints(run_dir)):
        problem = checkpoint_problem(candidate)
        if problem is None:
            return candidate
        notice(f"warning: {candidate}: skipped, damaged: {problem}")
    raise SiamdiffError("no checkpoint passes its checksums", run_dir / "checkpoints")


class StopRequest:
    """Ctrl-C or SIGTERM (a scheduler's preemption, torchrun's shutdown) asks the loop to stop
    at the next step boundary, where the checkpoint it writes resumes exactly; mid-step the
    batch is half consumed and the RNG has moved on. A second Ctrl-C stops at once, keeping
    the last checkpoint."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(
            f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
            "(Ctrl-C again stops at once, keeping the last checkpoint)",
            file=sys.stderr,
        )

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():  # signal.signal needs it
            for number in self.SIGNALS:
                self.previous[number] = signal.signal(number, self._handle)

    def restore(self) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)


LAUNCHER_GRACE = (
    "note: on Ctrl-C or SIGTERM, torchrun (under accelerate launch too) kills every process "
    "30 s later, maybe before the checkpoint is written"
)
LENGTHEN_GRACE = (
    ": launch with TORCH_ELASTIC_SHUTDOWN_TIMEOUT=600 in the environment "
    "(or torchrun --shutdown-timeout 600)"
)
FIXED_GRACE = (
    ", and this torch cannot be told to wait longer (a newer one reads "
    "TORCH_ELASTIC_SHUTDOWN_TIMEOUT): a cut checkpoint is discarded, the previous one kept"
)


def launcher_grace_note(processes: int) -> str | None:
    """What to tell a torchrun launch of several processes that keeps torchrun's 30 s grace
    between passing on a stop signal and killing its processes (a large checkpoint takes
    longer), or None."""
    if processes < 2 or "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    from torch.distributed.launcher.api import LaunchConfig

    if "shutdown_timeout" not in LaunchConfig.__dataclass_fields__:  # before torch read it
        return LAUNCHER_GRACE + FIXED_GRACE
    if "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" in os.environ:
        return None
    return LAUNCHER_GRACE + LENGTHEN_GRACE


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C and SIGTERM to the main process, which finishes its
    step (StopRequest): a worker they killed would fail that step instead."""
    for number in StopRequest.SIGNALS:
        signal.signal(number, signal.SIG_IGN)


def stop_requested(stop: StopRequest, accelerator: Accelerator) -> bool:
    """Whether any rank was asked to stop (one small all-reduce per step with several)."""
    if accelerator.num_processes == 1:
        return stop.requested
    if stop.requested:
        accelerator.set_trigger()
    return accelerator.check_trigger()


def mean_over_ranks(accelerator: Accelerator, values: dict[str, float]) -> dict[str, float]:
    """``values`` averaged over the ranks (each rank's own batches): the logged losses are the
    whole global batch's, not rank 0's share. Every rank must call it, with the same keys."""
    if accelerator.num_processes == 1:
        return values
    local = torch.tensor(list(values.values()), dtype=torch.float64, device=accelerator.device)
    return dict(zip(values, accelerator.reduce(local, "mean").tolist(), strict=True))


class LossWindow:
    """The loss terms summed since the last logged row. A checkpoint between two rows keeps
    the sums (``state``), so the first row after a resume averages the whole window, as the
    uninterrupted run's does, not the resumed steps alone."""

    def __init__(self, saved: dict[str, Any] | None = None) -> None:
        saved = saved or {"sums": {}, "seen": 0, "skipped": 0}
        self.sums = {key: float(saved["sums"].get(key, 0.0)) for key in LOSS_KEYS}
        self.seen: int = saved["seen"]  # micro-batches summed
        self.skipped: int = saved["skipped"]  # optimiser steps skipped on NaN/Inf
        self.timed, self.started = 0, time.perf_counter()  # for it/s: this process's only
        self.pending: list[dict[str, float]] = []  # this accumulation window's, until it steps

    def add(self, terms: dict[str, torch.Tensor]) -> None:
        self.pending.append({key: terms[key].detach().float().item() for key in LOSS_KEYS})
        self.timed += 1

    def stepped(self) -> None:
        """The window's micro-batches count: the optimiser stepped on them."""
        for terms in self.pending:
            for key in LOSS_KEYS:
                self.sums[key] += terms[key]
        self.seen += len(self.pending)
        self.pending = []

    def skip(self) -> None:
        """The window was skipped (NaN/Inf): its micro-batches trained nothing."""
        self.pending = []
        self.skipped += 1

    def state(self, accelerator: Accelerator) -> dict[str, Any]:
        """The window so far, its sums averaged over the ranks. Every rank must call it."""
        sums = mean_over_ranks(accelerator, self.sums)
        return {"sums": sums, "seen": self.seen, "skipped": self.skipped}

    def row(self, accelerator: Accelerator, grad_accum: int) -> dict[str, float]:
        """The window's means over every rank. Every rank must call it."""
        means = mean_over_ranks(accelerator, {k: v / self.seen for k, v in self.sums.items()})
        means["nonfinite_skipped"] = self.skipped
        means["it_per_s"] = self.timed / grad_accum / (time.perf_counter() - self.started)
        return means


def finite_on_every_rank(accelerator: Accelerator, value: torch.Tensor) -> bool:
    """Whether ``value`` is finite on every rank: all must agree to skip a step, or DDP's
    next all-reduce would hang."""
    finite = torch.isfinite(torch.as_tensor(value, device=accelerator.device).detach())
    return bool(accelerator.gather(finite.all().reshape(1)).all())


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` lives (the name CHECKPOINT_RE matches)."""
    return run_dir / "checkpoints" / f"step-{step:08d}"


def resumed_batches(state: dict, grad_accum: int, sampler: BalancedBatchSampler) -> int:
    """The batches this rank takes from the stream to go on where a checkpoint's
    ``trainer_state`` stopped, on ``sampler``'s ranks. Each rank takes every R-th batch of an
    epoch whose length depends on R: a run resumed on other ranks goes on at the same epoch
    and the same global batch within it (rounded down: a batch may be seen twice)."""
    # Checkpoints of older siamdiff versions lack these: no skipped steps, the same ranks.
    taken = state.get("batches_taken", state["step"] * grad_accum)
    ranks_then = state.get("num_processes", sampler.num_replicas)
    if ranks_then == sampler.num_replicas:
        return taken
    epoch, position = divmod(taken, sampler.batches_per_rank(ranks_then))
    return epoch * len(sampler) + min(position * ranks_then // sampler.num_replicas, len(sampler))


def save_checkpoint(
    accelerator: Accelerator,
    model: torch.nn.Module,
    run_dir: Path,
    keep_last: int,
    state: dict[str, Any],
) -> Path:
    """accelerate state (safetensors weights, optimiser, scheduler, RNG) and the trainer's
    ``state`` (step, batches taken from the stream: more than step x grad_accum once NaN
    steps were skipped, ...) written to a temporary name and renamed, so a kill mid-write
    never leaves a loadable half-checkpoint."""
    final = checkpoint_dir(run_dir, state["step"])
    partial = final.with_name(final.name + ".partial")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial), safe_serialization=True)
    accelerator.wait_for_everyone()  # every rank writes its RNG state (and ZeRO shard) first
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # DeepSpeed writes its own format (pytorch_model/, for resuming); `siamdiff export`
        # reads the plain weights, which accelerate gathers on every rank.
        weights = {k: v.contiguous() for k, v in accelerator.get_state_dict(model).items()}
        if accelerator.is_main_process:
            save_file(weights, partial / SAFE_WEIGHTS_NAME)
    if accelerator.is_main_process:
        atomic_write_json(partial / "trainer_state.json", state)
        # On disk before the checksums vouch for it and older checkpoints are pruned: after a
        # power cut, a checkpoint renamed into place must not come back truncated.
        fsync_tree(partial)
        atomic_write_json(partial / CHECKSUMS_NAME, checkpoint_digests(partial))
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        fsync_dir(final.parent)
        for old in checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        if (run_dir / LOSS_LOG).is_file():  # up to date whenever the run stops, however
            save_loss_curve(run_dir / LOSS_LOG, run_dir / "loss_curve.png")
    accelerator.wait_for_everyone()
    return final


def _rate_from_schedule(lr_schedule: Any) -> None:
    """Set the optimiser's rate to the schedule's at its restored step. The checkpoint holds
    the rate of the schedule it was trained under: with train.max_steps raised, a finished
    run's 0 would otherwise be the first resumed step's rate. Unchanged otherwise."""
    schedule = getattr(lr_schedule, "scheduler", lr_schedule)  # accelerate's wrapper
    rates = [
        base * rate(schedule.last_epoch)
        for base, rate in zip(schedule.base_lrs, schedule.lr_lambdas, strict=True)
    ]
    for group, lr in zip(schedule.optimizer.param_groups, rates, strict=True):
        group["lr"] = lr
    schedule._last_lr = rates


def batches(
    data: SeededAugmentation,
    sampler: BalancedBatchSampler,
    start: int,
    num_workers: int,
    pin_memory: bool,
) -> Iterator[dict]:
    """Endless stream of batches, epoch after epoch, skipping the first `start` batches."""
    per_epoch = len(sampler)
    if per_epoch == 0:
        raise SiamdiffError("fewer training samples than one batch: lower train.batch_size")
    epoch, skip = divmod(start, per_epoch)
    while True:
        sampler.set_epoch(epoch)
        data.epoch = epoch
        order = sampler.keyed_batches()[skip:]
        # Without its own generator a DataLoader draws worker seeds from the global RNG,
        # and a resumed run would draw them at another point of the RNG stream.
        seeds = torch.Generator().manual_seed(data.seed * 1_000_003 + epoch)
        yield from DataLoader(
            data,
            batch_sampler=order,
            num_workers=num_workers,
            pin_memory=pin_memory,
            generator=seeds,
            worker_init_fn=ignore_stop_signals,
        )
        epoch, skip = epoch + 1, 0


def to_hints(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask hint and image hint, each followed by the extra hint maps, as the ControlNet
    expects them."""
    extra = batch["hints"]
    return mask_to_hint(batch["mask"], extra), image_to_hint(batch["image"], extra)


@torch.no_grad()
def write_samples(
    model: SiameseDiffusion,
    autoencoder: LatentAutoencoder,
    batch: dict,
    cfg: DictConfig,
    path: Path,
) -> None:
    """Sample grid (mask | real | synthetic) from Mask-Diffusion alone, fixed seeds.

    In eval mode (no dropout in the samples) and without touching the training RNG: how
    often grids are drawn (``train.sample_every``, which a resume may change) must not
    change the training.
    """
    mask_hint = to_hints(batch)[0].to(next(model.parameters()).device)  # the batch is on CPU
    count = mask_hint.shape[0]
    generators = [torch.Generator().manual_seed(cfg.seed + i) for i in range(count)]
    devices = [mask_hint.device] if mask_hint.device.type == "cuda" else []
    modes = [(module, module.training) for module in model.modules()]  # frozen parts stay eval
    model.eval()
    try:
        with torch.random.fork_rng(devices=devices):
            text = model.text([cfg.backbone.prompt] * count)
            uncond = model.text([""] * count)
            latents = ddim_sample(
                model,
                mask_hint,
                text,
                uncond,
                steps=cfg.train.sample_steps,
                guidance=cfg.train.guidance,
                generator=generators,
            )
    finally:
        for module, training in modes:
            module.training = training
    synthetic = autoencoder.decode(latents)
    save_sample_grid(path, batch["mask"], batch["image"], synthetic)


def verified_root(cfg: DictConfig) -> Path:
    """The dataset root, refused when its files no longer match the manifest."""
    root = Path(cfg.data.root)
    if cfg.data.verify:  # an unlisted file too: the user may think it is trained on
        require_intact(root, "set data.verify=false", allow_extra=False)
    return root


def trained_on(cfg: DictConfig, autoencoder: LatentAutoencoder) -> dict[str, Any]:
    """What a checkpoint was trained on, beyond its config: paths may move on resume, the
    files must not. The data's fingerprint covers every file a training index reads, in index
    order (other pairs, or the same ones reordered, are other batches from the same sampler
    state); the autoencoder's identity its encoder weights and scaling (other latents)."""
    root = Path(cfg.data.root)
    manifest = load_manifest(root)
    records = manifest.split(cfg.data.split)
    files = (
        digest
        for record in records
        for digest in (
            record.image_sha256,
            record.mask_sha256,
            *(record.hints[name]["sha256"] for name in cfg.data.hints if name in record.hints),
        )
    )
    return {
        "data_pairs": len(records),
        "data_fingerprint": hashlib.sha256("\n".join(files).encode()).hexdigest(),
        # Which images, in any order: what an export tells the leak guard (export.trained_on).
        "images_fingerprint": manifest.images_fingerprint(cfg.data.split),
        "autoencoder_identity": autoencoder.identity,
    }


def check_trained_on(saved: dict[str, Any], now: dict[str, Any], cfg: DictConfig) -> None:
    """Refuse to resume a checkpoint (``saved``, its trainer state) on other data or another
    autoencoder than it was trained on; checkpoints of older versions lack the record."""
    if saved.get("data_fingerprint", now["data_fingerprint"]) != now["data_fingerprint"]:
        raise SiamdiffError(
            f"holds other training pairs than the run was trained on ({saved['data_pairs']} "
            f"then, {now['data_pairs']} now, or other files or order): resume with the dataset "
            "the run was trained on, or start another run_dir",
            cfg.data.root,
        )
    if (
        saved.get("autoencoder_identity", now["autoencoder_identity"])
        != now["autoencoder_identity"]
    ):
        raise SiamdiffError(
            "is not the autoencoder the run was trained with (other weights or scaling: other "
            "latents); resume with that one, or start another run_dir",
            cfg.autoencoder.path or f"autoencoder.kind={cfg.autoencoder.kind}",
        )


def set_aside(damaged: Path) -> Path:
    """Rename a damaged checkpoint out of the run's way, never deleting it: a read error that
    passes (a network file system's) may be what made it fail its checksums."""
    aside, number = damaged.with_name(f"{damaged.name}.damaged"), 1
    while aside.exists():  # set aside at this step before
        aside, number = damaged.with_name(f"{damaged.name}.damaged-{number}"), number + 1
    damaged.rename(aside)
    return aside


def preview_pairs(dataset: Dataset, count: int) -> Subset:
    """``count`` pairs spread evenly over the split: its first ones are consecutive frames of
    one video (records are sorted by id), so the grid's rows would all look alike."""
    spread = np.linspace(0, len(dataset) - 1, min(count, len(dataset))).round().astype(int)
    return Subset(dataset, [int(i) for i in spread])


def training_data(
    cfg: DictConfig, accelerator: Accelerator, autoencoder: LatentAutoencoder
) -> tuple[Dataset, BalancedBatchSampler, dict]:
    """(training dataset, this rank's balanced batch sampler, a fixed preview batch)."""
    root = verified_root(cfg)
    transform_cfg = TransformConfig.from_dict(OmegaConf.to_container(cfg.data.transforms))
    if transform_cfg.colour != "rgb":
        raise SiamdiffError(
            "the autoencoder expects RGB; Lab input is for pixel-space models only",
            "data.transforms.colour",
        )
    hints = tuple(cfg.data.hints)
    fixed_view = PairedDataset(
        root, cfg.data.split, transform=build_transforms(transform_cfg, False), hints=hints
    )
    shown = preview_pairs(fixed_view, cfg.train.sample_count)
    preview = next(iter(DataLoader(shown, batch_size=len(shown))))
    if cfg.data.latent_cache:
        # Latents of the fixed (lesion-centred, resized) view: the autoencoder runs once per
        # image instead of every step, at the price of no random augmentation.
        view = cached_view_name(transform_cfg)
        if accelerator.is_main_process:
            build_latent_cache(
                fixed_view, autoencoder, cfg.data.latent_cache, view, device=accelerator.device
            ).close()
        accelerator.wait_for_everyone()
        cache = LatentCache(cfg.data.latent_cache, autoencoder.identity, view, readonly=True)
        dataset: Dataset = WithCachedLatents(fixed_view, cache)
    else:
        dataset = PairedDataset(
            root, cfg.data.split, transform=build_transforms(transform_cfg, True), hints=hints
        )
    sampler = BalancedBatchSampler(
        fixed_view.coverages,
        cfg.train.batch_size,
        fg_ratio=tuple(cfg.data.balanced.fg_ratio) if cfg.data.balanced.enabled else None,
        seed=cfg.seed,
        num_replicas=accelerator.num_processes,
        rank=accelerator.process_index,
    )
    return dataset, sampler, preview


def build_optimizer(
    cfg: DictConfig, trainable: list[torch.nn.Parameter], device: torch.device, deepspeed: bool
) -> torch.optim.Optimizer:
    """AdamW as ``optim`` says: torch's (fused on CUDA) or bitsandbytes' 8-bit one, whose two
    moments take 2 bytes per parameter instead of 8 (SD1.5's 0.87B trainable parameters
    hold 7 GB of AdamW state in fp32, 1.7 GB in 8 bits)."""
    settings = {
        "lr": cfg.optim.lr,
        "betas": tuple(cfg.optim.betas),
        "weight_decay": cfg.optim.weight_decay,
    }
    if cfg.optim.name == "adamw":
        return torch.optim.AdamW(trainable, fused=device.type == "cuda", **settings)
    if deepspeed:
        raise SiamdiffError(
            "optim.name=adamw8bit with DeepSpeed: ZeRO shards the optimizer state itself; "
            "use optim.name=adamw"
        )
    try:
        import bitsandbytes
    except ImportError as exc:
        raise SiamdiffError(
            "optim.name=adamw8bit needs bitsandbytes: pip install 'siamdiff[lowmem]'"
        ) from exc
    return bitsandbytes.optim.AdamW8bit(trainable, **settings)


def check_mixed_precision(cfg: DictConfig) -> None:
    """accelerate runs fp16 autocast and loss scaling on CUDA only: elsewhere an fp16 run
    trained in fp32 while its config.yaml said fp16."""
    if cfg.train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise SiamdiffError(
            "train.mixed_precision=fp16 needs a CUDA GPU (accelerate's fp16 autocast and loss "
            "scaling run on CUDA only; here it would train in fp32): use bf16 or no"
        )


def configure_deepspeed(ds_config: dict, cfg: DictConfig, num_processes: int) -> None:
    """Make ``cfg`` what DeepSpeed reads, before ``accelerator.prepare``: the batch (accelerate
    would take it from a prepared DataLoader; ours is our own), gradient accumulation and
    clipping (the accelerate YAML's values would silently win), and mixed precision as without
    DeepSpeed: fp32 weights under torch's bf16 autocast, entered by the engine around its
    forward (its own bf16 mode holds bf16 weights that fp32 latents cannot meet, and would
    export them rounded)."""
    if cfg.train.mixed_precision == "fp16":
        raise SiamdiffError(
            "train.mixed_precision=fp16 is not supported under DeepSpeed (ZeRO has no loss "
            "scaling for torch's fp16 autocast): use bf16"
        )
    ds_config.update(
        train_micro_batch_size_per_gpu=cfg.train.batch_size,
        gradient_accumulation_steps=cfg.optim.grad_accum,
        train_batch_size=cfg.train.batch_size * cfg.optim.grad_accum * num_processes,
        gradient_clipping=cfg.optim.max_grad_norm,
    )
    ds_config.pop("bf16", None)
    ds_config.pop("fp16", None)
    if cfg.train.mixed_precision == "bf16":
        ds_config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}


def training_autocast(accelerator: Accelerator) -> AbstractContextManager:
    """The autocast the forward passes and the preview sampler run under. Under DeepSpeed,
    accelerate's autocast does nothing (the engine enters its own around its forward; see
    configure_deepspeed), and the preview sampler runs outside the engine: torch's, here."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        enabled = bool(ds_config.get("torch_autocast", {}).get("enabled", False))
        return torch.autocast(accelerator.device.type, dtype=torch.bfloat16, enabled=enabled)
    return accelerator.autocast()


def weights_fingerprint(parameters: list[torch.nn.Parameter]) -> int:
    """A 63-bit hash of the exact bytes of `parameters` (equal iff the weights are equal)."""
    digest = hashlib.sha256()
    for parameter in parameters:
        data = parameter.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        digest.update(data.numpy().tobytes())
    return int.from_bytes(digest.digest()[:8], "big") >> 1


def check_ranks_in_sync(accelerator: Accelerator, parameters: list[torch.nn.Parameter]) -> None:
    """DDP must leave every rank with the same weights; a silent divergence would corrupt
    every later checkpoint, so it is checked once at the end of training."""
    mine = torch.tensor([weights_fingerprint(parameters)], device=accelerator.device)
    every = accelerator.gather(mine)
    if not bool((every == mine).all()):
        raise SiamdiffError(f"ranks ended with different weights (fingerprints {every.tolist()})")
    accelerator.print(f"weights identical on all {accelerator.num_processes} ranks")


def train(cfg: DictConfig, resume: bool = False) -> Path:
    """Train one run described by `cfg` (see config/base.yaml); returns the run directory."""
    if OmegaConf.is_missing(cfg.data, "root"):
        raise SiamdiffError(
            "data.root is not set: pass data.root=DIR (a `siamdiff prepare` output)"
        )
    cfg = with_absolute_paths(cfg)  # config.yaml then means the same files from anywhere
    auto = requested_prediction_type(cfg.backbone.prediction_type) is None
    if auto and cfg.backbone.kind != "sd15":
        # Saved as trained: a later default for `auto` must not retarget this network.
        cfg.backbone.prediction_type = FROM_SCRATCH_PREDICTION_TYPE
    run_dir = Path(cfg.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise SiamdiffError("is a file: run_dir names a folder", run_dir)
    check_apart(run_dir, cfg.data.root, "the dataset")  # its verify would fail on the run
    if cfg.data.latent_cache:
        check_apart(cfg.data.latent_cache, cfg.data.root, "the dataset")
        if not cfg.data.verify:  # an edited mask would be served its old window's latent
            raise SiamdiffError(
                "data.latent_cache needs data.verify=true: its entries are keyed by the "
                "manifest's hashes, which only verify holds the files to"
            )
    existing = checkpoints(run_dir)
    if (
        not existing
        and run_dir.is_dir()
        and any(run_dir.iterdir())
        and not (run_dir / RUN_CONFIG).is_file()
    ):
        raise SiamdiffError("exists and is not a siamdiff run: choose another run_dir", run_dir)
    if not resume and existing:
        raise SiamdiffError("already holds checkpoints: pass --resume or another run_dir=", run_dir)
    if resume and existing:
        check_resume_config(run_dir / RUN_CONFIG, cfg)
    elif resume:  # a requeued job's first start, or a mistyped run_dir
        notice(f"--resume: no checkpoint in {run_dir}, starting at step 0")

    if parse_flag_from_env("ACCELERATE_USE_DEEPSPEED") and not torch.cuda.is_available():
        # Without CUDA, accelerate makes every DeepSpeed process rank 0 of 1: each would train
        # alone and all would write the same run directory.
        raise SiamdiffError(
            "a DeepSpeed launch needs CUDA GPUs (accelerate runs DeepSpeed on CUDA only); "
            "on CPUs launch with examples/accelerate/ddp.yaml"
        )
    check_mixed_precision(cfg)
    accelerator = Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.optim.grad_accum,
        cpu=not torch.cuda.is_available(),
        log_with="tensorboard",
        project_config=ProjectConfiguration(
            project_dir=str(run_dir), logging_dir=str(run_dir / "tb")
        ),
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=RANK_WAIT)],
    )
    set_seed(cfg.seed + accelerator.process_index)
    device = accelerator.device
    grace = launcher_grace_note(accelerator.num_processes)
    if grace is not None:
        accelerator.print(grace)

    # ---- model ------------------------------------------------------------------------
    model, autoencoder, backbone = build_model(cfg)
    autoencoder.to(device)
    if cfg.train.gradient_checkpointing:
        backbone.unet.enable_gradient_checkpointing()
        backbone.controlnet.enable_gradient_checkpointing()
    train_encoder = cfg.model.train_unet_encoder
    if train_encoder == "auto":  # a random UNet encoder has nothing worth freezing
        train_encoder = cfg.backbone.kind != "sd15"
    trainable = freeze_for_training(backbone, train_unet_encoder=bool(train_encoder))
    try:
        levers = parse_levers(cfg.train.speed)
    except SiamdiffError as exc:
        raise SiamdiffError(f"train.speed: {exc}") from exc
    if "bf16_frozen" in levers and cfg.train.mixed_precision != "bf16":
        raise SiamdiffError(
            "train.speed bf16_frozen needs train.mixed_precision=bf16 (its weights are only "
            "read under bf16 autocast)"
        )
    apply_levers(model, levers, autoencoder)
    # What the run trains on, checked against its checkpoint before anything is built on it.
    identity = trained_on(cfg, autoencoder)
    if resume and existing:
        last = last_valid_checkpoint(run_dir)
        state = json.loads((last / "trainer_state.json").read_text())
        check_trained_on(state, identity, cfg)
    optimizer = build_optimizer(
        cfg, trainable, device, deepspeed=accelerator.state.deepspeed_plugin is not None
    )
    lr_schedule = get_cosine_schedule_with_warmup(
        optimizer, cfg.optim.warmup_steps, cfg.train.max_steps
    )
    if accelerator.state.deepspeed_plugin is not None:
        configure_deepspeed(
            accelerator.state.deepspeed_plugin.deepspeed_config, cfg, accelerator.num_processes
        )
    model, optimizer, lr_schedule = accelerator.prepare(model, optimizer, lr_schedule)

    # ---- data -------------------------------------------------------------------------
    dataset, sampler, preview = training_data(cfg, accelerator, autoencoder)
    seeded = SeededAugmentation(dataset, cfg.seed)
    core: SiameseDiffusion = accelerator.unwrap_model(model)

    # ---- run directory, resume ----------------------------------------------------------
    step = batches_taken = 0
    window = LossWindow()
    if resume and existing:
        try:  # accelerate unpickles optimizer/scheduler/RNG state with weights_only=True
            accelerator.load_state(str(last))
        except (pickle.UnpicklingError, RuntimeError, ValueError) as exc:
            raise SiamdiffError(
                f"cannot resume from this checkpoint ({first_line(exc)})", last
            ) from exc
        step = state["step"]
        window = LossWindow(state.get("loss_window"))
        if step > cfg.train.max_steps:
            raise SiamdiffError(
                f"the run is at step {step}, past train.max_steps {cfg.train.max_steps}: "
                "resume with more steps, or export its checkpoint",
                last,
            )
        _rate_from_schedule(lr_schedule)
        batches_taken = resumed_batches(state, cfg.optim.grad_accum, sampler)
        accelerator.print(f"resumed from {last} at step {step}")
        ranks_before = state.get("num_processes", accelerator.num_processes)
        if ranks_before != accelerator.num_processes:
            accelerator.print(
                f"warning: trained on {ranks_before} processes, resumed on "
                f"{accelerator.num_processes}: the data goes on where it stopped, but the "
                "batch is another size and the run no longer matches an uninterrupted one"
            )
        if "data_fingerprint" not in state and accelerator.num_processes > 1:
            accelerator.print(
                "warning: a checkpoint of an older siamdiff counted a frame's draws per rank: "
                "frames drawn twice get other augmentations than the uninterrupted run's"
            )
        if accelerator.is_main_process:
            # Damaged ones past it: recomputed now, and never to count among the keep-last.
            for damaged in existing[existing.index(last) + 1 :]:
                accelerator.print(f"{damaged}: damaged, set aside as {set_aside(damaged).name}")
        if step == cfg.train.max_steps:  # its config, logs and curve stay as they are
            accelerator.print(
                f"the run is at train.max_steps ({step}) already: nothing to train (resume "
                "with a higher train.max_steps to train longer)"
            )
            return run_dir
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        for partial in (run_dir / "checkpoints").glob("step-*.partial"):  # a killed save's
            shutil.rmtree(partial, ignore_errors=True)
        atomic_write_text(run_dir / RUN_CONFIG, OmegaConf.to_yaml(cfg))
        # A resumed run logs its steps again: TensorBoard drops the killed run's rows past the
        # checkpoint (losses.jsonl is truncated the same way below).
        # From step 0 too: a run killed before its first checkpoint logged rows.
        purge = {"purge_step": step + 1}
        accelerator.init_trackers("siamdiff", init_kwargs={"tensorboard": purge})
    log_path = run_dir / LOSS_LOG
    if accelerator.is_main_process:
        truncate_loss_log(log_path, step)
    accelerator.print(
        f"training {cfg.model.mode} ({cfg.backbone.kind}, "
        f"{sum(p.numel() for p in trainable) / 1e6:.1f}M trainable parameters) on "
        f"{len(dataset)} pairs of {cfg.data.root}, {accelerator.num_processes} x {device}, "
        f"batch {cfg.train.batch_size}, steps {step + 1}..{cfg.train.max_steps}; "
        f"losses every {cfg.train.log_every} steps in {log_path}"
    )

    # ---- loop -------------------------------------------------------------------------
    stream = batches(
        seeded,
        sampler,
        start=batches_taken,
        num_workers=cfg.data.num_workers,
        pin_memory=device.type == "cuda",
    )
    progress = tqdm(
        total=cfg.train.max_steps,
        initial=step,
        desc="train",
        unit="step",
        disable=not accelerator.is_main_process,
        dynamic_ncols=True,
    )

    def micro_batch(batch: dict, step: int) -> dict[str, torch.Tensor]:
        """The loss terms of one micro-batch (method.md), hints and latents made here."""
        images = batch["image"].to(device, non_blocking=True)
        batch["mask"] = batch["mask"].to(device, non_blocking=True)
        batch["hints"] = batch["hints"].to(device, non_blocking=True)
        mask_hint, image_hint = to_hints({**batch, "image": images})
        if "latent" in batch:
            z0 = batch["latent"].to(device, non_blocking=True)
        else:
            with torch.no_grad():
                z0 = autoencoder.encode(images)
        prompts = drop_prompts([cfg.backbone.prompt] * len(images), cfg.model.prompt_dropout)
        warmup = cfg.model.consistency_warmup_steps
        warm = min(1.0, step / warmup) if warmup else 1.0
        with training_autocast(accelerator):
            terms = model(
                z0,
                mask_hint,
                image_hint,
                core.text(prompts),
                progress=step / cfg.train.max_steps,
                consistency_weight=cfg.model.consistency_weight * warm,
            )
        return terms

    def trainer_state() -> dict[str, Any]:
        """What a checkpoint holds besides accelerate's state. Every rank must call it."""
        return {
            "step": step,
            "batches_taken": batches_taken,
            "num_processes": accelerator.num_processes,
            "loss_window": window.state(accelerator),
            **identity,
        }

    nonfinite = 0
    window_bad = overflow = False
    stop = StopRequest()
    stop.install()
    try:
        while step < cfg.train.max_steps:
            batch = next(stream)
            batches_taken += 1
            with accelerator.accumulate(model):
                # A window (grad_accum micro-batches) with a non-finite loss or gradient is
                # skipped whole: the rest of it is not computed and its gradients are dropped.
                if not window_bad:
                    terms = micro_batch(batch, step)
                    window_bad = not finite_on_every_rank(accelerator, terms["loss"])
                if not window_bad:
                    accelerator.backward(terms["loss"])
                    if accelerator.sync_gradients:
                        norm = accelerator.clip_grad_norm_(trainable, cfg.optim.max_grad_norm)
                        # A finite loss can still overflow its gradients: stepping on them would
                        # write NaN into every weight, and into the next checkpoint.
                        window_bad = norm is not None and not finite_on_every_rank(
                            accelerator, norm
                        )
                        overflow = window_bad
                if not window_bad:
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            if window_bad:
                if not accelerator.sync_gradients:
                    continue
                # The raw optimizer: accelerate's wrapper keeps gradients between windows.
                getattr(optimizer, "optimizer", optimizer).zero_grad(set_to_none=True)
                window_bad = False
                window.skip()
                if overflow and accelerator.scaler is not None:
                    # fp16: the scaler unscaled these gradients; overflowing is how it finds
                    # its scale (its first steps do), so it lowers the scale, the run goes on.
                    # Below MIN_LOSS_SCALE no scale overflows: the gradients are NaN/Inf.
                    accelerator.scaler.update()
                    overflow = False
                    if accelerator.scaler.get_scale() >= MIN_LOSS_SCALE:
                        continue
                overflow = False
                nonfinite += 1
                if nonfinite >= cfg.train.max_nonfinite:
                    raise SiamdiffError(
                        f"loss or gradients were NaN/Inf in {nonfinite} steps in a row at step "
                        f"{step}; the last good checkpoint is kept (try a lower optim.lr)",
                        run_dir,
                    )
                continue
            window.add(terms)
            if not accelerator.sync_gradients:
                continue
            window.stepped()
            nonfinite = 0
            lr = lr_schedule.get_last_lr()[0]  # the rate this step was taken with
            lr_schedule.step()
            step += 1
            progress.update(1)

            if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
                means = window.row(accelerator, cfg.optim.grad_accum) | {"lr": lr}
                window = LossWindow()
                postfix = {"loss": f"{means['loss']:.4f}", "lr": f"{means['lr']:.2e}"}
                scalars = {f"loss/{k}": means[k] for k in LOSS_KEYS} | {"lr": means["lr"]}
                if device.type == "cuda":  # how close the run is to an out-of-memory error
                    means["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                    postfix["mem"] = f"{means['peak_memory_gb']:.1f}G"
                    scalars["memory/peak_gb"] = means["peak_memory_gb"]
                accelerator.log(scalars, step=step)
                progress.set_postfix(postfix, refresh=False)  # tqdm's pace: a log line each
                if accelerator.is_main_process:
                    with open(log_path, "a", encoding="utf-8") as handle:
                        handle.write(json.dumps({"step": step, **means}) + "\n")
            if step % cfg.train.checkpoint_every == 0 or step == cfg.train.max_steps:
                save_checkpoint(accelerator, model, run_dir, cfg.train.keep_last, trainer_state())
            # Every rank stops at the same step; one asked to stop at the last simply ends.
            stopping = step < cfg.train.max_steps and stop_requested(stop, accelerator)
            # A stopping run saves first: a launcher kills it a grace period after the signal.
            if (
                accelerator.is_main_process
                and not stopping
                and (step % cfg.train.sample_every == 0 or step == cfg.train.max_steps)
            ):
                grid = run_dir / "samples" / f"step-{step:08d}.png"
                with training_autocast(accelerator):  # the precision the model trains in
                    write_samples(core, autoencoder, preview, cfg, grid)
            if stopping:
                if not checkpoint_dir(run_dir, step).is_dir():
                    accelerator.print(f"saving a checkpoint at step {step}")
                    save_checkpoint(
                        accelerator, model, run_dir, cfg.train.keep_last, trainer_state()
                    )
                raise KeyboardInterrupt
    except torch.OutOfMemoryError as exc:
        raise out_of_memory_error(exc, MEMORY_ADVICE, run_dir) from exc
    finally:
        stop.restore()
        progress.close()
        stream.close()  # stops DataLoader workers now, not at garbage collection
        if isinstance(dataset, WithCachedLatents):
            dataset.cache.close()  # LMDB allows one open environment per path and process
    if accelerator.num_processes > 1:
        check_ranks_in_sync(accelerator, trainable)
    accelerator.end_training()
    return run_dir

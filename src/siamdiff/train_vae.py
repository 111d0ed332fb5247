"""``siamdiff train-vae``: a latent autoencoder trained on the user's own images, for when
neither Stable Diffusion's VAE nor a pretrained tiny autoencoder (TAEF2) is at hand.

The model is a diffusers ``AutoencoderKL`` with four blocks (f=8: the latent grid the
ControlNet's hint encoder makes), small enough for a CPU. It is trained as Stable Diffusion's
VAE was, minus the parts that need downloaded networks: an L1 + (1 - SSIM) reconstruction
loss and a small KL term (no LPIPS, no discriminator, so its reconstructions are softer than
SD's). The KL term is weighted as in SD: summed over each image's latent, ``kl_weight``
against the per-pixel sum of the reconstruction error.

The output directory is a diffusers model directory (``config.json`` +
``diffusion_pytorch_model.safetensors``) whose ``shift_factor`` and ``scaling_factor`` give
the training latents zero mean and unit variance: a training config uses it as
``autoencoder.kind=diffusers-kl autoencoder.path=DIR``. Beside the weights:
``training.json`` (settings, data, loss history, held-out PSNR), ``loss_curve.png`` and
``reconstructions.png`` (held-out image | reconstruction). ``config.json`` is written last:
a directory without it is unfinished.

A run resumes exactly (``--resume``; bit for bit on a CPU, up to CUDA kernels' own
nondeterminism on a GPU): each step's images, crops, flips and posterior noise come from
generators seeded by (seed, step), never from the global RNG or the DataLoader's workers, so
the state to keep is the weights, the optimizer and the step. Ctrl-C or SIGTERM finishes the
step, saves a checkpoint and exits (a second Ctrl-C exits at once, keeping the last
checkpoint); running out of GPU memory keeps the last checkpoint. ``--overwrite`` leaves the
previous model's weights and config loadable until the new ones replace them (its loss log
restarts with the new run).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset, Sampler
from torchmetrics.functional.image import structural_similarity_index_measure
from tqdm import tqdm

from siamdiff import __version__
from siamdiff.atomic import (
    atomic_output_dir,
    atomic_write_json,
    check_apart,
    exclusive_writer,
    read_json,
)
from siamdiff.config import finite_number, whole_number
from siamdiff.data.manifest import Record, load_manifest, require_intact
from siamdiff.data.readers import load_rgb
from siamdiff.errors import SiamdiffError, first_line, out_of_memory_error
from siamdiff.models.dhi import DenseHintInput
from siamdiff.report import read_loss_log, save_columns, save_loss_curve, truncate_loss_log
from siamdiff.rng import cpu_seeded
from siamdiff.train import StopRequest, ignore_stop_signals

CHECKPOINT = "checkpoint"
LOSS_LOG = "losses.jsonl"
INFO_NAME = "training.json"
LOSS_TERMS = ("loss", "l1", "ssim", "kl")
HELD_OUT_IMAGES = 64  # held-out crops scored at the end (PSNR, L1)
SCALE_IMAGES = 256  # training crops whose latents set the shift and scaling factors
MEMORY_ADVICE = "lower --batch-size or --size; the last checkpoint is kept (--resume continues)"


@dataclass(frozen=True)
class VAESettings:
    size: int = 128  # square training crops, px
    steps: int = 3000
    batch_size: int = 16
    lr: float = 2e-4
    widths: tuple[int, ...] = (32, 64, 128, 128)
    layers_per_block: int = 1
    latent_channels: int = 4
    kl_weight: float = 1e-6
    ssim_weight: float = 0.2
    seed: int = 0
    checkpoint_every: int = 250
    log_every: int = 25

    def check(self) -> None:
        """One-line errors for settings the model or the loop cannot take."""
        blocks = round(math.log2(DenseHintInput.downscale)) + 1
        problems = {
            "--size": (self.size, self.size >= 16 and self.size % 8 == 0, "a multiple of 8, >= 16"),
            "--widths": (
                ",".join(map(str, self.widths)),
                len(self.widths) == blocks and all(w > 0 and w % 8 == 0 for w in self.widths),
                f"{blocks} multiples of 8 (f={DenseHintInput.downscale}: the hint encoder's grid)",
            ),
            "--steps": (self.steps, self.steps >= 1, ">= 1"),
            "--batch-size": (self.batch_size, self.batch_size >= 1, ">= 1"),
            "--lr": (self.lr, math.isfinite(self.lr) and self.lr > 0, "> 0"),
            "--layers-per-block": (self.layers_per_block, self.layers_per_block >= 1, ">= 1"),
            "--latent-channels": (self.latent_channels, self.latent_channels >= 1, ">= 1"),
            "--kl-weight": (
                self.kl_weight,
                math.isfinite(self.kl_weight) and self.kl_weight >= 0,
                ">= 0",
            ),
            "--ssim-weight": (
                self.ssim_weight,
                math.isfinite(self.ssim_weight) and self.ssim_weight >= 0,
                ">= 0",
            ),
            "--seed": (self.seed, 0 <= self.seed < 2**63, "in 0..2^63-1"),
            "--checkpoint-every": (self.checkpoint_every, self.checkpoint_every >= 1, ">= 1"),
        }
        for flag, (value, ok, expected) in problems.items():
            if not ok:
                raise SiamdiffError(f"{flag} must be {expected}, got {value}")


def build_vae(settings: VAESettings) -> AutoencoderKL:
    """The untrained autoencoder, its initial weights drawn from ``settings.seed``."""
    with cpu_seeded(settings.seed):
        return AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * len(settings.widths),
            up_block_types=("UpDecoderBlock2D",) * len(settings.widths),
            block_out_channels=settings.widths,
            layers_per_block=settings.layers_per_block,
            latent_channels=settings.latent_channels,
            norm_num_groups=8,
            sample_size=settings.size,
        )


class ImageCrops(Dataset):
    """``size`` px squares of a dataset's images. An item is ``(index, seed)``: the crop's
    place, a mirror and a quarter turn are drawn from ``seed``; ``seed=None`` is the centre
    crop as it is (held-out scoring)."""

    def __init__(self, root: Path, records: Sequence[Record], size: int) -> None:
        self.root, self.records, self.size = root, list(records), size
        for record in self.records:
            if min(record.width, record.height) < size:
                raise SiamdiffError(
                    f"is {record.width}x{record.height}, smaller than the {size} px crops "
                    "(lower --size, or prepare the data larger)",
                    root / record.image,
                )

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item: tuple[int, int | None]) -> torch.Tensor:
        index, seed = item
        image = load_rgb(self.root / self.records[index].image)
        height, width = image.shape[:2]
        if min(height, width) < self.size:  # the file no longer matches its manifest entry
            raise SiamdiffError(
                f"is {width}x{height}, smaller than the {self.size} px crops",
                self.root / self.records[index].image,
            )
        if seed is None:
            top, left = (height - self.size) // 2, (width - self.size) // 2
        else:
            rng = np.random.default_rng(seed)
            top = int(rng.integers(height - self.size + 1))
            left = int(rng.integers(width - self.size + 1))
        crop = image[top : top + self.size, left : left + self.size]
        if seed is not None:
            crop = np.rot90(crop[:, ::-1] if rng.random() < 0.5 else crop, int(rng.integers(4)))
        return torch.from_numpy(np.array(crop)).permute(2, 0, 1).float() / 127.5 - 1


def step_items(settings: VAESettings, count: int, step: int) -> list[tuple[int, int]]:
    """The ``(image, crop seed)`` items of optimiser step ``step``: distinct images while the
    dataset has enough, each step drawn from its own generator (resumes need no state)."""
    rng = np.random.default_rng((settings.seed, step))
    images = rng.choice(count, size=settings.batch_size, replace=count < settings.batch_size)
    seeds = rng.integers(2**63, size=settings.batch_size)
    return [(int(i), int(s)) for i, s in zip(images, seeds, strict=True)]


class StepBatches(Sampler[list[tuple[int, int]]]):
    """The batches of steps ``first`` .. ``last`` (inclusive), in order."""

    def __init__(self, settings: VAESettings, count: int, first: int, last: int) -> None:
        self.settings, self.count, self.first, self.last = settings, count, first, last

    def __len__(self) -> int:
        return max(0, self.last - self.first + 1)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.first, self.last + 1):
            yield step_items(self.settings, self.count, step)


def vae_losses(
    vae: AutoencoderKL, images: torch.Tensor, settings: VAESettings, noise: torch.Generator
) -> dict[str, torch.Tensor]:
    """The loss terms of one batch (module docstring); ``ssim`` is the similarity itself."""
    posterior = vae.encode(images).latent_dist
    reconstruction = vae.decode(posterior.sample(generator=noise)).sample
    # In fp32 whatever the autocast: SSIM's variances (E[x^2] - mean^2) vanish in bf16 on
    # smooth images such as endoscopy frames, and the KL squares the latent means.
    with torch.autocast(images.device.type, enabled=False):
        reconstruction, images = reconstruction.float(), images.float()
        l1 = (reconstruction - images).abs().mean()
        ssim = structural_similarity_index_measure(
            (reconstruction.clamp(-1, 1) + 1) / 2, (images + 1) / 2, data_range=1.0
        )
        posterior = DiagonalGaussianDistribution(posterior.parameters.float())
        kl = posterior.kl().mean() / images[0].numel()  # per image, per-pixel mean
    loss = l1 + settings.ssim_weight * (1 - ssim) + settings.kl_weight * kl
    return {"loss": loss, "l1": l1, "ssim": ssim, "kl": kl}


def _step_noise(settings: VAESettings, step: int, device: torch.device) -> torch.Generator:
    seed = int(np.random.default_rng((settings.seed, step, 1)).integers(2**63))
    return torch.Generator(device).manual_seed(seed)


@contextlib.contextmanager
def _batches(dataset: Dataset, sampler: Sampler | list, workers: int) -> Iterator[Iterator]:
    """The batches, their worker processes stopped however their use ends. Workers leave
    Ctrl-C and SIGTERM to the main process (which finishes its step first), so after an
    error, whose traceback holds the loader, the interpreter's exit would wait for them
    forever."""
    batches = iter(
        DataLoader(
            dataset, batch_sampler=sampler, num_workers=workers, worker_init_fn=ignore_stop_signals
        )
    )
    try:
        yield batches
    finally:
        shutdown = getattr(batches, "_shutdown_workers", None)  # torch's own clean stop
        if shutdown is not None:
            shutdown()


def _settings_from(saved: dict[str, Any]) -> VAESettings:
    known = {f.name for f in fields(VAESettings)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in known}
    return VAESettings(**values)


def _made_by_siamdiff(out: Path) -> bool:
    """Whether ``out`` holds a train-vae run or model (its own record says so)."""
    for record in (out / CHECKPOINT / "state.json", out / INFO_NAME):
        try:
            created_by = json.loads(record.read_text(encoding="utf-8")).get("created_by")
        except (OSError, ValueError, AttributeError):
            continue
        if str(created_by).startswith("siamdiff"):
            return True
    return False


def _check_out(out: Path, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """What is already in ``out``: None for a fresh start, the checkpoint's state to resume.
    An overwritten model stays in place, loadable, until the new one replaces it."""
    if resume and overwrite:
        raise SiamdiffError(
            "--resume continues the run in --out and --overwrite starts it again: pass one", out
        )
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        if resume:
            raise SiamdiffError("has no unfinished train-vae run to resume", out)
        return None
    if not out.is_dir() or not _made_by_siamdiff(out):
        raise SiamdiffError("exists and is not a train-vae output: choose another --out", out)
    state_path = out / CHECKPOINT / "state.json"
    if overwrite:
        return None
    if resume and state_path.is_file():
        return _checked_state(read_json(state_path, "train-vae checkpoint", ""), state_path)
    if (out / "config.json").is_file():
        raise SiamdiffError("holds a trained autoencoder (pass --overwrite to train again)", out)
    raise SiamdiffError(
        "holds an unfinished train-vae run (--resume continues it, --overwrite starts again)",
        out,
    )


def _checked_state(state: Any, path: Path) -> dict[str, Any]:
    """A checkpoint's state.json, its fields checked: a damaged one is a one-line error."""
    if not isinstance(state, dict):
        raise SiamdiffError("cannot resume from this checkpoint (not a JSON object)", path)
    pending = state.get("pending")
    sums = pending.get("sums") if isinstance(pending, dict) else None
    # The step and the log's unwritten sums go straight into the loop: a negative step, or a
    # sum that is text, would stop it with a traceback.
    valid = {
        "step": whole_number(state.get("step")),
        "settings": isinstance(state.get("settings"), dict),
        "data": isinstance(state.get("data"), str),
        "pending": isinstance(pending, dict)
        and whole_number(pending.get("seen"))
        and isinstance(sums, dict)
        and set(sums) == set(LOSS_TERMS)
        and all(finite_number(value) for value in sums.values()),
        "order": isinstance(state.get("order", ""), str),  # older checkpoints lack it
    }
    problems = [key for key, ok in valid.items() if not ok]
    if problems:
        raise SiamdiffError(
            f"cannot resume from this checkpoint ({', '.join(problems)} missing or damaged)", path
        )
    return state


def _save_checkpoint(
    out: Path, vae: AutoencoderKL, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    with atomic_output_dir(out / CHECKPOINT, overwrite=True) as tmp:
        save_file(
            {k: v.contiguous() for k, v in vae.state_dict().items()}, tmp / "model.safetensors"
        )
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        atomic_write_json(tmp / "state.json", state)


def _load_checkpoint(
    out: Path, vae: AutoencoderKL, optimizer: torch.optim.Optimizer, device: torch.device
) -> None:
    where = out / CHECKPOINT
    try:
        vae.load_state_dict(load_file(where / "model.safetensors", device=str(device)))
        optimizer.load_state_dict(
            torch.load(where / "optimizer.pt", map_location=device, weights_only=True)
        )
    except Exception as exc:  # safetensors' and pickle's errors are Exception's own children
        raise SiamdiffError(
            f"cannot resume from this checkpoint ({first_line(exc)})", where
        ) from exc


@torch.no_grad()
def latent_normalisation(
    vae: AutoencoderKL, crops: ImageCrops, device: torch.device, workers: int
) -> tuple[float, float]:
    """``(shift_factor, scaling_factor)``: the mean and 1 / the standard deviation of the
    training latents (posterior modes) of up to SCALE_IMAGES crops spread evenly over the
    split (its first ones would be one source dataset's), so that the diffusion model gets
    zero-mean, unit-variance inputs. SD's recipe is the scale alone; with so small a KL
    weight the latents need not be centred, and siamdiff's loader applies the shift too."""
    chosen = np.linspace(0, len(crops) - 1, min(len(crops), SCALE_IMAGES)).round().astype(int)
    items = [[(int(i), None)] for i in chosen]
    with _batches(crops, items, workers) as batches:
        latents = torch.cat(
            [vae.encode(batch.to(device)).latent_dist.mode().float().cpu() for batch in batches]
        )
    return float(latents.mean()), 1.0 / float(latents.std())


@torch.no_grad()
def score_reconstructions(
    vae: AutoencoderKL, crops: ImageCrops, device: torch.device, workers: int
) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """PSNR (dB, images in [0, 1]) and L1 of the held-out centre crops' reconstructions
    through the posterior mode; with the first 8 crops and their reconstructions."""
    items = [[(i, None)] for i in range(min(len(crops), HELD_OUT_IMAGES))]
    psnr, l1, shown, remade = [], [], [], []
    with _batches(crops, items, workers) as batches:
        for batch in batches:
            images = batch.to(device)
            reconstruction = vae.decode(vae.encode(images).latent_dist.mode()).sample.float()
            reconstruction = reconstruction.clamp(-1, 1)
            mse = (((reconstruction - images) / 2) ** 2).mean().item()
            psnr.append(10 * math.log10(1 / max(mse, 1e-12)))
            l1.append((reconstruction - images).abs().mean().item())
            if len(shown) < 8:
                shown.append(images.cpu())
                remade.append(reconstruction.cpu())
    scores = {"psnr_db": float(np.mean(psnr)), "l1": float(np.mean(l1)), "images": len(items)}
    return scores, torch.cat(shown), torch.cat(remade)


def train_vae(
    data: str | Path,
    out: str | Path,
    settings: VAESettings,
    device: str | torch.device = "cpu",
    workers: int = 0,
    resume: bool = False,
    overwrite: bool = False,
    verify: bool = True,
) -> Path:
    """Train an autoencoder on ``data``'s training split and write it to ``out`` (module
    docstring); returns ``out``. ``verify``: the dataset is refused up front when its files
    no longer match its manifest (an edited image would be trained on unnoticed)."""
    settings.check()
    data, out, device = Path(data), Path(out).absolute(), torch.device(device)
    check_apart(out, data, "the dataset")  # its files would make the dataset fail verify
    manifest = load_manifest(data)
    if verify:
        require_intact(data, "pass --no-verify")
    train_split = "train" if manifest.split("train") else None  # a folder of images: all
    held_out_split = None  # no split held out of training: scored on what it trained on
    if train_split is not None:
        held_out_split = next((s for s in ("val", "test") if manifest.split(s)), train_split)
    records = manifest.split(train_split)
    if not records:
        raise SiamdiffError("has no images to train on", data / "manifest-v1.json")
    held_out = manifest.split(held_out_split)
    crops = ImageCrops(data, records, settings.size)
    held_out_crops = ImageCrops(data, held_out, settings.size)
    fingerprint = manifest.images_fingerprint(train_split)
    # Steps draw images by their place in the list: a resume needs the same order too.
    order = hashlib.sha256("\n".join(r.image_sha256 for r in records).encode()).hexdigest()
    with exclusive_writer(out, 0, "siamdiff train-vae"):
        state = _check_out(out, resume, overwrite)
        if state is not None:
            saved = asdict(_settings_from(state["settings"]))
            changed = [k for k, v in asdict(settings).items() if saved[k] != v and k != "steps"]
            if changed:
                verb = "differs" if len(changed) == 1 else "differ"
                raise SiamdiffError(
                    f"was started with other settings ({', '.join(sorted(changed))} {verb}; "
                    "only --steps may change on --resume)",
                    out,
                )
            if state["data"] != fingerprint:
                raise SiamdiffError("was trained on other images than this dataset's", out)
            if state.get("order", order) != order:  # older checkpoints lack it
                raise SiamdiffError(
                    "lists its training images in another order than the run was started with "
                    "(prepared again?): a resume would draw other batches; --overwrite starts "
                    "again",
                    data / "manifest-v1.json",
                )
            if state["step"] > settings.steps:
                raise SiamdiffError(
                    f"has already trained {state['step']} steps, more than --steps "
                    f"{settings.steps}",
                    out,
                )
        out.mkdir(parents=True, exist_ok=True)
        vae = build_vae(settings).to(device)
        optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.lr, weight_decay=0.0)
        step, sums, seen = 0, dict.fromkeys(LOSS_TERMS, 0.0), 0
        if state is not None:
            _load_checkpoint(out, vae, optimizer, device)
            step, sums, seen = (
                int(state["step"]),
                state["pending"]["sums"],
                state["pending"]["seen"],
            )
        truncate_loss_log(out / LOSS_LOG, step)
        autocast = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")
        vae.train()

        def checkpoint() -> None:
            # The log's unwritten sums too: a resumed run logs what an uninterrupted one does.
            info = {
                "created_by": f"siamdiff {__version__}",
                "step": step,
                "settings": asdict(settings),
                "data": fingerprint,
                "order": order,
                "pending": {"sums": sums, "seen": seen},
            }
            _save_checkpoint(out, vae, optimizer, info)
            save_loss_curve(out / LOSS_LOG, out / "loss_curve.png", LOSS_TERMS)

        if state is None:
            checkpoint()  # marks the folder as this run's at once: resumable, overwritable
        steps = StepBatches(settings, len(crops), step + 1, settings.steps)
        loading = contextlib.ExitStack()  # closed with the loop, however it ends
        batches = loading.enter_context(_batches(crops, steps, workers))
        progress = tqdm(total=settings.steps, initial=step, desc="train-vae", unit="step")
        timed, started = 0, time.perf_counter()

        def log_row() -> None:
            nonlocal sums, seen, timed, started
            row = {"step": step, **{k: v / seen for k, v in sums.items()}}
            if timed:  # none for the row of a run resumed at its last step
                row["it_per_s"] = timed / (time.perf_counter() - started)
            with open(out / LOSS_LOG, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(row) + "\n")
            # refresh=False: drawn at tqdm's own pace (in a log, a line per redraw)
            progress.set_postfix(
                loss=f"{row['loss']:.4f}", ssim=f"{row['ssim']:.3f}", refresh=False
            )
            sums, seen = dict.fromkeys(LOSS_TERMS, 0.0), 0
            timed, started = 0, time.perf_counter()

        stop = StopRequest()  # Ctrl-C / SIGTERM: finish the step, checkpoint, exit
        stop.install()
        try:
            for images in batches:
                with autocast:
                    terms = vae_losses(
                        vae, images.to(device), settings, _step_noise(settings, step + 1, device)
                    )
                if not torch.isfinite(terms["loss"]):
                    raise SiamdiffError(
                        f"loss became {terms['loss'].item()} at step {step + 1} (start again "
                        "with a lower --lr and --overwrite)",
                        out,
                    )
                optimizer.zero_grad(set_to_none=True)
                terms["loss"].backward()
                torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
                optimizer.step()
                step += 1
                progress.update(1)
                for key in LOSS_TERMS:
                    sums[key] += terms[key].item()
                seen, timed = seen + 1, timed + 1
                if step % settings.log_every == 0 or step == settings.steps:
                    log_row()
                if step % settings.checkpoint_every == 0:
                    checkpoint()
                if stop.requested and step < settings.steps:
                    if step % settings.checkpoint_every:
                        checkpoint()
                    raise KeyboardInterrupt
        except torch.OutOfMemoryError as exc:
            raise out_of_memory_error(exc, MEMORY_ADVICE, out) from exc
        finally:
            stop.restore()
            progress.close()
            loading.close()
        if seen:  # a run resumed at its last step: the row its interruption held back
            log_row()
        if step % settings.checkpoint_every:  # finishing is resumable too
            checkpoint()
        vae.eval()
        shift_factor, scaling_factor = latent_normalisation(vae, crops, device, workers)
        vae.register_to_config(shift_factor=shift_factor, scaling_factor=scaling_factor)
        scores, shown, remade = score_reconstructions(vae, held_out_crops, device, workers)
        scores["split"] = held_out_split or "all"
        save_columns(out / "reconstructions.png", shown, remade)
        _write_model(
            vae.to("cpu"),
            out,
            {
                "created_by": f"siamdiff {__version__}",
                "settings": asdict(settings),
                "data": {
                    "root": str(data),
                    "train_images": len(records),
                    "fingerprint": fingerprint,
                },
                "held_out": scores,
                "shift_factor": shift_factor,
                "scaling_factor": scaling_factor,
                "steps": step,
                "losses": read_loss_log(out / LOSS_LOG),
            },
        )
        shutil.rmtree(out / CHECKPOINT, ignore_errors=True)
    return out


def _write_model(vae: AutoencoderKL, out: Path, info: dict[str, Any]) -> None:
    """diffusers' files and ``training.json``, ``config.json`` last: its presence says the
    model is whole. An older model's config goes first, so that no moment pairs it with the
    new weights (same shapes: loaded without error, its latents mis-scaled)."""
    with atomic_output_dir(out / ".model", overwrite=True) as tmp:
        vae.save_pretrained(tmp)
    (out / "config.json").unlink(missing_ok=True)
    for name in sorted(p.name for p in (out / ".model").iterdir() if p.name != "config.json"):
        (out / ".model" / name).replace(out / name)
    atomic_write_json(out / INFO_NAME, info)
    (out / ".model" / "config.json").replace(out / "config.json")
    shutil.rmtree(out / ".model")

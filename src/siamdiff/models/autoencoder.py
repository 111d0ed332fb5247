"""Frozen latent autoencoders behind one interface: TAEF2 and diffusers' VAEs.

The diffusion model never sees pixels: it works on ``encode(images)``, latents
already multiplied by the autoencoder's scaling factor (~unit variance), and
the sampler turns latents back into images with ``decode``. Images are always
RGB in [-1, 1]; each adapter converts to whatever range its network expects.
Colour conversions such as Lab are augmentations of the *hint*, never of the
autoencoder input: an RGB-pretrained VAE fed Lab tensors reconstructs badly,
one of the replication's failure causes (tests/models/test_autoencoder.py).
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, AutoencoderTiny
from torch import Tensor, nn

from siamdiff.atomic import read_json
from siamdiff.config import finite_number
from siamdiff.errors import SiamdiffError, first_line
from siamdiff.models.dhi import DenseHintInput
from siamdiff.models.loading import load_complete
from siamdiff.rng import cpu_seeded

TAEF2_ENCODER_FILE = "taef2_encoder.pth"
TAEF2_DECODER_FILE = "taef2_decoder.pth"
TAEF2_LATENT_CHANNELS = 32
# Measured with TAEF2 on 64 real frames (the first 32 of Kvasir-SEG/images and of
# CVC-ClinicDB/Original in name order, resized to 256x256): raw latents have mean
# -0.006 and std 0.804 over all channels and positions (per-channel std 0.55..1.08;
# reconstruction PSNR 34.5 dB mean), so 1 / 0.804 ~= 1.24 gives ~unit std.
TAEF2_SCALING_FACTOR = 1.24
DCT_SCALING_FACTOR = 1.0
# JPEG's (BT.601, full range) RGB -> YCbCr; on [-1, 1] inputs, so no offsets.
RGB_TO_YCBCR = torch.tensor(
    [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]]
)
# Mean and std of each kept DCT coefficient (luma 10, Cb 3, Cr 3) over 64 polyp frames of
# Kvasir-SEG + CVC-ClinicDB at 256 px: standardising by them gives ~unit-std latents.
DCT_COEFFICIENT_MEAN = torch.tensor(
    [-2.179, 0.0, -0.013, -0.004, 0.0, 0.008, -0.002, 0.0, 0.001, 0.008,
     -1.234, 0.0, 0.003, 1.725, -0.002, -0.003]
)  # fmt: skip
DCT_COEFFICIENT_STD = torch.tensor(
    [3.63, 0.543, 0.432, 0.233, 0.234, 0.199, 0.165, 0.173, 0.145, 0.15,
     0.848, 0.125, 0.104, 1.193, 0.172, 0.143]
)  # fmt: skip


# --- TAEF2 ------------------------------------------------------------------
# madebyollin's tiny autoencoder distilled from the FLUX.2 VAE. diffusers'
# AutoencoderTiny lacks the GroupNorm "pool" block variant, so the network is
# rebuilt here with module indices matching the published state dicts.


def _conv(n_in: int, n_out: int, bias: bool = True, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, stride=stride, padding=1, bias=bias)


class _Clamp(nn.Module):
    """Soft clamp of the latents to (-3, 3) before decoding."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x / 3) * 3


class _Block(nn.Module):
    """Residual block of three 3x3 convs; ``pool`` adds a GroupNorm channel mixer first."""

    def __init__(self, channels: int, pool: bool = False) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            _conv(channels, channels),
            nn.ReLU(),
            _conv(channels, channels),
            nn.ReLU(),
            _conv(channels, channels),
        )
        self.pool = (
            nn.Sequential(
                nn.Conv2d(channels, 4 * channels, 1, bias=False),
                nn.GroupNorm(4, 4 * channels),
                nn.ReLU(),
                nn.Conv2d(4 * channels, channels, 1, bias=False),
            )
            if pool
            else None
        )
        self.fuse = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + x)


def _taef2_encoder(width: int = 64) -> nn.Sequential:
    def stage(pool: bool = False) -> list[nn.Module]:
        return [_conv(width, width, bias=False, stride=2)] + [_Block(width, pool) for _ in range(3)]

    return nn.Sequential(
        _conv(3, width),
        _Block(width),
        *stage(),
        *stage(),
        *stage(pool=True),
        _conv(width, TAEF2_LATENT_CHANNELS),
    )


def _taef2_decoder(width: int = 64) -> nn.Sequential:
    def stage(blocks: int) -> list[nn.Module]:
        return [
            nn.Upsample(scale_factor=2),
            _conv(width, width, bias=False),
            *(_Block(width) for _ in range(blocks)),
        ]

    return nn.Sequential(
        _Clamp(),
        _conv(TAEF2_LATENT_CHANNELS, width),
        nn.ReLU(),
        *(_Block(width, pool=True) for _ in range(3)),
        *stage(3),
        *stage(3),
        *stage(1),
        _conv(width, 3),
    )


def _load_state_dict(module: nn.Module, file: Path) -> None:
    """Strictly load a plain state dict; any mismatch is a one-line user error."""
    if not file.is_file():
        raise SiamdiffError("TAEF2 weight file not found", file)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several unrelated types for corrupt files
        raise SiamdiffError(f"cannot read TAEF2 weights ({type(exc).__name__})", file) from exc
    if not isinstance(state, dict):
        raise SiamdiffError("is not a state dict", file)
    expected = set(module.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise SiamdiffError(
            f"keys do not match TAEF2 (missing {missing[:3]}, unexpected {unexpected[:3]})", file
        )
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1].strip()
        raise SiamdiffError(f"tensor shapes do not match TAEF2 ({first})", file) from exc


class TAEF2(nn.Module):
    """TAEF2: RGB [0, 1] <-> 32-channel latents at 1/8 resolution (raw, unscaled)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = _taef2_encoder()
        self.decoder = _taef2_decoder()

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> TAEF2:
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise SiamdiffError("is a file; TAEF2 weights are a directory: name that", directory)
        if not directory.is_dir():
            raise SiamdiffError("TAEF2 weights directory not found", directory)
        model = cls()
        _load_state_dict(model.encoder, directory / TAEF2_ENCODER_FILE)
        _load_state_dict(model.decoder, directory / TAEF2_DECODER_FILE)
        return model


# --- the interface ----------------------------------------------------------


def _hash_modules(*modules: nn.Module) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in a fixed order: weights
    and buffers, the non-persistent ones too (the DCT's basis and normalisation constants)."""
    digest = hashlib.sha256()
    for index, module in enumerate(modules):
        tensors = dict(module.state_dict()) | dict(module.named_buffers())
        for name, tensor in sorted(tensors.items()):
            data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
            digest.update(f"{index}.{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(data.numpy().tobytes())
    return digest.hexdigest()


class LatentAutoencoder(nn.Module, ABC):
    """A frozen autoencoder: RGB images in [-1, 1] <-> scaled latents.

    ``latents = (raw - shift_factor) * scaling_factor``. Subclasses implement the
    raw network calls and name the modules that determine ``encode``'s output.
    """

    kind: str

    def __init__(
        self,
        latent_channels: int,
        downscale: int,
        scaling_factor: float,
        shift_factor: float = 0.0,
    ) -> None:
        super().__init__()
        self.latent_channels = latent_channels
        self.downscale = downscale
        self.scaling_factor = float(scaling_factor)
        self.shift_factor = float(shift_factor)

    @abstractmethod
    def _encode_raw(self, images: Tensor) -> Tensor: ...

    @abstractmethod
    def _decode_raw(self, latents: Tensor) -> Tensor: ...

    @abstractmethod
    def _encoder_modules(self) -> tuple[nn.Module, ...]:
        """The modules whose weights determine ``encode`` (the decoder does not)."""

    def _freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()
        # Computed once, from the weights as loaded, so later dtype casts keep the name.
        self.identity = (
            f"{self.kind}:sha256={_hash_modules(*self._encoder_modules())}"
            f":scale={self.scaling_factor!r}:shift={self.shift_factor!r}"
        )

    def train(self, mode: bool = True) -> LatentAutoencoder:
        # Frozen for good: a parent model's .train() must not switch this one.
        return super().train(False)

    @property
    def _param(self) -> Tensor:
        return next(self.parameters())

    def encode(self, images: Tensor) -> Tensor:
        """Bx3xHxW RGB in [-1, 1] -> float32 latents, B x C x H/downscale x W/downscale."""
        param = self._param
        raw = self._encode_raw(images.to(device=param.device, dtype=param.dtype))
        return (raw.float() - self.shift_factor) * self.scaling_factor

    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents -> float32 RGB images in [-1, 1]."""
        param = self._param
        raw = latents.float() / self.scaling_factor + self.shift_factor
        images = self._decode_raw(raw.to(device=param.device, dtype=param.dtype))
        return images.float().clamp(-1, 1)


class TAEF2Autoencoder(LatentAutoencoder):
    kind = "taef2"

    def __init__(self, model: TAEF2, scaling_factor: float = TAEF2_SCALING_FACTOR) -> None:
        super().__init__(TAEF2_LATENT_CHANNELS, 8, scaling_factor)
        self.model = model
        self._freeze()

    def _encode_raw(self, images: Tensor) -> Tensor:
        return self.model.encoder((images + 1) / 2)

    def _decode_raw(self, latents: Tensor) -> Tensor:
        return self.model.decoder(latents).clamp(0, 1) * 2 - 1

    def _encoder_modules(self) -> tuple[nn.Module, ...]:
        return (self.model.encoder,)


class DiffusersKLAutoencoder(LatentAutoencoder):
    """diffusers ``AutoencoderKL`` (Stable Diffusion's VAE and its relatives).

    Encoding takes the posterior's mode instead of a sample: the cached latent of
    an image is then one reproducible value (the cache would otherwise freeze a
    single random draw anyway), and the SD VAE, trained with a tiny KL weight, has
    a posterior std so small next to the latents' spread that sampling adds no
    useful augmentation.
    """

    kind = "diffusers-kl"

    def __init__(self, vae: AutoencoderKL, scaling_factor: float | None = None) -> None:
        config = vae.config
        super().__init__(
            latent_channels=config.latent_channels,
            downscale=2 ** (len(config.block_out_channels) - 1),
            scaling_factor=config.scaling_factor if scaling_factor is None else scaling_factor,
            shift_factor=config.get("shift_factor") or 0.0,
        )
        self.vae = vae
        self._freeze()

    def _encode_raw(self, images: Tensor) -> Tensor:
        return self.vae.encode(images).latent_dist.mode()

    def _decode_raw(self, latents: Tensor) -> Tensor:
        return self.vae.decode(latents).sample

    def _encoder_modules(self) -> tuple[nn.Module, ...]:
        modules = (self.vae.encoder, self.vae.quant_conv)
        return tuple(m for m in modules if m is not None)


class DiffusersTinyAutoencoder(LatentAutoencoder):
    """diffusers ``AutoencoderTiny`` (TAESD and relatives without the pool block)."""

    kind = "diffusers-tiny"

    def __init__(self, vae: AutoencoderTiny, scaling_factor: float | None = None) -> None:
        config = vae.config
        super().__init__(
            latent_channels=config.latent_channels,
            downscale=2 ** (len(config.encoder_block_out_channels) - 1),
            scaling_factor=config.scaling_factor if scaling_factor is None else scaling_factor,
            shift_factor=config.get("shift_factor") or 0.0,
        )
        self.vae = vae
        self._freeze()

    # AutoencoderTiny's encoder and decoder take and return [-1, 1] themselves.
    def _encode_raw(self, images: Tensor) -> Tensor:
        return self.vae.encode(images).latents

    def _decode_raw(self, latents: Tensor) -> Tensor:
        return self.vae.decode(latents).sample

    def _encoder_modules(self) -> tuple[nn.Module, ...]:
        return (self.vae.encoder,)


# --- factory ----------------------------------------------------------------


def _dct_basis(block: int, max_order: int) -> Tensor:
    """Orthonormal 2-D DCT-II basis functions with u + v <= max_order, lowest first:
    ``[k, block * block]`` (rows orthonormal)."""
    x = torch.arange(block, dtype=torch.float64)
    u = torch.arange(block, dtype=torch.float64)[:, None]
    one_d = torch.cos((2 * x + 1) * u * math.pi / (2 * block)) * math.sqrt(2 / block)
    one_d[0] /= math.sqrt(2)
    orders = sorted((u + v, u, v) for u in range(block) for v in range(block) if u + v <= max_order)
    return torch.stack([torch.outer(one_d[u], one_d[v]).flatten() for _, u, v in orders]).float()


class DCTAutoencoder(LatentAutoencoder):
    """Weight-free, JPEG-like: YCbCr, 8x8 block DCT, the lowest-frequency coefficients kept.

    Luma keeps the 10 coefficients with u + v <= 3, each chroma channel the 3 with u + v <= 1:
    16 latent channels on the f=8 grid the DHI and UNet expect. It needs no download, so it is
    the default for CPU demos and tests; decoding is blurry and blocky (a low-quality JPEG),
    so real runs use TAEF2 or Stable Diffusion's VAE. (Raw 8x8 patches, 192 channels, are too
    wide for a tiny UNet to learn eps-prediction in a few hundred steps.)
    """

    kind = "dct"
    block = 8
    luma_order, chroma_order = 3, 1

    def __init__(self, scaling_factor: float = DCT_SCALING_FACTOR) -> None:
        luma = _dct_basis(self.block, self.luma_order)
        chroma = _dct_basis(self.block, self.chroma_order)
        super().__init__(len(luma) + 2 * len(chroma), self.block, scaling_factor)
        self.register_buffer("luma", luma, persistent=False)
        self.register_buffer("chroma", chroma, persistent=False)
        self.register_buffer("rgb_to_ycbcr", RGB_TO_YCBCR.clone(), persistent=False)
        self.register_buffer("coefficient_mean", DCT_COEFFICIENT_MEAN.clone(), persistent=False)
        self.register_buffer("coefficient_std", DCT_COEFFICIENT_STD.clone(), persistent=False)
        self._freeze()

    @property
    def _param(self) -> Tensor:
        return self.luma

    def _patches(self, planes: Tensor) -> Tensor:
        """[B, H, W] -> [B, h, w, 64]"""
        b, height, width = planes.shape
        patches = planes.reshape(b, height // 8, 8, width // 8, 8).permute(0, 1, 3, 2, 4)
        return patches.reshape(b, height // 8, width // 8, 64)

    def _encode_raw(self, images: Tensor) -> Tensor:
        ycbcr = torch.einsum("ij,bjhw->bihw", self.rgb_to_ycbcr, images)
        coefficients = [self._patches(ycbcr[:, 0]) @ self.luma.T] + [
            self._patches(ycbcr[:, c]) @ self.chroma.T for c in (1, 2)
        ]
        latents = torch.cat(coefficients, dim=-1).permute(0, 3, 1, 2)
        return (latents - self.coefficient_mean[:, None, None]) / self.coefficient_std[
            :, None, None
        ]

    def _decode_raw(self, latents: Tensor) -> Tensor:
        standard = (
            latents * self.coefficient_std[:, None, None] + self.coefficient_mean[:, None, None]
        )
        coefficients = standard.permute(0, 2, 3, 1)
        k = len(self.luma)
        planes = [coefficients[..., :k] @ self.luma] + [
            coefficients[..., k + i * len(self.chroma) : k + (i + 1) * len(self.chroma)]
            @ self.chroma
            for i in range(2)
        ]
        b, h, w, _ = coefficients.shape
        ycbcr = torch.stack(
            [
                p.reshape(b, h, w, 8, 8).permute(0, 1, 3, 2, 4).reshape(b, h * 8, w * 8)
                for p in planes
            ],
            dim=1,
        )
        return torch.einsum("ij,bjhw->bihw", torch.linalg.inv(self.rgb_to_ycbcr), ycbcr)

    def _encoder_modules(self) -> tuple[nn.Module, ...]:
        return (self,)  # no weights: its buffers (basis, colour matrix, statistics) decide


def random_kl_vae(seed: int = 0) -> AutoencoderKL:
    """A tiny randomly initialised AutoencoderKL (f=8, 4 latent channels) for tests and demos."""
    with cpu_seeded(seed):
        return AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 16, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
        )


def _pipeline_vae(local: Path) -> bool:
    """Whether ``local`` is a full diffusers pipeline folder, its VAE in vae/."""
    return not (local / "config.json").is_file() and (local / "vae" / "config.json").is_file()


def local_weights_dir(cfg: Mapping[str, Any]) -> Path | None:
    """The local directory an autoencoder config loads its weights from (a pipeline folder's
    vae/ when that is where they are); None for a Hub id or a weight-free kind."""
    path, subfolder = cfg.get("path"), cfg.get("subfolder")
    if cfg.get("kind") in ("dct", "random") or not path or not Path(path).is_dir():
        return None
    if cfg.get("kind") == "taef2":  # loaded from path itself, as load_autoencoder does
        return Path(path)
    local = Path(path, subfolder or "")
    return local / "vae" if not subfolder and _pipeline_vae(local) else local


def _hub_id_shaped(path: str) -> bool:
    """``owner/name`` (what diffusers would fetch), not a path to a local folder: a missing
    ``models/polyp-vae`` beside an existing ``models/`` is a mistyped path, not a Hub id (the
    Hub would be asked, five times over half a minute, and blamed)."""
    parts = path.split("/")
    return (
        len(parts) == 2
        and all(parts)
        and not path.startswith((".", "~"))
        and ".." not in path
        and not Path(parts[0]).exists()
    )


def _local_config(folder: Path) -> dict[str, Any]:
    """``folder/config.json`` ({} where there is none: a Hub id, or a folder diffusers
    refuses). One that is no JSON object diffusers takes for a failed download, and blames
    the connection to the Hub."""
    path = folder / "config.json"
    if not path.is_file():
        return {}
    config = read_json(path, "VAE config", "")
    if not isinstance(config, dict):
        raise SiamdiffError("is not a JSON object of model settings", path)
    return config


def _check_latent_factors(
    config: Mapping[str, Any], scaling_override: float | None, where: str
) -> None:
    """The shift and scaling factors a VAE's config.json gives its latents, held to the rule
    of the autoencoder.scaling_factor setting: finite numbers, the scale > 0 (a scale of 0
    trains on all-zero latents; a NaN surfaces only as a NaN loss, far from its cause). An
    autoencoder.scaling_factor setting replaces the file's scale, which then goes unread."""
    shift, scale = config.get("shift_factor"), config.get("scaling_factor")
    problems = {
        f"shift_factor must be a finite number or null, got {shift!r}": shift is not None
        and not finite_number(shift),
        f"scaling_factor must be a finite number > 0, got {scale!r}": scaling_override is None
        and not (finite_number(scale) and scale > 0),
    }
    for problem, found in problems.items():
        if found:
            raise SiamdiffError(problem, f"{where}/config.json")


def _from_pretrained(cls: type, path: str, subfolder: str | None) -> tuple[Any, str]:
    """The model of class ``cls`` at ``path`` (its ``subfolder``), and where it was read."""
    local = Path(path)
    if not local.exists() and not _hub_id_shaped(path):
        raise SiamdiffError("no such folder", path)  # never sent to the Hub as an id
    # A full Stable Diffusion pipeline folder keeps its VAE in vae/ (if it is of this class).
    pipeline = subfolder is None and _pipeline_vae(local)
    if pipeline:
        subfolder = "vae"
    where = f"{path}/{subfolder}" if subfolder else path
    saved_class = _local_config(Path(where)).get("_class_name")
    if pipeline and saved_class not in (None, cls.__name__):
        raise SiamdiffError(
            f"holds a {saved_class}, not a {cls.__name__}: choose the autoencoder kind "
            "that matches it",
            local / "vae",
        )
    try:
        model = load_complete(
            cls.from_pretrained,
            cls.__name__,
            where,
            pretrained_model_name_or_path=path,
            subfolder=subfolder,
        )
    except SiamdiffError:
        raise
    except Exception as exc:  # missing/corrupt files, offline hub, bad repo id: many types
        what = "" if local.exists() else "neither a local folder nor a Hub repo here: "
        raise SiamdiffError(f"{what}cannot load {cls.__name__} ({first_line(exc)})", where) from exc
    return model, where


def load_autoencoder(cfg: Mapping[str, Any]) -> LatentAutoencoder:
    """Build the frozen autoencoder a config names.

    ``cfg``: ``kind`` (taef2 | diffusers-kl | diffusers-tiny | random | dct), ``path``
    (directory or hub id; unused by random), ``subfolder`` (diffusers, optional),
    ``scaling_factor`` (optional override), ``seed`` (random only).
    """
    kind = cfg.get("kind")
    path = cfg.get("path")
    scaling_factor = cfg.get("scaling_factor")
    if kind == "random":
        return DiffusersKLAutoencoder(random_kl_vae(int(cfg.get("seed") or 0)), scaling_factor)
    if kind == "dct":
        return DCTAutoencoder(DCT_SCALING_FACTOR if scaling_factor is None else scaling_factor)
    if kind not in ("taef2", "diffusers-kl", "diffusers-tiny"):
        raise SiamdiffError(
            f"unknown autoencoder kind {kind!r} "
            "(expected taef2, diffusers-kl, diffusers-tiny, random or dct)",
            "autoencoder.kind",
        )
    if not path:
        where = {
            "taef2": "a TAEF2 directory",
            "diffusers-kl": "an AutoencoderKL directory or Hub id: Stable Diffusion's (the sd15 "
            "config takes it from backbone.path) or one made by `siamdiff train-vae`",
            "diffusers-tiny": "an AutoencoderTiny directory or Hub id",
        }[kind]
        raise SiamdiffError(
            f"autoencoder kind {kind!r} needs a path: set autoencoder.path to {where}",
            "autoencoder.path",
        )
    if kind == "taef2":
        model = TAEF2.from_pretrained(path)
        return TAEF2Autoencoder(
            model, TAEF2_SCALING_FACTOR if scaling_factor is None else scaling_factor
        )
    if kind == "diffusers-kl":
        vae, where = _from_pretrained(AutoencoderKL, str(path), cfg.get("subfolder"))
        if any(vae.config.get(key) is not None for key in ("latents_mean", "latents_std")):
            # Per-channel normalisation (SDXL-style pipelines): without it latents are misscaled.
            raise SiamdiffError(
                "this AutoencoderKL normalises its latents per channel (latents_mean / "
                "latents_std), which siamdiff does not apply: use a VAE without them",
                path,
            )
    else:
        vae, where = _from_pretrained(AutoencoderTiny, str(path), cfg.get("subfolder"))
    _check_latent_factors(vae.config, scaling_factor, where)
    adapter = DiffusersKLAutoencoder if kind == "diffusers-kl" else DiffusersTinyAutoencoder
    autoencoder: LatentAutoencoder = adapter(vae, scaling_factor)
    if autoencoder.downscale != DenseHintInput.downscale:
        raise SiamdiffError(
            f"this {autoencoder.kind} autoencoder downsamples by {autoencoder.downscale}; the "
            f"ControlNet's hint encoder makes an H/{DenseHintInput.downscale} latent grid, so "
            f"the autoencoder must downsample by {DenseHintInput.downscale} too",
            path,
        )
    return autoencoder

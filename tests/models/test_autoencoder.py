"""Latent autoencoders: TAEF2 on real frames, the diffusers adapters on tiny random VAEs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderTiny
from PIL import Image
from safetensors.torch import load_file, save_file

import siamdiff.models.autoencoder as autoencoder_module
from siamdiff.data import transforms
from siamdiff.errors import SiamdiffError
from siamdiff.models.autoencoder import (
    TAEF2,
    TAEF2_DECODER_FILE,
    TAEF2_ENCODER_FILE,
    LatentAutoencoder,
    load_autoencoder,
    local_weights_dir,
    random_kl_vae,
)


def _frame(path: Path, size: int) -> torch.Tensor:
    """A real frame as a 1x3xSxS RGB tensor in [-1, 1]."""
    with Image.open(path) as image:
        rgb = image.convert("RGB").resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two [-1, 1] images, on the [0, 1] scale."""
    mse = ((a - b) / 2).pow(2).mean().item()
    return 10 * math.log10(1 / mse)


@pytest.fixture(scope="module")
def taef2(shared_weights: Path) -> LatentAutoencoder:
    return load_autoencoder({"kind": "taef2", "path": shared_weights / "taef2"})


@pytest.fixture(scope="module")
def kvasir_frame(shared_data: Path) -> torch.Tensor:
    # The second frame in name order is a typical one (34.5 dB); the first, 29.0 dB, is the
    # hardest of the 64 measured for TAEF2_SCALING_FACTOR (whose mean was 34.5 dB).
    return _frame(sorted((shared_data / "Kvasir-SEG" / "images").glob("*.jpg"))[1], 256)


def _copy_taef2(src: Path, dst: Path, perturb: str | None = None) -> Path:
    """Copy the TAEF2 files, optionally nudging one weight of ``perturb``'s file."""
    dst.mkdir()
    for name in (TAEF2_ENCODER_FILE, TAEF2_DECODER_FILE):
        state = torch.load(src / name, weights_only=True)
        if name == perturb:
            state["0.bias" if "encoder" in name else "1.bias"][0] += 0.01
        torch.save(state, dst / name)
    return dst


def test_taef2_loads_strictly_and_is_frozen(taef2: LatentAutoencoder, shared_weights: Path):
    files = [shared_weights / "taef2" / f for f in (TAEF2_ENCODER_FILE, TAEF2_DECODER_FILE)]
    model = TAEF2.from_pretrained(shared_weights / "taef2")
    for module, file in zip((model.encoder, model.decoder), files, strict=True):
        state = torch.load(file, weights_only=True)
        assert set(module.state_dict()) == set(state)
        assert all(torch.equal(t, state[k].float()) for k, t in module.state_dict().items())
    assert (taef2.latent_channels, taef2.downscale) == (32, 8)
    assert not any(p.requires_grad for p in taef2.parameters())
    taef2.train()
    assert not taef2.training


@pytest.mark.parametrize("size", [256, 384])
def test_taef2_latent_shape(taef2: LatentAutoencoder, size: int):
    with torch.no_grad():
        latents = taef2.encode(torch.rand(1, 3, size, size) * 2 - 1)
    assert latents.shape == (1, 32, size // 8, size // 8)
    assert latents.dtype == torch.float32


@pytest.fixture(scope="module")
def kvasir_roundtrip(
    taef2: LatentAutoencoder, kvasir_frame: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The frame's latents and its reconstruction, shared by the tests below."""
    with torch.no_grad():
        latents = taef2.encode(kvasir_frame)
        return latents, taef2.decode(latents)


def test_taef2_reconstructs_a_real_frame(
    kvasir_frame: torch.Tensor, kvasir_roundtrip: tuple[torch.Tensor, torch.Tensor]
):
    latents, decoded = kvasir_roundtrip
    assert decoded.shape == kvasir_frame.shape
    assert decoded.min() >= -1 and decoded.max() <= 1
    assert _psnr(decoded, kvasir_frame) > 30
    # The default scaling factor brings the latents near unit variance.
    assert 0.6 < latents.std().item() < 1.5


def test_lab_input_breaks_the_rgb_autoencoder(
    taef2: LatentAutoencoder,
    kvasir_frame: torch.Tensor,
    kvasir_roundtrip: tuple[torch.Tensor, torch.Tensor],
):
    lab = transforms.rgb_to_lab_normalized((kvasir_frame + 1) / 2)
    with torch.no_grad():
        lab_decoded = taef2.decode(taef2.encode(lab))
    rgb_psnr = _psnr(kvasir_roundtrip[1], kvasir_frame)
    lab_psnr = _psnr(lab_decoded, kvasir_frame)
    assert rgb_psnr - lab_psnr > 10, (rgb_psnr, lab_psnr)


def test_taef2_identity_names_the_encoder_weights(
    taef2: LatentAutoencoder, shared_weights: Path, tmp_path: Path
):
    src = shared_weights / "taef2"
    same = load_autoencoder({"kind": "taef2", "path": _copy_taef2(src, tmp_path / "same")})
    encoder = _copy_taef2(src, tmp_path / "enc", perturb=TAEF2_ENCODER_FILE)
    decoder = _copy_taef2(src, tmp_path / "dec", perturb=TAEF2_DECODER_FILE)
    assert same.identity == taef2.identity
    assert taef2.identity.startswith("taef2:sha256=")
    assert load_autoencoder({"kind": "taef2", "path": encoder}).identity != taef2.identity
    # The decoder does not change the latents, so the cache may keep them.
    assert load_autoencoder({"kind": "taef2", "path": decoder}).identity == taef2.identity
    rescaled = load_autoencoder({"kind": "taef2", "path": src, "scaling_factor": 1.0})
    assert rescaled.identity != taef2.identity


def test_taef2_rejects_bad_weight_files(shared_weights: Path, tmp_path: Path):
    folder = _copy_taef2(shared_weights / "taef2", tmp_path / "bad")
    state = torch.load(folder / TAEF2_ENCODER_FILE, weights_only=True)
    state["99.weight"] = state.pop("14.weight")
    torch.save(state, folder / TAEF2_ENCODER_FILE)
    with pytest.raises(SiamdiffError, match=r"taef2_encoder\.pth: keys do not match") as info:
        TAEF2.from_pretrained(folder)
    assert "\n" not in str(info.value)

    (folder / TAEF2_DECODER_FILE).write_bytes(b"not a checkpoint")
    (folder / TAEF2_ENCODER_FILE).unlink()
    with pytest.raises(SiamdiffError, match="weight file not found"):
        TAEF2.from_pretrained(folder)


def test_taef2_missing_directory_is_a_user_error(tmp_path: Path):
    with pytest.raises(SiamdiffError, match="weights directory not found"):
        load_autoencoder({"kind": "taef2", "path": tmp_path / "nowhere"})


def test_random_autoencoder_shapes_and_determinism():
    autoencoder = load_autoencoder({"kind": "random", "seed": 1})
    images = torch.rand(2, 3, 64, 48) * 2 - 1
    with torch.no_grad():
        latents = autoencoder.encode(images)
        decoded = autoencoder.decode(latents)
    assert latents.shape == (2, 4, 8, 6)
    assert decoded.shape == images.shape
    assert decoded.abs().max() <= 1
    # Deterministic encoding (posterior mode): the same image gives the same latent.
    with torch.no_grad():
        assert torch.equal(autoencoder.encode(images), latents)
    assert load_autoencoder({"kind": "random", "seed": 1}).identity == autoencoder.identity
    assert load_autoencoder({"kind": "random", "seed": 2}).identity != autoencoder.identity


def test_diffusers_kl_loads_a_saved_vae(tmp_path: Path):
    # A Stable Diffusion pipeline folder keeps its VAE in vae/; the loader finds it.
    random_kl_vae(seed=3).save_pretrained(tmp_path / "vae")
    loaded = load_autoencoder({"kind": "diffusers-kl", "path": tmp_path})
    reference = load_autoencoder({"kind": "random", "seed": 3})
    assert loaded.identity == reference.identity
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(images), reference.encode(images))
    assert loaded.scaling_factor == pytest.approx(0.18215)


def test_incomplete_or_other_vae_weights_are_refused(tmp_path: Path):
    """diffusers fills what a checkpoint lacks with nothing (meta tensors) and only logs it."""
    random_kl_vae(seed=3).save_pretrained(tmp_path / "vae")
    with pytest.raises(SiamdiffError, match="vae: holds a AutoencoderKL, not a AutoencoderTiny"):
        load_autoencoder({"kind": "diffusers-tiny", "path": tmp_path})
    weights = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    save_file({k: v for k, v in state.items() if not k.startswith("decoder.conv_out")}, weights)
    with pytest.raises(SiamdiffError, match=r"AutoencoderKL weights are incomplete \(2 missing"):
        load_autoencoder({"kind": "diffusers-kl", "path": tmp_path})


def _save_tiny_vae(directory: Path) -> None:
    """A seeded AutoencoderTiny of width 8 (f = 8), saved in diffusers format."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        AutoencoderTiny(
            encoder_block_out_channels=(8, 8, 8, 8),
            decoder_block_out_channels=(8, 8, 8, 8),
            num_encoder_blocks=(1, 1, 1, 1),
            num_decoder_blocks=(1, 1, 1, 1),
        ).save_pretrained(directory)


def test_diffusers_tiny_loads_a_saved_vae(tmp_path: Path):
    _save_tiny_vae(tmp_path)
    autoencoder = load_autoencoder({"kind": "diffusers-tiny", "path": tmp_path})
    images = torch.rand(1, 3, 32, 40) * 2 - 1
    with torch.no_grad():
        latents = autoencoder.encode(images)
        assert latents.shape == (1, 4, 4, 5)
        assert autoencoder.decode(latents).shape == images.shape
    assert autoencoder.identity.startswith("diffusers-tiny:sha256=")


@pytest.mark.parametrize("kind", ["diffusers-kl", "diffusers-tiny"])
def test_a_scaling_factor_override_replaces_the_saved_one(kind: str, tmp_path: Path) -> None:
    """autoencoder.scaling_factor wins over the VAE config's (0.18215 KL, 1.0 tiny): latents
    are the raw latents times the override, and decode divides it back out."""
    if kind == "diffusers-kl":
        random_kl_vae(seed=3).save_pretrained(tmp_path)
    else:
        _save_tiny_vae(tmp_path)
    saved = load_autoencoder({"kind": kind, "path": tmp_path})
    overridden = load_autoencoder({"kind": kind, "path": tmp_path, "scaling_factor": 0.5})
    assert saved.scaling_factor != 0.5 and overridden.scaling_factor == 0.5
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        # The VAE's own raw latents (KL: the posterior mode); neither config has a shift.
        encoded = saved.vae.encode(images)
        raw = encoded.latent_dist.mode() if kind == "diffusers-kl" else encoded.latents
        latents = overridden.encode(images)
        torch.testing.assert_close(latents, raw * 0.5)
        torch.testing.assert_close(overridden.decode(latents), saved.decode(saved.encode(images)))
    assert overridden.identity != saved.identity  # cached latents of one are not the other's


def test_a_vae_whose_grid_is_not_h_over_8_is_refused(tmp_path: Path) -> None:
    """The ControlNet's hint encoder makes an H/8 grid: an f=4 VAE would fail mid-training."""
    AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
    ).save_pretrained(tmp_path / "f4")
    with pytest.raises(SiamdiffError, match="f4: this diffusers-kl autoencoder downsamples by 4"):
        load_autoencoder({"kind": "diffusers-kl", "path": tmp_path / "f4"})


def test_a_vae_with_per_channel_latent_statistics_is_refused(tmp_path: Path) -> None:
    vae = random_kl_vae(seed=3)
    vae.register_to_config(latents_mean=[0.1] * 4, latents_std=[2.0] * 4)
    vae.save_pretrained(tmp_path / "sdxl-style")
    with pytest.raises(SiamdiffError, match="sdxl-style: this AutoencoderKL normalises"):
        load_autoencoder({"kind": "diffusers-kl", "path": tmp_path / "sdxl-style"})


def test_shift_and_scale_follow_the_diffusers_convention(tmp_path: Path) -> None:
    """latents = (mode - shift) * scale, and decode undoes exactly that (SD3 / FLUX style)."""
    vae = random_kl_vae(seed=3)
    vae.register_to_config(scaling_factor=0.5, shift_factor=0.1)
    vae.save_pretrained(tmp_path / "shifted")
    autoencoder = load_autoencoder({"kind": "diffusers-kl", "path": tmp_path / "shifted"})
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        mode = vae.encode(images).latent_dist.mode()
        latents = autoencoder.encode(images)
        torch.testing.assert_close(latents, (mode - 0.1) * 0.5)
        torch.testing.assert_close(
            autoencoder.decode(latents), vae.decode(mode).sample.clamp(-1, 1)
        )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"scaling_factor": "abc"}, "scaling_factor must be a finite number > 0, got 'abc'"),
        # 0 trained on all-zero latents; NaN failed as a NaN loss, blaming the learning rate.
        ({"scaling_factor": 0}, "scaling_factor must be a finite number > 0, got 0"),
        ({"scaling_factor": None}, "scaling_factor must be a finite number > 0, got None"),
        ({"shift_factor": math.nan}, "shift_factor must be a finite number or null, got nan"),
        ({"shift_factor": "0.1"}, "shift_factor must be a finite number or null, got '0.1'"),
    ],
)
@pytest.mark.parametrize("kind", ["diffusers-kl", "diffusers-tiny"])
def test_latent_factors_of_a_config_json_are_checked_as_the_command_lines_are(
    kind: str, change: dict, message: str, tmp_path: Path
) -> None:
    if kind == "diffusers-kl":
        random_kl_vae(seed=3).save_pretrained(tmp_path / "vae")
    else:
        AutoencoderTiny(
            encoder_block_out_channels=(8, 8, 8, 8),
            decoder_block_out_channels=(8, 8, 8, 8),
            num_encoder_blocks=(1, 1, 1, 1),
            num_decoder_blocks=(1, 1, 1, 1),
        ).save_pretrained(tmp_path / "vae")
    config = tmp_path / "vae" / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | change))
    with pytest.raises(SiamdiffError, match=message) as error:
        load_autoencoder({"kind": kind, "path": tmp_path / "vae"})
    assert str(error.value).startswith(f"{config}: ") and "\n" not in str(error.value)
    if "scaling_factor" in change:  # autoencoder.scaling_factor overrides the file's own
        loaded = load_autoencoder({"kind": kind, "path": tmp_path / "vae", "scaling_factor": 0.5})
        assert loaded.scaling_factor == 0.5


@pytest.mark.parametrize("pipeline", [False, True])
def test_a_config_json_that_is_no_object_is_a_one_line_error(
    pipeline: bool, tmp_path: Path
) -> None:
    """diffusers took it for a failed download and blamed the connection to huggingface.co."""
    folder = tmp_path / "vae"
    random_kl_vae(seed=3).save_pretrained(folder / "vae" if pipeline else folder)
    config = folder / "vae" / "config.json" if pipeline else folder / "config.json"
    config.write_text(json.dumps([json.loads(config.read_text())]))
    with pytest.raises(SiamdiffError) as error:
        load_autoencoder({"kind": "diffusers-kl", "path": folder})
    assert str(error.value) == f"{config}: is not a JSON object of model settings"


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"kind": "sd99", "path": "x"}, "unknown autoencoder kind"),
        ({"kind": "taef2"}, "needs a path: set autoencoder.path to a TAEF2 directory"),
        ({"kind": "diffusers-kl"}, "needs a path: .* one made by `siamdiff train-vae`"),
        ({"kind": "taef2", "path": "{tmp}/notes.txt"}, "is a file; TAEF2 weights are a directory"),
        ({"kind": "diffusers-kl", "path": "{tmp}/no/such/vae"}, "vae: no such folder"),
        ({"kind": "diffusers-kl", "path": "./models/polyp-vae"}, "polyp-vae: no such folder"),
        ({"kind": "diffusers-tiny", "path": "{tmp}/empty"}, "cannot load AutoencoderTiny"),
    ],
)
def test_load_autoencoder_errors(tmp_path: Path, cfg: dict, message: str):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("not weights")
    if "path" in cfg:
        cfg = {**cfg, "path": cfg["path"].format(tmp=tmp_path)}
    with pytest.raises(SiamdiffError, match=message) as info:
        load_autoencoder(cfg)
    assert "\n" not in str(info.value)


def test_dct_autoencoder_is_weight_free_and_projects_exactly() -> None:
    autoencoder = load_autoencoder({"kind": "dct"})
    assert not list(autoencoder.parameters())
    assert autoencoder.latent_channels == 16 and autoencoder.downscale == 8
    images = torch.rand(2, 3, 64, 48) * 1.6 - 0.8
    latents = autoencoder.encode(images)
    assert latents.shape == (2, 16, 8, 6)
    # Decoding is an orthogonal projection onto the kept coefficients: re-encoding is exact.
    torch.testing.assert_close(
        autoencoder.encode(autoencoder.decode(latents)), latents, atol=1e-4, rtol=1e-4
    )
    # A block-constant image has only DC coefficients, which are kept: exact reconstruction.
    flat = torch.rand(1, 3, 2, 2).repeat_interleave(8, 2).repeat_interleave(8, 3) - 0.5
    torch.testing.assert_close(
        autoencoder.decode(autoencoder.encode(flat)), flat, atol=1e-5, rtol=1e-5
    )
    assert autoencoder.identity == load_autoencoder({"kind": "dct"}).identity
    assert autoencoder.identity != load_autoencoder({"kind": "dct", "scaling_factor": 2}).identity


def test_the_dct_identity_follows_its_constants(monkeypatch: pytest.MonkeyPatch) -> None:
    """The DCT has no weights: its normalisation decides its latents, hence the cache key."""
    before = load_autoencoder({"kind": "dct"}).identity
    doubled = autoencoder_module.DCT_COEFFICIENT_STD * 2
    monkeypatch.setattr(autoencoder_module, "DCT_COEFFICIENT_STD", doubled)
    assert load_autoencoder({"kind": "dct"}).identity != before


def test_dct_autoencoder_on_real_frames(shared_data: Path) -> None:
    autoencoder = load_autoencoder({"kind": "dct"})
    frames = sorted((shared_data / "Kvasir-SEG" / "images").glob("*.jpg"))[10:14]
    images = (
        torch.stack(
            [
                torch.from_numpy(np.array(Image.open(f).convert("RGB").resize((256, 256)))).permute(
                    2, 0, 1
                )
                for f in frames
            ]
        ).float()
        / 127.5
        - 1
    )
    latents = autoencoder.encode(images)
    assert 0.5 < latents.std().item() < 1.5  # standardised coefficients
    mse = ((autoencoder.decode(latents) - images) ** 2).mean(dim=(1, 2, 3))
    assert (10 * torch.log10(4 / mse)).mean() > 26  # a blurry but faithful JPEG-like copy


def test_the_weights_folder_is_the_one_loading_reads(tmp_path: Path) -> None:
    """taef2 loads from its path whatever subfolder says; export looked in the subfolder."""
    (tmp_path / "sd" / "vae").mkdir(parents=True)
    (tmp_path / "sd" / "vae" / "config.json").write_text("{}")
    taef2 = {"kind": "taef2", "path": str(tmp_path), "subfolder": "bogus"}
    assert local_weights_dir(taef2) == tmp_path
    kl = {"kind": "diffusers-kl", "path": str(tmp_path / "sd"), "subfolder": None}
    assert local_weights_dir(kl) == tmp_path / "sd" / "vae"  # a pipeline folder's VAE
    assert local_weights_dir(kl | {"subfolder": "vae"}) == tmp_path / "sd" / "vae"
    assert local_weights_dir({"kind": "dct", "path": None}) is None

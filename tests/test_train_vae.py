"""siamdiff train-vae: a real (tiny) autoencoder trained on phantom data, resumed, loaded."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import siamdiff.train_vae
from siamdiff.cli import build_parser, main
from siamdiff.data.manifest import load_manifest
from siamdiff.errors import SiamdiffError
from siamdiff.models.autoencoder import load_autoencoder
from siamdiff.train_vae import (
    CHECKPOINT,
    INFO_NAME,
    LOSS_TERMS,
    ImageCrops,
    VAESettings,
    step_items,
    train_vae,
)
from tests.helpers import PHANTOM_SIZE

TINY = VAESettings(
    size=PHANTOM_SIZE,
    steps=6,
    batch_size=4,
    widths=(8, 8, 16, 16),
    checkpoint_every=2,
    log_every=2,
)


def on_call(call: int, action):
    """``vae_losses``, except that ``action()`` runs at its ``call``-th call (a Ctrl-C
    arriving mid-step, an error)."""
    real = siamdiff.train_vae.vae_losses
    calls = 0

    def losses(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == call:
            action()
        return real(*args, **kwargs)

    return losses


def ctrl_c() -> None:
    os.kill(os.getpid(), signal.SIGINT)


def out_of_memory() -> None:
    raise torch.OutOfMemoryError("CUDA out of memory.")


@pytest.fixture(scope="module")
def trained(phantom_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("vae") / "vae"
    return train_vae(phantom_data, out, replace(TINY, steps=60, log_every=10, lr=1e-3))


def test_training_lowers_the_loss_and_writes_a_diffusers_autoencoder(trained: Path) -> None:
    info = json.loads((trained / INFO_NAME).read_text())
    losses = [row["loss"] for row in info["losses"]]
    assert len(losses) == 6 and losses[-1] < 0.8 * losses[0]
    assert info["held_out"]["split"] == "val" and info["held_out"]["psnr_db"] > 10
    assert not (trained / CHECKPOINT).exists()  # optimizer state is not part of the model
    for name in ("loss_curve.png", "reconstructions.png"):
        assert (trained / name).read_bytes().startswith(b"\x89PNG")
    assert json.loads((trained / "config.json").read_text())["scaling_factor"] == pytest.approx(
        info["scaling_factor"]
    )


def test_the_trained_autoencoder_gives_unit_variance_latents(
    trained: Path, phantom_data: Path
) -> None:
    """What the diffusion model is fed: scaled latents of the training images, std 1."""
    autoencoder = load_autoencoder({"kind": "diffusers-kl", "path": str(trained)})
    records = load_manifest(phantom_data).split("train")
    crops = ImageCrops(phantom_data, records, PHANTOM_SIZE)
    images = torch.stack([crops[(i, None)] for i in range(len(crops))])
    with torch.no_grad():
        latents = autoencoder.encode(images)
    assert latents.shape == (len(records), 4, PHANTOM_SIZE // 8, PHANTOM_SIZE // 8)
    assert latents.std().item() == pytest.approx(1.0, rel=1e-3)
    assert latents.mean().item() == pytest.approx(0.0, abs=1e-3)
    raw = json.loads((trained / "config.json").read_text())
    assert abs(raw["shift_factor"]) > 0.01  # the centring did something


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(
    phantom_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C mid-step finishes the step and checkpoints it (here step 3 of 6, between two
    scheduled checkpoints and log rows); the resumed run ends where an uninterrupted one
    does, its log included."""
    straight = train_vae(phantom_data, tmp_path / "straight", TINY)
    monkeypatch.setattr(siamdiff.train_vae, "vae_losses", on_call(3, ctrl_c))
    with pytest.raises(KeyboardInterrupt):
        train_vae(phantom_data, tmp_path / "resumed", TINY)
    monkeypatch.undo()
    state = json.loads((tmp_path / "resumed" / CHECKPOINT / "state.json").read_text())
    assert state["step"] == 3  # the step under way when Ctrl-C came was finished
    with pytest.raises(SiamdiffError, match="unfinished train-vae run"):
        train_vae(phantom_data, tmp_path / "resumed", TINY)
    with pytest.raises(SiamdiffError, match=r"other settings \(lr differs; only --steps"):
        train_vae(phantom_data, tmp_path / "resumed", replace(TINY, lr=1e-3, steps=8), resume=True)
    resumed = train_vae(phantom_data, tmp_path / "resumed", TINY, resume=True)
    name = "diffusion_pytorch_model.safetensors"
    expected, got = load_file(straight / name), load_file(resumed / name)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    logged = [
        [row[k] for k in ("step", *LOSS_TERMS)]
        for directory in (straight, resumed)
        for row in json.loads((directory / INFO_NAME).read_text())["losses"]
    ]
    assert logged[:3] == logged[3:] and [row[0] for row in logged[:3]] == [2, 4, 6]


def test_a_run_that_died_at_its_first_step_resumes_or_starts_again(
    phantom_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "vae"
    monkeypatch.setattr(siamdiff.train_vae, "vae_losses", on_call(1, out_of_memory))
    with pytest.raises(SiamdiffError, match="CUDA out of memory: lower --batch-size") as failure:
        train_vae(phantom_data, out, TINY)
    assert str(failure.value).startswith(f"{out}: ") and "\n" not in str(failure.value)
    monkeypatch.undo()
    assert json.loads((out / CHECKPOINT / "state.json").read_text())["step"] == 0
    train_vae(phantom_data, out, replace(TINY, steps=1), resume=True)
    assert (out / "config.json").is_file()


def test_an_overwrite_keeps_the_previous_model_until_the_new_one_is_done(
    phantom_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = train_vae(phantom_data, tmp_path / "vae", replace(TINY, steps=1))
    before = load_file(out / "diffusion_pytorch_model.safetensors")
    monkeypatch.setattr(siamdiff.train_vae, "vae_losses", on_call(2, out_of_memory))
    with pytest.raises(SiamdiffError, match="out of memory"):
        train_vae(phantom_data, out, replace(TINY, steps=4), overwrite=True)
    monkeypatch.undo()
    load_autoencoder({"kind": "diffusers-kl", "path": str(out)})  # still whole
    after = load_file(out / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    # The interrupted overwrite is the run --resume continues.
    train_vae(phantom_data, out, replace(TINY, steps=4), resume=True)
    assert json.loads((out / INFO_NAME).read_text())["steps"] == 4


def test_an_overwrite_never_pairs_the_old_config_with_the_new_weights(
    phantom_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same widths, other weights: the old scaling factor would load without an error and
    mis-scale every latent. A run killed while writing the new model leaves no config."""
    out = train_vae(phantom_data, tmp_path / "vae", replace(TINY, steps=1))
    real_write = siamdiff.train_vae.atomic_write_json

    def killed_at_training_json(path: Path, obj) -> None:
        if path.name == INFO_NAME:
            assert (out / "diffusion_pytorch_model.safetensors").is_file()
            raise KeyboardInterrupt
        real_write(path, obj)

    monkeypatch.setattr(siamdiff.train_vae, "atomic_write_json", killed_at_training_json)
    with pytest.raises(KeyboardInterrupt):
        train_vae(phantom_data, out, replace(TINY, steps=2, seed=1), overwrite=True)
    monkeypatch.undo()
    assert not (out / "config.json").exists()
    train_vae(phantom_data, out, replace(TINY, steps=2, seed=1), resume=True)
    assert json.loads((out / INFO_NAME).read_text())["settings"]["seed"] == 1


def interrupted_run(data: Path, out: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``out`` holding a run stopped by Ctrl-C at its second step."""
    monkeypatch.setattr(siamdiff.train_vae, "vae_losses", on_call(2, ctrl_c))
    with pytest.raises(KeyboardInterrupt):
        train_vae(data, out, TINY)
    monkeypatch.undo()
    return out


def interrupted_state(data: Path, out: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """The checkpoint state of :func:`interrupted_run` (its state.json, read)."""
    interrupted_run(data, out, monkeypatch)
    return json.loads((out / CHECKPOINT / "state.json").read_text())


@pytest.fixture
def interrupted(
    phantom_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Path, dict, Path]:
    """An interrupted run's folder, its checkpoint state (read) and that state's file."""
    out = tmp_path / "vae"
    return out, interrupted_state(phantom_data, out, monkeypatch), out / CHECKPOINT / "state.json"


def test_a_damaged_checkpoint_is_a_one_line_error(
    phantom_data: Path, interrupted: tuple[Path, dict, Path]
) -> None:
    out, state, state_path = interrupted
    weights = out / CHECKPOINT / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a disk that filled up
    with pytest.raises(SiamdiffError, match="cannot resume from this checkpoint"):
        train_vae(phantom_data, out, TINY, resume=True)
    del state["pending"]
    state_path.write_text(json.dumps(state))
    with pytest.raises(SiamdiffError, match=r"checkpoint \(pending missing or damaged\)"):
        train_vae(phantom_data, out, TINY, resume=True)
    state_path.write_text("[]")  # over an older model (whose record says whose folder it is)
    (out / INFO_NAME).write_text(json.dumps({"created_by": "siamdiff 0.1.0"}))
    with pytest.raises(SiamdiffError, match=r"checkpoint \(not a JSON object\)"):
        train_vae(phantom_data, out, TINY, resume=True)


def test_a_checkpoint_state_of_wrong_types_or_ranges_is_a_one_line_error(
    phantom_data: Path, interrupted: tuple[Path, dict, Path]
) -> None:
    out, state, state_path = interrupted
    for field, value in (
        ("step", -5),  # a ValueError in tqdm
        ("step", True),
        ("pending.seen", -1),
        ("pending.sums.l1", "x"),  # a TypeError adding the next step's loss to it
        ("pending.sums.kl", None),
        ("pending.sums.loss", math.inf),
    ):
        damaged = json.loads(json.dumps(state))
        *parents, key = field.split(".")
        node = damaged
        for name in parents:
            node = node[name]
        node[key] = value
        state_path.write_text(json.dumps(damaged))
        with pytest.raises(SiamdiffError) as error:
            train_vae(phantom_data, out, TINY, resume=True)
        assert str(error.value) == (
            f"{state_path}: cannot resume from this checkpoint ({parents[0] if parents else key} "
            "missing or damaged)"
        ), field
    state_path.write_text(json.dumps(state))  # the run itself was never touched
    train_vae(phantom_data, out, TINY, resume=True)
    assert json.loads((out / INFO_NAME).read_text())["steps"] == TINY.steps


def test_a_checkpoint_of_an_older_version_without_the_image_order_resumes(
    phantom_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "vae"
    state = interrupted_state(phantom_data, out, monkeypatch)
    del state["order"]
    (out / CHECKPOINT / "state.json").write_text(json.dumps(state))
    train_vae(phantom_data, out, TINY, resume=True)
    assert json.loads((out / INFO_NAME).read_text())["steps"] == TINY.steps


def test_a_run_resumed_at_its_last_step_logs_the_row_its_stop_held_back(
    phantom_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopped at step 3 (rows every 2 steps), resumed with --steps 3: step 3's row was lost."""
    out = tmp_path / "vae"
    monkeypatch.setattr(siamdiff.train_vae, "vae_losses", on_call(3, ctrl_c))
    with pytest.raises(KeyboardInterrupt):
        train_vae(phantom_data, out, TINY)
    monkeypatch.undo()
    train_vae(phantom_data, out, replace(TINY, steps=3), resume=True)
    losses = json.loads((out / INFO_NAME).read_text())["losses"]
    assert [row["step"] for row in losses] == [2, 3] and "it_per_s" not in losses[-1]


def test_an_out_inside_the_dataset_or_a_changed_image_is_refused_up_front(
    phantom_data: Path, tmp_path: Path
) -> None:
    """Inside, the model made the dataset fail verify (and train refuse it); a changed image
    was trained on without a word."""
    with pytest.raises(SiamdiffError, match="is, holds or lies inside the dataset"):
        train_vae(phantom_data, phantom_data / "vae", TINY)
    assert not (phantom_data / "vae").exists()
    data = Path(shutil.copytree(phantom_data, tmp_path / "data"))
    image = data / load_manifest(data).split("train")[0].image
    image.write_bytes(image.read_bytes()[:-1] + b"x")
    with pytest.raises(SiamdiffError, match="dataset does not verify"):
        train_vae(data, tmp_path / "vae", TINY)
    assert not (tmp_path / "vae").exists()


@pytest.mark.parametrize("steps", [40, 1])
def test_an_error_in_a_loader_worker_ends_the_process(
    phantom_data: Path, tmp_path: Path, steps: int
) -> None:
    """Workers ignore SIGTERM: left running after the error, the interpreter's exit waited
    for them forever. A step reads the damaged image while training; after a single one,
    the latent scale's pass over the split does."""
    data = Path(shutil.copytree(phantom_data, tmp_path / "data"))
    image = data / load_manifest(data).split("train")[0].image
    image.write_bytes(image.read_bytes()[:300])
    batch = 8 if steps > 1 else 1
    script = (
        "from siamdiff.train_vae import VAESettings, train_vae\n"
        "from siamdiff.errors import SiamdiffError\n"
        f"settings = VAESettings(size=32, steps={steps}, batch_size={batch},"
        " widths=(8, 8, 16, 16))\n"
        "try:\n"
        f"    train_vae({str(data)!r}, {str(tmp_path / 'vae')!r}, settings, workers=1,"
        " verify=False)\n"
        "except SiamdiffError as error:\n"
        "    print('stopped:', error)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0 and "stopped:" in done.stdout, done.stderr[-2000:]


def test_the_latent_scale_comes_from_crops_across_the_split(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first 256 of the training split were CVC-ClinicDB frames only."""
    drawn = []

    @contextlib.contextmanager
    def batches(crops, items, workers):
        drawn.extend(index for [(index, _)] in items)
        yield [torch.randn(1, 3, 8, 8)]

    class Encoder:
        def encode(self, images):
            mode = torch.randn(1, 4, 2, 2)
            return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: mode))

    monkeypatch.setattr(siamdiff.train_vae, "_batches", batches)
    monkeypatch.setattr(siamdiff.train_vae, "SCALE_IMAGES", 4)
    crops = list(range(10))
    siamdiff.train_vae.latent_normalisation(Encoder(), crops, torch.device("cpu"), 0)
    assert drawn == [0, 3, 6, 9]


def test_a_one_row_loss_curve_shows_its_point(tmp_path: Path) -> None:
    """A run of log_every steps or fewer logs one row: its curve was four empty panels."""
    from PIL import Image

    from siamdiff.report import save_loss_curve

    log = tmp_path / "losses.jsonl"
    log.write_text(json.dumps({"step": 12, **dict.fromkeys(LOSS_TERMS, 0.5)}) + "\n")
    save_loss_curve(log, tmp_path / "curve.png", LOSS_TERMS)
    pixels = np.asarray(Image.open(tmp_path / "curve.png").convert("RGB")).astype(int)
    line_colour = np.array([31, 119, 180])  # matplotlib's first colour
    assert (np.abs(pixels - line_colour).sum(axis=-1) < 30).sum() > 4 * len(LOSS_TERMS)


def test_resume_and_overwrite_together_are_refused(phantom_data: Path, tmp_path: Path) -> None:
    """A restart script that always passes --overwrite must not discard the run it resumes."""
    out = train_vae(phantom_data, tmp_path / "vae", replace(TINY, steps=1))
    with pytest.raises(SiamdiffError, match=r"--resume continues .* pass one"):
        train_vae(phantom_data, out, TINY, resume=True, overwrite=True)


def test_a_dataset_without_images_is_refused_before_anything_is_written(
    phantom_data: Path, tmp_path: Path
) -> None:
    manifest = json.loads((phantom_data / "manifest-v1.json").read_text())
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "manifest-v1.json").write_text(json.dumps({**manifest, "records": []}))
    with pytest.raises(SiamdiffError, match=r"manifest-v1\.json: has no images to train on"):
        train_vae(empty, tmp_path / "vae", TINY)
    assert not (tmp_path / "vae").exists()


def test_a_resume_refuses_the_images_in_another_order(
    phantom_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Steps draw images by their place in the list: the same images in another order would
    train other batches than the uninterrupted run."""
    out = interrupted_run(phantom_data, tmp_path / "vae", monkeypatch)
    manifest = json.loads((phantom_data / "manifest-v1.json").read_text())
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    for record in manifest["records"]:
        for key in ("image", "mask"):
            (shuffled / record[key]).parent.mkdir(parents=True, exist_ok=True)
            (shuffled / record[key]).symlink_to(phantom_data / record[key])
    manifest["records"] = manifest["records"][::-1]
    (shuffled / "manifest-v1.json").write_text(json.dumps(manifest))
    with pytest.raises(SiamdiffError, match="in another order"):
        train_vae(shuffled, out, TINY, resume=True)


def test_out_may_be_the_current_directory(
    phantom_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "vae").mkdir()
    monkeypatch.chdir(tmp_path / "vae")
    assert train_vae(phantom_data, ".", replace(TINY, steps=1)) == tmp_path / "vae"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["vae"]
    assert (tmp_path / "vae" / "config.json").is_file()


def test_loader_workers_change_nothing_but_the_speed(phantom_data: Path, tmp_path: Path) -> None:
    """Crops and flips are drawn from per-step seeds, not from each worker's own RNG."""
    settings = replace(TINY, steps=2)
    name = "diffusion_pytorch_model.safetensors"
    alone = load_file(train_vae(phantom_data, tmp_path / "alone", settings) / name)
    helped = load_file(train_vae(phantom_data, tmp_path / "helped", settings, workers=2) / name)
    assert all(torch.equal(alone[k], helped[k]) for k in alone)


def test_existing_outputs_are_kept_unless_asked(phantom_data: Path, tmp_path: Path) -> None:
    done = train_vae(phantom_data, tmp_path / "vae", replace(TINY, steps=1))
    with pytest.raises(SiamdiffError, match="holds a trained autoencoder"):
        train_vae(phantom_data, done, replace(TINY, steps=1))
    train_vae(phantom_data, done, replace(TINY, steps=2), overwrite=True)
    assert json.loads((done / INFO_NAME).read_text())["steps"] == 2
    other = tmp_path / "thesis"
    other.mkdir()
    (other / "chapter1.tex").write_text("years of work")
    with pytest.raises(SiamdiffError, match="is not a train-vae output"):
        train_vae(phantom_data, other, TINY, overwrite=True)
    assert (other / "chapter1.tex").read_text() == "years of work"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (replace(TINY, widths=(8, 8, 16)), "--widths must be 4 multiples of 8"),
        (replace(TINY, size=20), "--size must be a multiple of 8"),
        (replace(TINY, lr=float("nan")), "--lr must be > 0"),
        (replace(TINY, size=64), "smaller than the 64 px crops"),
    ],
)
def test_impossible_settings_are_one_line_errors_before_anything_is_written(
    phantom_data: Path, tmp_path: Path, settings: VAESettings, message: str
) -> None:
    with pytest.raises(SiamdiffError, match=message) as failure:
        train_vae(phantom_data, tmp_path / "vae", settings)
    assert "\n" not in str(failure.value)
    assert not (tmp_path / "vae").exists()


def test_each_step_draws_its_own_batch_whatever_came_before() -> None:
    first = step_items(TINY, 15, 7)
    assert first == step_items(TINY, 15, 7) != step_items(TINY, 15, 8)
    assert len({index for index, _ in first}) == TINY.batch_size  # distinct images
    assert len(step_items(TINY, 2, 1)) == TINY.batch_size  # fewer images than the batch


def test_the_command_line_defaults_are_the_settings_defaults() -> None:
    args = build_parser().parse_args(["train-vae", "data", "--out", "vae"])
    given = {name: getattr(args, name) for name in vars(VAESettings()) if hasattr(args, name)}
    assert given == {k: v for k, v in vars(VAESettings()).items() if k in given}
    assert set(vars(VAESettings())) - set(given) == {"log_every"}


def test_cli_trains_and_names_the_config_settings(
    phantom_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "vae"
    argv = ["train-vae", str(phantom_data), "--out", str(out), "--size", str(PHANTOM_SIZE)]
    argv += ["--steps", "1", "--batch-size", "2", "--widths", "8,8,16,16"]
    assert main(argv) == 0
    assert f"autoencoder.kind=diffusers-kl autoencoder.path={out}" in capsys.readouterr().out
    assert main([*argv[:-1], "8,8,16"]) == 2
    assert capsys.readouterr().err.strip() == (
        "siamdiff: error: --widths must be 4 multiples of 8 (f=8: the hint encoder's grid), "
        "got 8,8,16"
    )


def test_the_loss_weighs_l1_ssim_and_the_gaussian_kl_as_set() -> None:
    settings = replace(TINY, kl_weight=0.5, ssim_weight=0.3)
    torch.manual_seed(0)
    vae = siamdiff.train_vae.build_vae(settings)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    terms = siamdiff.train_vae.vae_losses(vae, images, settings, torch.Generator().manual_seed(1))
    # The KL of N(mean, var) to N(0, 1) in closed form, per image and pixel.
    posterior = vae.encode(images).latent_dist
    mean, var = posterior.mean, posterior.var
    kl = 0.5 * (mean**2 + var - 1 - var.log()).sum(dim=(1, 2, 3)).mean() / images[0].numel()
    torch.testing.assert_close(terms["kl"], kl, rtol=1e-4, atol=1e-7)
    assert 0 < terms["ssim"] < 1 and terms["l1"] > 0 and terms["kl"] > 0
    expected = terms["l1"] + 0.3 * (1 - terms["ssim"]) + 0.5 * terms["kl"]
    torch.testing.assert_close(terms["loss"], expected)

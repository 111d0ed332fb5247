"""Export a trained run to a diffusers-style directory and load it back for sampling."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from siamdiff.cli import main
from siamdiff.config import load_config
from siamdiff.data.manifest import load_manifest, sha256_file, verify
from siamdiff.errors import SiamdiffError
from siamdiff.export import build_model, export_run, load_export
from siamdiff.models.autoencoder import load_autoencoder, random_kl_vae
from siamdiff.sample import ddim_sample
from siamdiff.train import checkpoints, train
from tests.helpers import tiny_config


@pytest.fixture(scope="module")
def trained_run(phantom_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("export") / "run"
    train(tiny_config(phantom_data, run, "train.max_steps=2", "train.sample_every=100"))
    return run


def test_export_reproduces_the_checkpoints_predictions(trained_run: Path, tmp_path: Path):
    out = export_run(trained_run, tmp_path / "export")
    assert {p.name for p in out.iterdir()} == {
        "siamdiff.json",
        "unet",
        "controlnet",
        "scheduler",
        "text",
    }
    meta = json.loads((out / "siamdiff.json").read_text())
    assert meta["step"] == 2 and meta["mode"] == "siamese" and meta["resolution"] == 32
    cfg = load_config(trained_run / "config.yaml")
    assert (meta["prompt"], meta["crop"]) == (cfg.backbone.prompt, cfg.data.transforms.crop)
    assert meta["prompt"] == "endoscopic image of a colonic polyp"
    checkpoint = checkpoints(trained_run)[-1]
    assert meta["weights_sha256"] == sha256_file(checkpoint / "model.safetensors")

    reference, _, _ = build_model(cfg)
    reference.load_state_dict(load_file(checkpoint / "model.safetensors"))
    loaded = load_export(out)
    # Every tensor exactly (after 2 steps a lost part, the prompt embeddings, say, would hide
    # within the predictions' tolerance).
    exported = loaded.model.state_dict()
    assert exported.keys() == reference.state_dict().keys()
    assert all(torch.equal(exported[k], v) for k, v in reference.state_dict().items())
    torch.manual_seed(0)
    channels = loaded.autoencoder.latent_channels
    zt, hint = torch.randn(2, channels, 4, 4), (torch.rand(2, 3, 32, 32) > 0.5).float()
    t = torch.tensor([10, 900])
    with torch.no_grad():
        text = reference.text([loaded.prompt, ""])
        expected = reference.predict_mask(zt, t, text, hint)
        actual = loaded.model.predict_mask(zt, t, loaded.model.text([loaded.prompt, ""]), hint)
    torch.testing.assert_close(actual, expected)

    latents = ddim_sample(
        loaded.model,
        hint,
        loaded.model.text([loaded.prompt] * 2),
        loaded.model.text(["", ""]),
        steps=3,
        guidance=9.0,
    )
    images = loaded.autoencoder.decode(latents)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()


def test_the_model_built_from_a_config_has_its_augmentation_settings() -> None:
    cfg = load_config("tiny", ["model.aug_t_max=300", "model.aug_start=0.5"])
    model = build_model(cfg)[0]
    assert (model.mode, model.aug_t_max, model.aug_start) == ("siamese", 300, 0.5)


def test_export_refuses_what_it_cannot_do(trained_run: Path, tmp_path: Path):
    with pytest.raises(SiamdiffError, match="no checkpoints"):
        export_run(tmp_path, tmp_path / "x")
    with pytest.raises(SiamdiffError, match=r"no complete checkpoint '99' \(the newest: step-0"):
        export_run(trained_run, tmp_path / "x", checkpoint="99")
    by_step = export_run(trained_run, tmp_path / "by-step", checkpoint="2")  # step-00000002
    assert json.loads((by_step / "siamdiff.json").read_text())["step"] == 2
    out = export_run(trained_run, tmp_path / "export")
    with pytest.raises(SiamdiffError, match="already exists"):
        export_run(trained_run, out)
    meta = json.loads((out / "siamdiff.json").read_text())
    meta["autoencoder"]["scaling_factor"] = 2.0
    (out / "siamdiff.json").write_text(json.dumps(meta))
    with pytest.raises(SiamdiffError, match="autoencoder weights differ"):
        load_export(out)
    with pytest.raises(SiamdiffError, match="not a siamdiff export"):
        load_export(tmp_path)


def test_a_damaged_export_is_one_line(trained_run: Path, tmp_path: Path):
    out = export_run(trained_run, tmp_path / "export")
    meta_path = out / "siamdiff.json"
    meta = json.loads(meta_path.read_text())
    for broken, message in (
        ([meta], "is not a JSON object"),
        ({**meta, "mode": None}, None),
        ({**meta, "autoencoder": "dct"}, "autoencoder must be an object naming its kind"),
        ({**meta, "autoencoder": None}, "autoencoder must be an object naming its kind"),
        (
            {**meta, "autoencoder": {**meta["autoencoder"], "scaling_factor": "x"}},
            "autoencoder.scaling_factor must be a number",
        ),
        ({**meta, "text": {"kind": "t5"}}, "text must be an object of kind learned or clip"),
        ({**meta, "mode": "foo"}, "mode must be one of siamese, mask-only, got 'foo'"),
        ({**meta, "resolution": 33}, "resolution must be a positive multiple of 8, got 33"),
        ({**meta, "crop": "zoom"}, "crop must be one of crop, pad, got 'zoom'"),
        ({**meta, "trained_on": "x"}, r"trained_on must be null or an object \{data: path"),
        ({**meta, "trained_on": {"data": "d", "split": None, "images": 1}}, "trained_on must"),
    ):
        if message is None:
            del broken["mode"]
            message = "lacks mode"
        meta_path.write_text(json.dumps(broken))
        with pytest.raises(SiamdiffError, match=message) as error:
            load_export(out)
        assert str(error.value).startswith(str(meta_path)) or message.startswith("is not")
    meta_path.write_text(json.dumps(meta))
    embeddings = out / "text" / "embeddings.safetensors"
    embeddings.write_bytes(embeddings.read_bytes()[: embeddings.stat().st_size // 2])
    with pytest.raises(SiamdiffError, match="incomplete export"):
        load_export(out)
    export_run(trained_run, out, overwrite=True)
    shutil.rmtree(out / "scheduler")  # a missing folder is no Hub id to fetch
    with pytest.raises(SiamdiffError, match="incomplete export") as error:
        load_export(out)
    assert "huggingface.co" not in str(error.value)
    export_run(trained_run, out, overwrite=True)
    weights = next((out / "unet").glob("*.safetensors"))
    state = load_file(weights)  # tensors lacking: diffusers left them on "meta", a traceback
    save_file({k: v for k, v in state.items() if not k.startswith("conv_out.")}, weights)
    with pytest.raises(SiamdiffError, match="UNet weights are incomplete"):
        load_export(out)
    export_run(trained_run, out, overwrite=True)
    scheduler = out / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps(json.loads(scheduler.read_text()) | {"prediction_type": "x"}))
    with pytest.raises(SiamdiffError, match=r"scheduler: prediction_type 'x' is not supported"):
        load_export(out)
    learned = json.loads((out / "siamdiff.json").read_text())["trained_on"]
    assert learned["split"] == "train"
    assert learned["images"] == load_manifest(learned["data"]).images_fingerprint("train")


def test_an_export_names_the_images_learned_after_the_data_moved(trained_run: Path, tmp_path: Path):
    """The checkpoint records the fingerprint of the images it learned from: an export made
    after the data folder was renamed still tells the leak guard which images they were."""
    run = Path(shutil.copytree(trained_run, tmp_path / "run"))
    cfg = load_config(run / "config.yaml")
    learned = load_manifest(cfg.data.root).images_fingerprint("train")
    config = (run / "config.yaml").read_text().replace(cfg.data.root, str(tmp_path / "gone"))
    (run / "config.yaml").write_text(config)
    out = export_run(run, tmp_path / "export")
    meta = json.loads((out / "siamdiff.json").read_text())
    assert meta["trained_on"] == {
        "data": str(tmp_path / "gone"),
        "split": "train",
        "images": learned,
    }


def test_a_checkpoint_of_other_shapes_than_the_config_is_one_line(
    trained_run: Path, tmp_path: Path
):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    config = (run / "config.yaml").read_text()
    assert "    base_channels: null\n" in config
    (run / "config.yaml").write_text(config.replace("base_channels: null", "base_channels: 8"))
    with pytest.raises(SiamdiffError, match="checkpoint does not match the run's config") as error:
        export_run(run, tmp_path / "export")
    assert "\n" not in str(error.value)


def test_export_never_replaces_the_run_or_other_data(trained_run: Path, tmp_path: Path):
    for out in (trained_run, trained_run / "export", trained_run.parent):
        with pytest.raises(SiamdiffError, match="is, holds or lies inside the run"):
            export_run(trained_run, out, overwrite=True)
    assert checkpoints(trained_run)  # still there
    # Written into the training data, it made the run's --resume fail verification.
    data = Path(load_config(trained_run / "config.yaml").data.root)
    with pytest.raises(SiamdiffError, match="lies inside the run's training data"):
        export_run(trained_run, data / "export")
    assert not (data / "export").exists()
    other = tmp_path / "data"
    other.mkdir()
    (other / "keep.txt").write_text("a user's file")
    with pytest.raises(SiamdiffError, match=r"no siamdiff\.json"):
        export_run(trained_run, other, overwrite=True)
    assert (other / "keep.txt").read_text() == "a user's file"
    first = export_run(trained_run, tmp_path / "export")
    assert export_run(trained_run, first, overwrite=True) == first  # an export is replaced
    notes = tmp_path / "notes.txt"
    notes.write_text("a user's file")
    with pytest.raises(SiamdiffError, match="is a file, not an export"):
        export_run(trained_run, notes, overwrite=True)
    assert notes.read_text() == "a user's file"


def test_cli_export_prints_one_line_errors(trained_run: Path, tmp_path: Path, capsys):
    assert main(["export", str(trained_run), str(tmp_path / "e")]) == 0
    assert main(["export", str(tmp_path / "nothing"), str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("siamdiff: error:")


def test_cli_sample_from_a_run_writes_a_verified_synthetic_set(
    trained_run: Path, phantom_data: Path, tmp_path: Path
):
    out = tmp_path / "syn"
    argv = [
        "sample",
        str(trained_run),
        "--masks",
        f"{phantom_data}:train",
        "--out",
        str(out),
        "--steps",
        "2",
        "--limit",
        "2",
        "--per-mask",
        "2",
        "--format",
        "pranet",
    ]
    assert main(argv) == 0
    assert verify(out).ok
    assert len(load_manifest(out).records) == 4
    assert len(list((out / "export-pranet" / "images").iterdir())) == 4
    assert main(argv) == 0  # the same command again: everything is reused


def test_export_refuses_an_autoencoder_changed_since_training_or_a_folder_inside_it(
    phantom_data: Path, tmp_path: Path
) -> None:
    """A retrained autoencoder at the run's path was exported (and sampled) without a word,
    its identity recorded as the one trained with; an export inside the weights folder copied
    itself into itself until the path grew too long."""
    weights = tmp_path / "vae"
    random_kl_vae(seed=3).save_pretrained(weights)
    run = tmp_path / "run"
    overrides = ["autoencoder.kind=diffusers-kl", f"autoencoder.path={weights}"]
    train(tiny_config(phantom_data, run, "train.max_steps=1", *overrides))
    with pytest.raises(SiamdiffError, match="lies inside the autoencoder's weights"):
        export_run(run, weights / "export")
    assert sorted(p.name for p in weights.iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]
    random_kl_vae(seed=4).save_pretrained(weights)  # train-vae --overwrite, say
    with pytest.raises(SiamdiffError, match="is not the autoencoder the run was trained with"):
        export_run(run, tmp_path / "export")
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("subfolder", ["vae", None])  # None: found in vae/ by itself
def test_an_export_carries_its_local_autoencoder_to_another_machine(
    subfolder: str | None, phantom_data: Path, tmp_path: Path
) -> None:
    """The autoencoder's weights travel inside the export: it loads with the original folder
    gone (a colleague's machine); of a Stable Diffusion folder only vae/ is copied."""
    weights = tmp_path / "sd"
    random_kl_vae(seed=3).save_pretrained(weights / "vae")
    for item in (*(weights / "vae").iterdir(), weights / "vae"):  # a read-only weights store
        item.chmod(0o555 if item.is_dir() else 0o444)
    (weights / "unet").mkdir()
    (weights / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"gigabytes, not copied")
    run = tmp_path / "run"
    overrides = ["autoencoder.kind=diffusers-kl", f"autoencoder.path={weights}"]
    overrides += [f"autoencoder.subfolder={subfolder}"] if subfolder else []
    train(tiny_config(phantom_data, run, "train.max_steps=1", *overrides))
    referenced = export_run(run, tmp_path / "here", copy_autoencoder=False)  # sample RUN's
    assert not (referenced / "autoencoder").exists()
    export_run(run, tmp_path / "export")
    (weights / "vae").chmod(0o755)
    shutil.rmtree(weights)
    moved = shutil.move(tmp_path / "export", tmp_path / "elsewhere")
    assert sorted(p.name for p in (moved / "autoencoder").iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]
    # Copied with the umask's modes: a read-only copy could be neither deleted nor replaced.
    assert all(p.stat().st_mode & 0o200 for p in (moved / "autoencoder", *moved.rglob("*")))
    loaded = load_export(moved)
    assert (
        loaded.autoencoder.identity
        == load_autoencoder({"kind": "diffusers-kl", "path": str(moved / "autoencoder")}).identity
    )

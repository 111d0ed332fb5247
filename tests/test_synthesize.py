"""``siamdiff sample``: synthetic datasets from a trained tiny model, resumable and rank-split."""

from __future__ import annotations

import json
import shutil
from copy import deepcopy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import siamdiff.data.manifest as manifest_module
import siamdiff.synthesize as synth
from siamdiff.cli import PEER_STOPPED
from siamdiff.config import RUN_CONFIG
from siamdiff.data.dataset import GeneratorView, generator_views
from siamdiff.data.manifest import MANIFEST_NAME, load_manifest, verify
from siamdiff.data.phantom import make_phantom_dataset
from siamdiff.data.prepare import prepare
from siamdiff.errors import SiamdiffError
from siamdiff.export import export_run
from siamdiff.synthesize import (
    augment_mask,
    derived_seed,
    split_masks_argument,
    spread_subset,
    synthesize,
)
from siamdiff.train import checkpoints, train
from tests.helpers import PHANTOM_SIZE, launch_two_processes, out_of_memory_on_call, tiny_config

LIMIT, PER_MASK, BATCH = 4, 2, 3  # 8 pairs: masks 0-2 and 3 of sample 0, then of sample 1


@pytest.fixture(scope="module")
def trained_run(phantom_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("synthesize") / "run"
    train(tiny_config(phantom_data, run, "train.max_steps=2", "train.sample_every=100"))
    return run


@pytest.fixture(scope="module")
def exported(trained_run: Path) -> Path:
    return export_run(trained_run, trained_run.parent / "export")


def sample(model: Path, data: Path, out: Path, **kwargs) -> synth.SynthesisSummary:
    options = {"steps": 2, "per_mask": PER_MASK, "limit": LIMIT, "batch_size": BATCH}
    return synthesize(model, data, out, progress=False, **(options | kwargs))


@pytest.fixture(scope="module")
def reference(exported: Path, phantom_data: Path) -> Path:
    """One uninterrupted run that the resumed, rank-split and run-directory runs must match."""
    out = exported.parent / "reference"
    summary = sample(exported, phantom_data, out)
    assert (summary.generated, summary.reused, summary.manifest_written) == (8, 0, True)
    return out


def files(root: Path) -> dict[str, bytes]:
    """Every visible file under ``root`` (the journal and settings are bookkeeping)."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


def png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_output_is_a_verified_synthetic_dataset(reference: Path, phantom_data: Path, exported):
    report = verify(reference)
    assert report.checked == 16 and not (report.changed or report.missing or report.unreadable)
    assert report.ok, report
    manifest = load_manifest(reference)
    sources = {r.id: r for r in load_manifest(phantom_data).split("train")}
    ids = sorted(sources)
    first = [ids[k * len(ids) // LIMIT] for k in range(LIMIT)]
    assert manifest.kind == "synthetic"
    assert [r.id for r in manifest.records] == [f"{s}-s{k:02d}" for s in first for k in (0, 1)]
    for record in manifest.records:
        source = sources[record.extra["source_id"]]
        k = record.extra["sample_index"]
        assert record.image == f"{source.id}-s{k:02d}.png"
        assert record.mask == f"{source.id}-s{k:02d}_mask.png"
        assert (record.dataset, record.group, record.split, record.frame) == (
            source.dataset,
            source.group,
            source.split,
            source.frame,
        )
        assert record.extra["seed"] == derived_seed(42, source.id, k, "noise")
        assert record.extra["model"] == str(exported.resolve())
        assert record.extra["sampler"] == {
            "scheduler": "ddim",
            "steps": 2,
            "guidance": 9.0,
            "control_scale": 1.0,
            "eta": 0.0,
            "mask_aug": [],
            "precision": "fp32",
            "batch_size": BATCH,
            "speed": [],
            "cpu_threads": torch.get_num_threads(),
        }
        mask, image = png(reference / record.mask), png(reference / record.image)
        assert image.shape == (PHANTOM_SIZE, PHANTOM_SIZE, 3) and record.width == PHANTOM_SIZE
        assert set(np.unique(mask)) <= {0, 255}
        assert record.coverage == pytest.approx((mask > 0).mean(), abs=1e-6)
        # Without augmentation the saved mask is the source mask at the model's resolution.
        np.testing.assert_array_equal(mask, png(phantom_data / source.mask))
    # Samples of one mask differ: their noise seeds differ.
    assert not np.array_equal(*(png(reference / f"{first[0]}-s{k:02d}.png") for k in (0, 1)))
    grid = png(reference / "samples.png")
    assert grid.shape[1] == 3 * PHANTOM_SIZE + 4 * 2  # mask | real | synthetic, 2 px padding
    assert grid.shape[0] == LIMIT * PHANTOM_SIZE + (LIMIT + 1) * 2


def test_rerun_keeps_everything_and_other_seeds_give_other_images(
    reference: Path, exported: Path, phantom_data: Path, tmp_path: Path
):
    before = files(reference)
    summary = sample(exported, phantom_data, reference)
    assert (summary.generated, summary.reused) == (0, 8)
    assert files(reference) == before
    other = sample(exported, phantom_data, tmp_path / "other", seed=7)
    assert other.manifest_written
    name = load_manifest(reference).records[0].image
    assert not np.array_equal(png(reference / name), png(tmp_path / "other" / name))


def test_batch_size_changes_neither_seeds_nor_masks(
    reference: Path, exported: Path, phantom_data: Path, tmp_path: Path
):
    """Noise and masks never depend on batch position. The network's floating point may
    (matmul blocking differs with the batch), so pixels agree to one rounding step."""
    sample(exported, phantom_data, tmp_path / "one", batch_size=1)
    single, batched = load_manifest(tmp_path / "one"), load_manifest(reference)
    for a, b in zip(single.records, batched.records, strict=True):
        assert (a.id, a.mask_sha256, a.extra["seed"]) == (b.id, b.mask_sha256, b.extra["seed"])
        difference = png(tmp_path / "one" / a.image).astype(int) - png(reference / b.image)
        assert np.abs(difference).max() <= 1


def test_channels_last_samples_the_same_pairs_and_says_so(
    reference: Path, exported: Path, phantom_data: Path, tmp_path: Path
):
    sample(exported, phantom_data, tmp_path / "nhwc", speed="channels_last")
    fast, plain = load_manifest(tmp_path / "nhwc"), load_manifest(reference)
    for a, b in zip(fast.records, plain.records, strict=True):
        assert a.extra["sampler"]["speed"] == ["channels_last"]
        assert b.extra["sampler"]["speed"] == []
        assert a.extra["sampler"]["cpu_threads"] == torch.get_num_threads()
        difference = png(tmp_path / "nhwc" / a.image).astype(int) - png(reference / b.image)
        assert np.abs(difference).max() <= 1


def test_resume_after_a_crash_ends_byte_identical(
    reference: Path, exported: Path, phantom_data: Path, tmp_path: Path, monkeypatch
):
    out = tmp_path / "syn"
    real_save = manifest_module.atomic_save_png
    calls = []

    def crash_after_three_pairs_and_an_image(path, array):
        if len(calls) == 7:
            raise RuntimeError("simulated crash")
        calls.append(path)
        return real_save(path, array)

    monkeypatch.setattr(manifest_module, "atomic_save_png", crash_after_three_pairs_and_an_image)
    with pytest.raises(RuntimeError, match="simulated crash"):
        sample(exported, phantom_data, out)
    monkeypatch.undo()
    records = load_manifest(reference).records  # mask m's sample k is records[2 * m + k]
    journal = out / ".journal-0.jsonl"
    assert len(journal.read_text().splitlines()) == 3
    assert (out / records[6].image).is_file() and not (out / records[6].mask).exists()
    assert not (out / "manifest-v1.json").exists()
    # A kill mid-line, a temporary file of a killed write, and a finished file damaged later.
    with open(journal, "ab") as handle:  # bytes that are no UTF-8 too (a disk error)
        handle.write(b'\xff\xfe garbage\n{"id": "phantom-p0')
    (out / f".{records[1].image}.x1y2.tmp").write_bytes(b"half")
    (out / records[2].image).write_bytes(b"damaged")

    summary = sample(exported, phantom_data, out)
    assert (summary.generated, summary.reused, summary.manifest_written) == (6, 2, True)
    assert files(out) == files(reference)
    assert not list(out.glob(".*.tmp"))
    assert verify(out).checked == 16


def test_a_larger_per_mask_grows_a_set_to_what_one_run_writes(
    reference: Path, exported: Path, phantom_data: Path, tmp_path: Path
):
    out = tmp_path / "syn"
    assert sample(exported, phantom_data, out, per_mask=1).manifest_written
    first = files(out)
    grown = sample(exported, phantom_data, out)
    assert (grown.generated, grown.reused, grown.manifest_written) == (LIMIT, LIMIT, True)
    assert files(out) == files(reference)
    assert all(first[name] == files(reference)[name] for name in first if "-s00" in name)
    assert json.loads((out / synth.SETTINGS_NAME).read_text())["per_mask"] == PER_MASK
    with pytest.raises(SiamdiffError, match="holds 2 samples per mask: a set grows, never shrinks"):
        sample(exported, phantom_data, out, per_mask=1)  # fewer: the others would be left over
    assert files(out) == files(reference)


def test_a_grown_set_rewrites_the_copies_an_earlier_run_exported(
    exported: Path, phantom_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Grown without --format, its nnU-Net copy still held the first half: a tool pointed at
    it trained on part of the set."""
    out = tmp_path / "syn"
    sample(exported, phantom_data, out, per_mask=1, formats=("nnunet", "folder"))

    def interrupted(*args):
        raise KeyboardInterrupt

    # Stopped while rewriting them: the set must not look finished beside stale copies.
    monkeypatch.setattr(synth, "export_format", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sample(exported, phantom_data, out)
    assert not (out / MANIFEST_NAME).exists()
    monkeypatch.undo()
    grown = sample(exported, phantom_data, out, formats=("pranet",))
    assert set(grown.exports) == {"pranet", "nnunet", "folder"}
    ids = [r.id for r in load_manifest(out).records]
    assert len(ids) == LIMIT * PER_MASK
    nnunet = json.loads((out / "export-nnunet" / "dataset.json").read_text())
    assert nnunet["numTraining"] == len(ids)
    assert sorted(p.name for p in (out / "export-folder").iterdir()) == sorted(
        name for i in ids for name in (f"{i}.png", f"{i}_mask.png")
    )


def test_settings_of_a_run_that_made_no_pair_do_not_bind_the_output(
    exported: Path, phantom_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A run that failed while loading its model left its settings: the corrected command
    was refused as other settings, though no pair was ever made."""
    out = tmp_path / "syn"
    monkeypatch.setattr(synth, "ddim_sample", out_of_memory_on_call(synth.ddim_sample, call=1))
    with pytest.raises(SiamdiffError, match="out of memory"):
        sample(exported, phantom_data, out, guidance=7.5)
    monkeypatch.undo()
    assert json.loads((out / synth.SETTINGS_NAME).read_text())["guidance"] == 7.5
    assert sample(exported, phantom_data, out).manifest_written
    assert json.loads((out / synth.SETTINGS_NAME).read_text())["guidance"] == 9.0


def test_a_rerun_rewriting_pairs_has_no_manifest_until_it_is_done(
    reference: Path, exported: Path, phantom_data: Path, tmp_path: Path, monkeypatch
):
    """A finished output whose pair is damaged: the rerun rewrites it, and interrupted half-way
    it must not look finished, its old manifest beside files that no longer match it."""
    out = tmp_path / "syn"
    shutil.copytree(reference, out)
    (out / load_manifest(reference).records[1].image).write_bytes(b"damaged")
    monkeypatch.setattr(synth, "ddim_sample", out_of_memory_on_call(synth.ddim_sample, call=1))
    with pytest.raises(SiamdiffError, match="out of memory"):
        sample(exported, phantom_data, out)
    assert not (out / "manifest-v1.json").exists()
    monkeypatch.undo()
    summary = sample(exported, phantom_data, out)
    assert (summary.generated, summary.manifest_written) == (1, True)
    assert files(out) == files(reference)


def test_out_of_memory_says_lower_the_batch_and_a_rerun_continues(
    exported: Path, phantom_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    out = tmp_path / "syn"
    monkeypatch.setattr(synth, "ddim_sample", out_of_memory_on_call(synth.ddim_sample, call=2))
    with pytest.raises(SiamdiffError) as error:
        sample(exported, phantom_data, out)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{out}: CUDA out of memory.")
    assert message.endswith(
        "lower --batch-size; the pairs already written are kept and a rerun continues"
    )
    monkeypatch.undo()
    summary = sample(exported, phantom_data, out, batch_size=1)
    assert (summary.generated, summary.reused, summary.manifest_written) == (5, BATCH, True)


def test_other_settings_on_an_existing_output_are_refused(
    reference: Path, exported: Path, phantom_data: Path, tmp_path: Path
):
    out = tmp_path / "syn"
    shutil.copytree(reference, out)
    with pytest.raises(SiamdiffError) as error:
        sample(exported, phantom_data, out, seed=43, guidance=7.5)
    message = str(error.value)
    assert "\n" not in message and str(out) in message
    assert "guidance, seed differ" in message and "--overwrite" in message
    summary = sample(exported, phantom_data, out, seed=43, guidance=7.5, overwrite=True)
    assert (summary.generated, summary.reused) == (8, 0)
    assert load_manifest(out).records[0].extra["seed"] == derived_seed(
        43, "phantom-p00-0000", 0, "noise"
    )

    # A copy without its dotfiles (settings, journals) still names its settings in its
    # manifest: other settings were silently sampled over it.
    copied = tmp_path / "copied"
    shutil.copytree(reference, copied, ignore=shutil.ignore_patterns(".*"))
    before = files(copied)
    with pytest.raises(SiamdiffError, match="guidance differs"):
        sample(exported, phantom_data, copied, guidance=7.5)
    assert files(copied) == before
    # The same settings: its manifest lists its finished pairs (they were all sampled again).
    assert sample(exported, phantom_data, copied).reused == 8
    assert files(copied) == before
    grown = sample(exported, phantom_data, copied, per_mask=3)  # its manifest goes, pairs stay
    assert (grown.generated, grown.reused, grown.manifest_written) == (LIMIT, 8, True)

    # An output written before control_scale existed was sampled at scale 1: it resumes.
    settings_path = reference / synth.SETTINGS_NAME
    older = tmp_path / "older"
    shutil.copytree(reference, older)
    settings = json.loads(settings_path.read_text())
    del settings["control_scale"]
    (older / synth.SETTINGS_NAME).write_text(json.dumps(settings))
    assert sample(exported, phantom_data, older).reused == 8
    with pytest.raises(SiamdiffError, match="control_scale differs"):
        sample(exported, phantom_data, older, control_scale=2.0)
    (older / synth.SETTINGS_NAME).write_text("[1, 2]")
    with pytest.raises(SiamdiffError, match="is not a JSON object of sampling settings"):
        sample(exported, phantom_data, older)

    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"x")
    for overwrite in (False, True):
        with pytest.raises(SiamdiffError, match="not a siamdiff synthesis output"):
            sample(exported, phantom_data, foreign, overwrite=overwrite)
    assert (foreign / "holiday.jpg").read_bytes() == b"x"


def test_a_moved_project_resumes_but_other_masks_or_models_are_refused(
    reference: Path, exported: Path, phantom_data: Path, tmp_path: Path
):
    """Masks, model and output moved together (another disk, a renamed folder) named the same
    content by other paths: the rerun was refused as other settings, hours of pairs lost."""
    before = tmp_path / "before"
    shutil.copytree(phantom_data, before / "data")
    shutil.copytree(exported, before / "model")
    assert sample(before / "model", before / "data", before / "syn").manifest_written
    moved = tmp_path / "moved"
    before.rename(moved)
    summary = sample(moved / "model", moved / "data", moved / "syn")
    assert (summary.generated, summary.reused, summary.manifest_written) == (0, 8, True)
    assert files(moved / "syn") == files(reference) | {
        MANIFEST_NAME: (moved / "syn" / MANIFEST_NAME).read_bytes()
    }
    synthesis = load_manifest(moved / "syn").preprocessing["synthesis"]
    assert synthesis["masks"] == str(moved / "data") and synthesis["model"] == str(moved / "model")

    # Unfinished (no manifest: its journal lists its pairs) and moved again: it resumes too.
    (moved / "syn" / MANIFEST_NAME).unlink()
    again = tmp_path / "again"
    moved.rename(again)
    assert sample(again / "model", again / "data", again / "syn").reused == 8

    # Other masks at another path: the set would mix pairs of two datasets.
    raw = make_phantom_dataset(tmp_path / "raw", n=24, size=64, groups=6, seed=2)
    prepare([("folder", raw)], tmp_path / "other", size=PHANTOM_SIZE, workers=1, progress=False)
    with pytest.raises(SiamdiffError, match=r"other settings \(masks differs\)"):
        sample(again / "model", tmp_path / "other", again / "syn")

    # Another model's weights behind a model folder elsewhere: refused by their SHA-256.
    run = tmp_path / "other-run"
    train(tiny_config(phantom_data, run, "train.max_steps=1", "train.sample_every=100"))
    other_model = export_run(run, tmp_path / "other-model")
    with pytest.raises(
        SiamdiffError, match=r"other settings \(model_identity, model_weights differ\)"
    ):
        sample(other_model, again / "data", again / "syn")
    # A set of an older version named its model by path alone: elsewhere, even a copy of it
    # cannot be told from another model.
    settings_path = again / "syn" / synth.SETTINGS_NAME
    settings = json.loads(settings_path.read_text())
    del settings["model_weights"], settings["model_trained_on"]
    settings_path.write_text(json.dumps(settings))
    copy = shutil.copytree(again / "model", tmp_path / "copy")
    with pytest.raises(SiamdiffError, match=r"other settings \(model differs\)"):
        sample(copy, again / "data", again / "syn")
    assert sample(again / "model", again / "data", again / "syn").reused == 8


def test_a_run_sampled_from_resumes_after_its_data_moved(
    trained_run: Path, phantom_data: Path, tmp_path: Path
):
    """A run's data moved and its config pointed at the new folder: what the run learned from
    now reads another path, yet its weights, compared by their SHA-256, are the same model,
    and the set resumes."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    data = Path(shutil.copytree(phantom_data, tmp_path / "data"))
    config = (run / RUN_CONFIG).read_text()
    (run / RUN_CONFIG).write_text(config.replace(str(phantom_data), str(data)))
    assert sample(run, data, tmp_path / "syn").generated == 8
    learned = load_manifest(tmp_path / "syn").preprocessing["synthesis"]["model_trained_on"]
    assert learned["images"] == load_manifest(data).images_fingerprint("train")
    (tmp_path / "syn" / MANIFEST_NAME).unlink()  # unfinished: its journal lists its pairs
    data.rename(tmp_path / "renamed")
    (run / RUN_CONFIG).write_text(config.replace(str(phantom_data), str(tmp_path / "renamed")))
    assert sample(run, tmp_path / "renamed", tmp_path / "syn").reused == 8


def test_an_interrupted_overwrite_never_looks_finished_and_is_overwritten_again(
    reference: Path, exported: Path, phantom_data: Path, tmp_path: Path, monkeypatch
):
    """Deleted in place, a Ctrl-C left the old manifest over half its files; or the manifest
    gone first, a folder that --overwrite refused as no synthesis output."""
    import siamdiff.atomic

    out = tmp_path / "syn"
    shutil.copytree(reference, out)
    real_rmtree = shutil.rmtree

    def ctrl_c_half_way(path, *args, **kwargs):
        for name in (MANIFEST_NAME, synth.SETTINGS_NAME, ".journal-0.jsonl"):
            (Path(path) / name).unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(siamdiff.atomic.shutil, "rmtree", ctrl_c_half_way)
    with pytest.raises(KeyboardInterrupt):
        sample(exported, phantom_data, out, overwrite=True)
    monkeypatch.setattr(siamdiff.atomic.shutil, "rmtree", real_rmtree)
    assert not (out / MANIFEST_NAME).exists()
    summary = sample(exported, phantom_data, out, overwrite=True)
    assert (summary.generated, summary.manifest_written) == (8, True)
    assert files(out) == files(reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["syn"]  # the aside copy cleared

    # Through a symbolic link: the folder it names is replaced and the link kept.
    (tmp_path / "link").symlink_to(out)
    summary = sample(exported, phantom_data, tmp_path / "link", overwrite=True)
    assert summary.generated == 8 and (tmp_path / "link").is_symlink()
    assert files(out) == files(reference)
    # The folder it works in cannot be renamed away: refused before anything is deleted.
    monkeypatch.chdir(out)
    with pytest.raises(SiamdiffError, match="holds the current directory"):
        sample(exported, phantom_data, Path("."), overwrite=True)
    assert files(out) == files(reference)


def test_a_real_dataset_is_never_sampled_into_or_deleted(
    exported: Path, phantom_data: Path, tmp_path: Path
):
    other_real = Path(shutil.copytree(phantom_data, tmp_path / "real"))
    before = files(other_real)
    for overwrite in (False, True):
        with pytest.raises(SiamdiffError, match="not a siamdiff synthesis output"):
            sample(exported, phantom_data, other_real, overwrite=overwrite)
        for out in (phantom_data, phantom_data / "syn"):
            with pytest.raises(SiamdiffError, match="is, holds or lies inside the masks dataset"):
                sample(exported, phantom_data, out, overwrite=overwrite)
        with pytest.raises(SiamdiffError, match="is, holds or lies inside the model"):
            sample(exported, phantom_data, exported / "syn", overwrite=overwrite)
    assert files(other_real) == before and not (other_real / synth.SETTINGS_NAME).exists()
    assert not (phantom_data / "syn").exists() and verify(phantom_data).ok


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"formats": ("coco",)}, "unknown export format 'coco'"),
        ({"mask_aug": ("rotate",)}, "unknown mask augmentation 'rotate'"),
        ({"scheduler": "euler"}, "unknown scheduler 'euler'"),
        ({"scheduler": "unipc", "eta": 0.5}, "eta applies to ddim only"),
        ({"rank": 2, "world_size": 2}, "rank 2 is not in 0..1"),
        ({"per_mask": 0}, "--per-mask must be at least 1"),
        ({"limit": 0}, "--limit must be at least 1"),
        ({"control_scale": -0.5}, "--control-scale must be a finite number >= 0"),
        ({"control_scale": float("nan")}, "--control-scale must be a finite number >= 0"),
        ({"guidance": float("nan")}, "--guidance must be a finite number >= 0"),
        ({"eta": 3.0}, r"--eta must be in \[0, 1\]"),
        ({"steps": 1000}, r"--steps must be 2\.\.500 for ddim, got 1000 \(dpmsolver"),
        ({"steps": 1}, r"--steps must be 2\.\.500 for ddim, got 1 "),
        ({"steps": 1000, "scheduler": "unipc"}, r"--steps must be 1\.\.999 for unipc, got 1000$"),
        ({"speed": "fast"}, "unknown speed lever 'fast'"),
        ({"speed": "bf16_frozen", "device": "cpu"}, "bf16_frozen needs a CUDA device"),
    ],
)
def test_bad_arguments_are_one_line_errors(
    options: dict, expected: str, exported: Path, phantom_data: Path, tmp_path: Path
):
    with pytest.raises(SiamdiffError, match=expected) as error:
        sample(exported, phantom_data, tmp_path / "syn", **options)
    assert "\n" not in str(error.value) and not (tmp_path / "syn").exists()


def test_a_model_that_is_not_one_is_refused(phantom_data: Path, tmp_path: Path):
    with pytest.raises(SiamdiffError, match="neither an export"):
        sample(tmp_path, phantom_data, tmp_path / "syn")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"trained_on": "x"}, r"trained_on must be null or an object \{data: path"),
        ({"trained_on": {"data": 1, "split": "train"}}, "trained_on must be null or an object"),
        ({"crop": "zoom"}, "crop must be one of crop, pad, got 'zoom'"),
        ({"resolution": 12.5}, "resolution must be a positive multiple of 8, got 12.5"),
    ],
)
def test_an_export_with_damaged_metadata_is_refused_before_sampling(
    change: dict, message: str, exported: Path, phantom_data: Path, tmp_path: Path
):
    """``trained_on: "x"`` was sampled from, and train-segmenter --extra of the set failed
    with a TypeError; a bad crop was reported as a transform setting of no file."""
    damaged = Path(shutil.copytree(exported, tmp_path / "export"))
    meta_path = damaged / "siamdiff.json"
    meta_path.write_text(json.dumps(json.loads(meta_path.read_text()) | change))
    with pytest.raises(SiamdiffError, match=message) as error:
        sample(damaged, phantom_data, tmp_path / "syn")
    assert str(error.value).startswith(f"{meta_path}: ") and "\n" not in str(error.value)
    assert not (tmp_path / "syn").exists()


def test_mask_augmentation_is_deterministic_and_binary():
    mask = torch.zeros(1, 32, 32)
    mask[:, 10:20, 8:14] = 1.0
    every = ("flip", "scale", "shift")

    def augmented(seed: int, kinds=every) -> torch.Tensor:
        return augment_mask(mask, kinds, np.random.default_rng(seed))

    assert torch.equal(augmented(0), augmented(0))
    results = [augmented(seed) for seed in range(12)]
    assert len({r.numpy().tobytes() for r in results}) > 6
    for result in results:
        assert set(result.unique().tolist()) <= {0.0, 1.0} and result.shape == mask.shape
        # Scale 0.8..1.2 about the lesion centre: area within 0.64..1.44 (+ nearest rounding).
        assert 0.5 * mask.sum() <= result.sum() <= 1.6 * mask.sum()
    assert torch.equal(augmented(3, ()), mask)
    flipped = augmented(1, ("flip",))
    assert flipped.sum() == mask.sum()  # flips move pixels, never add or drop them
    assert any(not torch.equal(augmented(s, ("flip",)), mask) for s in range(4))


def test_augmented_masks_and_exports(exported: Path, phantom_data: Path, tmp_path: Path):
    out = tmp_path / "syn"
    kwargs = {"mask_aug": ("shift", "flip", "scale"), "formats": ("pranet", "nnunet", "folder")}
    summary = sample(exported, phantom_data, out, **kwargs)
    records = load_manifest(out).records
    assert records[0].extra["sampler"]["mask_aug"] == ["flip", "scale", "shift"]
    changed = 0
    for record in records:
        mask = png(out / record.mask)
        source = png(phantom_data / f"{record.extra['source_id']}_mask.png")
        assert set(np.unique(mask)) <= {0, 255}
        assert record.coverage == pytest.approx((mask > 0).mean(), abs=1e-6)
        changed += not np.array_equal(mask, source)
    assert changed >= len(records) // 2
    again = sample(exported, phantom_data, tmp_path / "again", batch_size=BATCH, **kwargs)
    assert again.manifest_written
    assert files(tmp_path / "again") == files(out)

    # Beside a set on the real masks, its samples come with the masks they were drawn on.
    grid_path = tmp_path / "grid.png"
    reference = sample(exported, phantom_data, tmp_path / "plain").out
    synth.comparison_grid(grid_path, phantom_data, [reference, out], split="train", count=LIMIT)
    grid, tile = png(grid_path), PHANTOM_SIZE + 2
    assert grid.shape == (LIMIT * tile + 2, 5 * tile + 2, 3)  # mask | real | set | mask | set
    for row, record in enumerate(r for r in records if r.extra["sample_index"] == 0):
        cells = [
            grid[2 + row * tile : (row + 1) * tile, 2 + c * tile : (c + 1) * tile] for c in (3, 4)
        ]
        np.testing.assert_array_equal(cells[0][..., 0] > 127, png(out / record.mask) > 0)
        np.testing.assert_array_equal(cells[1], png(out / record.image))

    ids = [r.id for r in records]
    assert set(summary.exports) == {"pranet", "nnunet", "folder"}
    pranet, nnunet, folder = (out / f"export-{f}" for f in ("pranet", "nnunet", "folder"))
    assert sorted(p.name for p in (pranet / "images").iterdir()) == [f"{i}.png" for i in ids]
    for record in records:
        image, mask = (out / record.image).read_bytes(), (out / record.mask).read_bytes()
        assert (pranet / "images" / f"{record.id}.png").read_bytes() == image
        assert (pranet / "masks" / f"{record.id}.png").read_bytes() == mask
        assert (folder / f"{record.id}.png").read_bytes() == image
        assert (folder / f"{record.id}_mask.png").read_bytes() == mask
        assert (nnunet / "imagesTr" / f"{record.id}_0000.png").read_bytes() == image
        label = png(nnunet / "labelsTr" / f"{record.id}.png")
        np.testing.assert_array_equal(label, png(out / record.mask) // 255)
    assert len(list(folder.iterdir())) == 2 * len(ids)
    assert sorted(p.name for p in (nnunet / "labelsTr").iterdir()) == [f"{i}.png" for i in ids]
    assert json.loads((nnunet / "dataset.json").read_text()) == {
        "channel_names": {"0": "R", "1": "G", "2": "B"},
        "labels": {"background": 0, "polyp": 1},
        "numTraining": len(ids),
        "file_ending": ".png",
    }
    # Each copy reads back with `prepare`: the same pairs, in the same groups and splits (no
    # mask's samples in two splits).
    for kind, copy in (("nnunet", nnunet), ("pranet", pranet), ("folder", folder)):
        back = tmp_path / f"back-{kind}"
        prepare([(kind, copy)], back, size=PHANTOM_SIZE, workers=1, progress=False)
        read_back = {r.id: r for r in load_manifest(back).records}
        assert sorted(read_back) == sorted(ids), kind
        for record in records:
            again = read_back[record.id]
            assert (again.dataset, again.group, again.split) == (
                record.dataset,
                record.group,
                record.split,
            )
            np.testing.assert_array_equal(png(back / again.mask), png(out / record.mask))
            np.testing.assert_array_equal(png(back / again.image), png(out / record.image))


def test_rank_split_union_equals_a_single_run(
    reference: Path, exported: Path, phantom_data: Path, tmp_path: Path
):
    out = tmp_path / "syn"
    first = sample(exported, phantom_data, out, rank=0, world_size=2)
    # Rank 0 has batches 0 and 2 (3 + 3 pairs); rank 1's batches 1 and 3 are still missing.
    assert (first.generated, first.manifest_written, first.missing) == (6, False, 2)
    assert "manifest not written yet: 2 pairs" in first.format()
    second = sample(exported, phantom_data, out, rank=1, world_size=2)
    assert (second.generated, second.manifest_written) == (2, False)
    assert {p.name for p in out.glob(".journal-*.jsonl")} == {
        ".journal-0.jsonl",
        ".journal-1.jsonl",
    }
    final = sample(exported, phantom_data, out)
    assert (final.generated, final.reused, final.manifest_written) == (0, 8, True)
    assert files(out) == files(reference)


@pytest.mark.slow
def test_two_launched_processes_write_what_one_process_writes(
    reference: Path, exported: Path, phantom_data: Path, tmp_path: Path
):
    out = tmp_path / "syn"
    done = launch_two_processes(
        "sample",
        str(exported),
        "--masks",
        f"{phantom_data}:train",
        "--out",
        str(out),
        "--steps=2",
        f"--per-mask={PER_MASK}",
        f"--limit={LIMIT}",
        f"--batch-size={BATCH}",
        "--device=cpu",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert {p.name for p in out.glob(".journal-*.jsonl")} == {
        ".journal-0.jsonl",
        ".journal-1.jsonl",
    }
    assert files(out) == files(reference)


@pytest.mark.slow
def test_a_rank_that_fails_leaves_one_error_line_not_its_peers_traceback(
    exported: Path, phantom_data: Path, tmp_path: Path
):
    data = Path(shutil.copytree(phantom_data, tmp_path / "data"))
    masks = load_manifest(data).split("train")
    damaged = data / masks[-1].mask  # in the second half of the masks: rank 1's batch
    damaged.write_bytes(b"broken")
    done = launch_two_processes(
        "sample",
        str(exported),
        "--masks",
        f"{data}:train",
        "--out",
        str(tmp_path / "syn"),
        "--steps=2",
        "--per-mask=1",
        f"--batch-size={len(masks) // 2}",
        "--device=cpu",
        "--no-verify",
    )
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("siamdiff: error:")]
    assert errors[0].startswith(f"siamdiff: error: {damaged}: cannot read image")
    # Rank 0 waited for rank 1 in a collective: one line (or killed first by the launcher).
    assert errors[1:] in ([], [f"siamdiff: error: {PEER_STOPPED}"]), done.stderr[-3000:]
    assert "Connection closed by peer" not in done.stderr, done.stderr[-3000:]


def test_a_run_directory_samples_its_newest_checkpoint(
    reference: Path, trained_run: Path, phantom_data: Path, tmp_path: Path
):
    sample(trained_run, phantom_data, tmp_path / "syn")
    records = load_manifest(tmp_path / "syn").records
    assert records[0].extra["model"] == str(trained_run.resolve() / "checkpoints/step-00000002")
    for record in records:
        assert (tmp_path / "syn" / record.image).read_bytes() == (
            reference / record.image
        ).read_bytes()


def test_a_run_trained_again_at_the_same_path_is_not_resumed_into(
    trained_run: Path, phantom_data: Path, tmp_path: Path
):
    """The checkpoint's name was all a rerun compared: pairs of the old weights were kept
    and credited to the new ones."""
    run = Path(shutil.copytree(trained_run, tmp_path / "run"))
    out = tmp_path / "syn"
    sample(run, phantom_data, out, limit=1, per_mask=1)
    checkpoint = checkpoints(run)[-1]
    weights = load_file(checkpoint / "model.safetensors")
    save_file({k: v + 1e-3 for k, v in weights.items()}, checkpoint / "model.safetensors")
    sums = json.loads((checkpoint / "checksums.json").read_text())
    sums["model.safetensors"] = manifest_module.sha256_file(checkpoint / "model.safetensors")
    (checkpoint / "checksums.json").write_text(json.dumps(sums))
    with pytest.raises(SiamdiffError, match="model_weights differs"):
        sample(run, phantom_data, out, limit=1, per_mask=1)
    # An export records the same digest: sampled from either, the weights are named alike.
    exported = export_run(run, tmp_path / "export")
    assert (
        json.loads((exported / "siamdiff.json").read_text())["weights_sha256"]
        == sums["model.safetensors"]
    )


def test_a_damaged_newest_checkpoint_is_skipped_for_the_previous_one(
    reference: Path, trained_run: Path, phantom_data: Path, tmp_path: Path, capsys
):
    run = Path(shutil.copytree(trained_run, tmp_path / "run"))
    newer = Path(shutil.copytree(checkpoints(run)[-1], run / "checkpoints" / "step-00000003"))
    with open(newer / "model.safetensors", "r+b") as weights:
        weights.seek(-1, 2)
        weights.write(b"\x00" if weights.read(1) != b"\x00" else b"\x01")
    sample(run, phantom_data, tmp_path / "syn")
    assert "step-00000003: skipped, damaged: checksum mismatch" in capsys.readouterr().err
    records = load_manifest(tmp_path / "syn").records
    assert records[0].extra["model"] == str(run.resolve() / "checkpoints/step-00000002")
    assert all(
        (tmp_path / "syn" / r.image).read_bytes() == (reference / r.image).read_bytes()
        for r in records
    )


def test_masks_argument_and_seeds(phantom_data: Path):
    with pytest.raises(SiamdiffError, match=r"unknown split 'tain' \(choose train, val, test"):
        split_masks_argument(f"{phantom_data}:tain")  # was "DATA:tain: is not a directory"
    assert split_masks_argument("data") == (Path("data"), "train")
    assert split_masks_argument("data:val") == (Path("data"), "val")
    assert split_masks_argument("data:all") == (Path("data"), None)
    assert split_masks_argument("C:/data") == (Path("C:/data"), "train")
    seeds = {derived_seed(42, source, k, "noise") for source in ("a", "b") for k in (0, 1)}
    assert len(seeds) == 4 and all(0 <= s < 2**63 for s in seeds)
    assert derived_seed(42, "a", 0, "noise") != derived_seed(42, "a", 0, "mask")
    # Pinned: another derivation would sample other images than every earlier set (and its
    # resumes) from the same seed.
    assert derived_seed(42, "a", 0, "noise") == 1331303056660099292


def test_the_sampler_gets_every_setting_and_each_pair_its_own_mask_augmentation(
    exported: Path, phantom_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    calls, first_draws = [], []
    sample_latents, augment = synth.ddim_sample, synth.augment_mask

    def recorded_sampler(*args, **kwargs):
        calls.append({k: v for k, v in kwargs.items() if k != "generator"})
        return sample_latents(*args, **kwargs)

    def recorded_augmentation(mask, augmentations, rng):
        first_draws.append(deepcopy(rng).random())
        return augment(mask, augmentations, rng)

    monkeypatch.setattr(synth, "ddim_sample", recorded_sampler)
    monkeypatch.setattr(synth, "augment_mask", recorded_augmentation)
    settings = {"guidance": 3.0, "control_scale": 1.5, "eta": 0.3, "mask_aug": ("flip",)}
    sample(exported, phantom_data, tmp_path / "ddim", **settings)
    expected = {"steps": 2, "guidance": 3.0, "control_scale": 1.5, "eta": 0.3, "scheduler": "ddim"}
    assert calls == [expected] * 4  # masks 0-2 and 3, of sample 0 then sample 1
    assert len(set(first_draws)) == LIMIT * PER_MASK  # a generator of its own per (mask, k)
    calls.clear()
    sample(exported, phantom_data, tmp_path / "unipc", scheduler="unipc", batch_size=8)
    defaults = {"guidance": 9.0, "control_scale": 1.0, "eta": 0.0, "scheduler": "unipc"}
    assert calls == [expected | defaults] * 2  # a batch per sample index


def test_limit_spreads_the_subset_over_every_source_dataset() -> None:
    ids = ["cvc-1", "cvc-2", "cvc-3", "cvc-4", "kvasir-1", "kvasir-2", "kvasir-3", "kvasir-4"]
    chosen = [ids[i] for i in spread_subset(range(len(ids)), 4)]
    assert chosen == ["cvc-1", "cvc-3", "kvasir-1", "kvasir-3"]
    assert spread_subset(range(3), None) == [0, 1, 2] == spread_subset(range(3), 5)


def test_comparison_grid_puts_each_dataset_beside_the_same_masks(
    reference: Path, phantom_data: Path, tmp_path: Path
):
    grid_path = tmp_path / "grid.png"
    synth.comparison_grid(
        grid_path, phantom_data, [reference, reference], split="train", count=LIMIT
    )
    grid, tile = png(grid_path), PHANTOM_SIZE + 2
    assert grid.shape == (LIMIT * tile + 2, 4 * tile + 2, 3)  # mask | real | two datasets
    ids = sorted({r.extra["source_id"] for r in load_manifest(reference).records})
    for row, source in enumerate(ids):
        cell = grid[2 + row * tile : (row + 1) * tile, 2 + 2 * tile : 3 * tile]
        np.testing.assert_array_equal(cell, png(reference / f"{source}-s00.png"))
        mask_cell = grid[2 + row * tile : (row + 1) * tile, 2:tile, 0]
        np.testing.assert_array_equal(mask_cell > 127, png(phantom_data / f"{source}_mask.png") > 0)
    with pytest.raises(SiamdiffError, match="has no sample of mask"):
        synth.comparison_grid(tmp_path / "more.png", phantom_data, [reference], split="train")
    assert not (tmp_path / "more.png").exists()


def test_a_stale_journal_entry_of_another_rank_does_not_block_the_rerun(
    exported: Path, phantom_data: Path, reference: Path, tmp_path: Path
):
    out = tmp_path / "syn"
    shutil.copytree(reference, out)
    (out / MANIFEST_NAME).unlink()
    lost = load_manifest(reference).records[0]
    (out / lost.image).unlink()
    # An older entry for that pair from a run on another rank, with other bytes (another
    # batch size or device): later in file order, it used to win over the fresh one forever.
    stale = json.loads((out / ".journal-0.jsonl").read_text().splitlines()[0])
    (out / ".journal-9.jsonl").write_text(json.dumps({**stale, "image_sha256": "0" * 64}) + "\n")
    summary = sample(exported, phantom_data, out)
    assert (summary.generated, summary.manifest_written) == (1, True)
    assert files(out) == files(reference)


def test_a_re_annotated_source_mask_is_sampled_again(
    exported: Path, phantom_data: Path, tmp_path: Path
):
    masks = tmp_path / "masks"
    shutil.copytree(phantom_data, masks)
    out = tmp_path / "syn"
    first = sample(exported, masks, out)
    assert first.manifest_written
    records = load_manifest(out).records
    source_id = records[0].extra["source_id"]
    # Re-annotate that source in place: another mask file, its new hash in the manifest.
    manifest = json.loads((masks / MANIFEST_NAME).read_text())
    entry = next(r for r in manifest["records"] if r["id"] == source_id)
    mask_path = masks / entry["mask"]
    Image.fromarray(np.roll(png(mask_path), 3, axis=1)).save(mask_path)
    entry["mask_sha256"] = manifest_module.sha256_file(mask_path)
    (masks / MANIFEST_NAME).write_text(json.dumps(manifest))
    again = sample(exported, masks, out)
    assert (again.generated, again.reused) == (PER_MASK, len(records) - PER_MASK)
    redone = [r for r in load_manifest(out).records if r.extra["source_id"] == source_id]
    assert all(r.source_sha256 == entry["mask_sha256"] for r in redone)


def test_mask_augmentation_never_empties_a_lesion_at_the_border():
    strip = torch.zeros(1, 32, 32)
    strip[:, 8:24, :3] = 1.0  # a lesion along the left edge: shifts can push it out
    for seed in range(200):
        augmented = augment_mask(strip, ("shift", "flip"), np.random.default_rng(seed))
        assert augmented.sum() > 0


def test_an_export_with_damaged_weights_leaves_no_output(
    exported: Path, phantom_data: Path, tmp_path: Path
):
    model = Path(shutil.copytree(exported, tmp_path / "export"))
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(SiamdiffError, match="unet"):
        sample(model, phantom_data, tmp_path / "syn")
    assert not (tmp_path / "syn").exists()


def test_a_damaged_masks_dataset_is_refused_before_any_pair(
    exported: Path, phantom_data: Path, tmp_path: Path
):
    """Sampling reads each mask's frame too: a truncated file would stop the job half-way."""
    masks = tmp_path / "masks"
    shutil.copytree(phantom_data, masks)
    record = load_manifest(masks).split("train")[-1]
    image = masks / record.image
    image.write_bytes(image.read_bytes()[:200])
    out = tmp_path / "syn"
    with pytest.raises(SiamdiffError, match=r"does not verify \(1 changed, e\.g\. .*--no-verify"):
        sample(exported, masks, out)
    assert not out.exists()
    with pytest.raises(SiamdiffError, match="cannot read image"):  # unchecked: found on reading
        sample(exported, masks, out, verify=False, limit=None)


def test_a_model_trained_on_padded_frames_is_sampled_on_padded_masks(
    exported: Path, tmp_path: Path
) -> None:
    """``data.transforms.crop=pad`` trains on whole frames padded square: sampling it on the
    lesion-centred crops of the default view conditions it on masks framed as it never saw."""
    raw = make_phantom_dataset(tmp_path / "raw", n=4, size=64, groups=4, seed=2)
    for path in raw.glob("*.png"):  # 64x48 frames: crop and pad then differ
        Image.fromarray(png(path)[:48]).save(path)
    data = tmp_path / "data"
    prepare([("folder", raw)], data, size=PHANTOM_SIZE, workers=1, progress=False)
    padded = tmp_path / "export"
    shutil.copytree(exported, padded)
    meta = json.loads((padded / "siamdiff.json").read_text())
    (padded / "siamdiff.json").write_text(json.dumps({**meta, "crop": "pad"}))
    out = tmp_path / "syn"
    sample(padded, data, out, per_mask=1, limit=1)
    (record,) = load_manifest(out).records
    assert load_manifest(out).preprocessing["synthesis"]["crop"] == "pad"
    views = {
        crop: generator_views(data, "train", PHANTOM_SIZE, view=GeneratorView(crop=crop))
        for crop in ("crop", "pad")
    }
    index = [r.id for r in views["pad"].records].index(record.extra["source_id"])
    saved = png(out / record.mask) > 127
    assert np.array_equal(saved, views["pad"][index]["mask"][0].numpy() > 0.5)
    assert not np.array_equal(saved, views["crop"][index]["mask"][0].numpy() > 0.5)

"""Extra hint maps beside the mask (docs/hints.md): read, prepared, transformed with the mask,
trained on, sampled with and written back, so a user's several hints never drift apart."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from siamdiff.config import load_config
from siamdiff.data.dataset import PairedDataset
from siamdiff.data.manifest import load_manifest, verify
from siamdiff.data.phantom import make_phantom_dataset
from siamdiff.data.prepare import prepare
from siamdiff.data.readers import read_source
from siamdiff.data.transforms import TransformConfig, build_transforms
from siamdiff.errors import SiamdiffError
from siamdiff.export import export_run, load_export
from siamdiff.models.dhi import image_to_hint, mask_to_hint
from siamdiff.synthesize import synthesize
from siamdiff.train import train
from tests.helpers import PHANTOM_SIZE, tiny_config

HINTS = ("copy", "ramp")  # the mask itself (0/255), and a grey left-to-right ramp


def png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def ramp(shape: tuple[int, ...]) -> np.ndarray:
    return np.broadcast_to(np.linspace(0, 255, shape[1]).round().astype(np.uint8), shape[:2])


def add_hints(raw: Path) -> None:
    """Write ``NAME_hint-copy.png`` and ``NAME_hint-ramp.png`` beside every folder pair."""
    for mask_path in sorted(raw.glob("*_mask.png")):
        stem = mask_path.name.removesuffix("_mask.png")
        mask = png(mask_path)
        Image.fromarray(mask).save(raw / f"{stem}_hint-copy.png")
        Image.fromarray(ramp(mask.shape)).save(raw / f"{stem}_hint-ramp.png")


@pytest.fixture(scope="module")
def hinted_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hints")
    raw = make_phantom_dataset(root / "raw", n=12, size=64, groups=4, seed=3)
    add_hints(raw)
    prepare([("folder", raw)], root / "data", size=PHANTOM_SIZE, workers=1, progress=False)
    return root / "data"


def test_folder_and_pranet_layouts_read_hints_and_skip_pairs_lacking_one(tmp_path: Path):
    raw = make_phantom_dataset(tmp_path / "raw", n=3, size=16, groups=1, seed=0)
    add_hints(raw)
    lonely = sorted(raw.glob("*_hint-ramp.png"))[0]
    lonely.unlink()
    result = read_source("folder", raw)
    assert [[name for name, _ in pair.hints] for pair in result.pairs] == [list(HINTS)] * 2
    assert all(path.name == f"{p.id}_hint-{n}.png" for p in result.pairs for n, path in p.hints)
    reasons = {path.name: reason for path, reason in result.skipped}
    lacking = lonely.name.replace("_hint-ramp", "")
    assert reasons == {lacking: "image without hint 'ramp'"}  # one reason per skipped pair
    stray = raw / "stray_hint-copy.png"
    shutil.copy(raw / f"{lacking[:-4]}_hint-copy.png", stray)
    assert (stray, "hint without image") in read_source("folder", raw).skipped

    pranet = tmp_path / "pranet"
    for sub in ("images", "masks", "hint-edge"):
        (pranet / sub).mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(pranet / "images" / f"{i}.png")
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(pranet / "masks" / f"{i}.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(pranet / "hint-edge" / "0.png")
    result = read_source("pranet", pranet)
    assert [(p.group, [n for n, _ in p.hints]) for p in result.pairs] == [("0", ["edge"])]
    assert [(path.name, why) for path, why in result.skipped] == [
        ("1.png", "image without hint 'edge'")
    ]


def test_prepared_hints_are_resized_listed_and_verified(hinted_data: Path):
    manifest = load_manifest(hinted_data)
    assert manifest.dataset_version == "1.0"
    for record in manifest.records:
        assert sorted(record.hints) == list(HINTS)
        names = [name for name, _ in record.files()]
        assert names == [record.image, record.mask] + [f"{record.id}_hint-{h}.png" for h in HINTS]
        copy = png(hinted_data / record.hints["copy"]["file"])
        assert copy.shape == (record.height, record.width)
        # Bilinear: a binary hint keeps its shape; its edge may be grey, never its inside.
        assert np.mean((copy > 127) != (png(hinted_data / record.mask) > 127)) < 0.02
    assert verify(hinted_data).ok
    edited = hinted_data / manifest.records[0].hints["ramp"]["file"]
    original = edited.read_bytes()
    try:
        Image.fromarray(255 - png(edited)).save(edited)
        assert verify(hinted_data).changed == [edited.name]
    finally:
        edited.write_bytes(original)


def test_sources_with_other_hints_are_refused(tmp_path: Path):
    hinted = make_phantom_dataset(tmp_path / "hinted", n=2, size=16, groups=1, seed=0)
    add_hints(hinted)
    plain = make_phantom_dataset(tmp_path / "plain", n=2, size=16, groups=1, seed=1)
    for path in plain.iterdir():  # other names, so only the hints differ
        path.rename(path.with_name(path.name.replace("phantom", "other")))
    with pytest.raises(SiamdiffError, match="every pair of a dataset needs the same hints"):
        prepare(
            [("folder", hinted), ("folder", plain)],
            tmp_path / "out",
            size=16,
            workers=1,
            progress=False,
        )
    assert not (tmp_path / "out").exists()


def test_hints_move_with_the_mask_through_every_training_op(hinted_data: Path):
    everything = TransformConfig(
        size=PHANTOM_SIZE, photometric_p=1.0, geometric_p=1.0, elastic_alpha=300.0
    )
    dataset = PairedDataset(hinted_data, None, build_transforms(everything, True), hints=HINTS)
    torch.manual_seed(0)
    for index in range(len(dataset)):
        sample = dataset[index]
        assert sample["hints"].shape == (2, PHANTOM_SIZE, PHANTOM_SIZE)
        copy, grey = sample["hints"]
        # The copy hint is the mask (up to the prepared hint's grey edge): same ops, same pixels.
        assert torch.mean(((copy > 0.5) != (sample["mask"][0] > 0.5)).float()) < 0.05
        # Photometric ops leave hints alone and nearest resampling invents no new grey levels.
        assert torch.equal(grey * 255, (grey * 255).round())
    plain = PairedDataset(hinted_data, None)[0]
    assert plain["hints"].shape == (0, *plain["mask"].shape[1:])
    flip = dataclasses.replace(everything, rot90=False, elastic_alpha=0.0, gamma=0.0, contrast=0.0)
    flipped = PairedDataset(hinted_data, None, build_transforms(flip, True), hints=("ramp",))[0]
    assert flipped["hints"][0, 0, 0] > flipped["hints"][0, 0, -1]  # the ramp was flipped too


def test_a_missing_hint_names_the_dataset_and_what_it_has(hinted_data: Path, phantom_data: Path):
    with pytest.raises(SiamdiffError, match=r"has no hint 'edge' \(its hints: copy, ramp\)"):
        PairedDataset(hinted_data, hints=("edge",))
    with pytest.raises(SiamdiffError, match=r"manifest-v1.json: .* \(its hints: none\)"):
        PairedDataset(phantom_data, hints=("copy",))


def test_hint_tensors_put_the_extra_maps_behind_mask_and_image():
    mask = torch.tensor([[[[0.0, 1.0]]]])
    image = torch.tensor([[[[-1.0, 1.0]]] * 3]).reshape(1, 3, 1, 2)
    extra = torch.tensor([[[[0.25, 0.5]]], [[[0.75, 1.0]]]]).reshape(1, 2, 1, 2)
    assert mask_to_hint(mask, extra)[0, :, 0].tolist() == [[0, 1]] * 3 + [[0.25, 0.5], [0.75, 1]]
    assert image_to_hint(image, extra)[0, :, 0].tolist() == [[0, 1]] * 3 + [
        [0.25, 0.5],
        [0.75, 1],
    ]
    assert torch.equal(mask_to_hint(mask, extra[:, :0]), mask_to_hint(mask))


@pytest.mark.parametrize("value", ["[a, a]", "[a-b]", "copy"])
def test_bad_hint_settings_are_one_line_errors(value: str, tmp_path: Path):
    with pytest.raises(SiamdiffError, match=r"data\.hints must be a list of distinct hint names"):
        load_config("tiny", [f"data.root={tmp_path}", f"data.hints={value}"])


def test_train_export_and_sample_with_hints(hinted_data: Path, phantom_data: Path, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(hinted_data, run, "train.max_steps=3", f"data.hints=[{','.join(HINTS)}]"))
    export = export_run(run, tmp_path / "export")
    loaded = load_export(export)
    assert loaded.meta["hints"] == list(HINTS)
    assert loaded.model.controlnet.config.conditioning_channels == 3 + len(HINTS)

    # The extra maps reach the network: other hint values, another prediction.
    torch.manual_seed(0)
    zt = torch.randn(1, loaded.autoencoder.latent_channels, 4, 4)
    t = torch.tensor([500])
    text = loaded.model.text([loaded.prompt])
    mask = torch.zeros(1, 1, PHANTOM_SIZE, PHANTOM_SIZE)
    mask[..., 8:20, 8:20] = 1
    with torch.no_grad():
        outputs = [
            loaded.model.predict_mask(
                zt, t, text, mask_to_hint(mask, torch.full((1, 2, 32, 32), v))
            )
            for v in (0.0, 1.0)
        ]
    assert not torch.equal(*outputs)

    out = tmp_path / "syn"
    summary = synthesize(
        export,
        hinted_data,
        out,
        steps=2,
        limit=4,
        batch_size=2,
        mask_aug=("flip", "shift"),
        formats=("folder", "pranet"),
        progress=False,
    )
    assert summary.manifest_written and verify(out).ok
    records = load_manifest(out).records
    for record in records:
        mask = png(out / record.mask)
        copy = png(out / record.hints["copy"]["file"])
        # The augmented copy hint sits where the augmented mask sits.
        assert np.mean((copy > 127) != (mask > 127)) < 0.05
    # The folder export reads back with its hints: a synthetic set can condition again.
    again = prepare(
        [("folder", out / "export-folder")],
        tmp_path / "again",
        size=PHANTOM_SIZE,
        workers=1,
        progress=False,
    )
    assert sum(sum(c.values()) for c in again.counts.values()) == len(records)
    assert again.hints == list(HINTS) and "extra hints: copy, ramp" in again.format()
    assert all(sorted(r.hints) == list(HINTS) for r in load_manifest(tmp_path / "again").records)
    pranet = read_source("pranet", out / "export-pranet")
    assert [[n for n, _ in p.hints] for p in pranet.pairs] == [list(HINTS)] * len(records)

    with pytest.raises(SiamdiffError, match="has no hint 'copy'"):
        synthesize(export, phantom_data, tmp_path / "plain", steps=2, limit=1, progress=False)
    assert not (tmp_path / "plain").exists()
    shutil.rmtree(run)

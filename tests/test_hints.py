"""Extra hint maps beside the mask (docs/hints.md): read, prepared, transformed with the mask,
trained on, sampled with and written back, so a user's several hints never drift apart."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from siamdiff.config import load_config
from siamdiff.data.dataset import PairedDataset, generator_views
from siamdiff.data.manifest import load_manifest, verify
from siamdiff.data.phantom import make_phantom_dataset
from siamdiff.data.prepare import prepare
from siamdiff.data.readers import UnreadableImageError, load_hint, load_prepared_hint, read_source
from siamdiff.data.transforms import TransformConfig, build_transforms
from siamdiff.errors import SiamdiffError
from siamdiff.export import export_run, load_export
from siamdiff.models.dhi import image_to_hint, mask_to_hint
from siamdiff.synthesize import synthesize
from siamdiff.train import to_hints, train
from tests.helpers import PHANTOM_SIZE, tiny_config

HINTS = ("copy", "ramp")  # the mask itself (0/255), and a grey left-to-right ramp
PREPARED = 48


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
    # Prepared larger than the model's view, so the view's crop and resize move the maps too.
    prepare([("folder", raw)], root / "data", size=PREPARED, workers=1, progress=False)
    return root / "data"


def test_folder_and_pranet_layouts_read_hints(tmp_path: Path):
    raw = make_phantom_dataset(tmp_path / "raw", n=3, size=16, groups=1, seed=0)
    add_hints(raw)
    result = read_source("folder", raw)
    assert [[name for name, _ in pair.hints] for pair in result.pairs] == [list(HINTS)] * 3
    assert all(path.name == f"{p.id}_hint-{n}.png" for p in result.pairs for n, path in p.hints)
    assert result.skipped == []

    pranet = tmp_path / "pranet"
    for sub in ("images", "masks", "hint-edge", "hint-stale"):
        (pranet / sub).mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(pranet / "images" / f"{i}.png")
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(pranet / "masks" / f"{i}.png")
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(pranet / "hint-edge" / f"{i}.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(pranet / "hint-stale" / "old.png")
    result = read_source("pranet", pranet)
    assert [(p.group, [n for n, _ in p.hints]) for p in result.pairs] == [
        ("0", ["edge"]),
        ("1", ["edge"]),
    ]
    assert [(path.name, why) for path, why in result.skipped] == [
        ("old.png", "hint without image-mask pair")
    ]


def test_hint_maps_read_as_drawn_at_any_storage(tmp_path: Path):
    """A binary class map saved as 0/1 (as nnU-Net writes labels) read as near-black 0/1
    grey levels: the model saw no map. 8-bit values in 16-bit storage read as themselves."""
    grey = ramp((4, 256))
    binary = (grey >= 128).astype(np.uint8)
    cases = {
        "labels01.png": (Image.fromarray(binary), binary * 255),
        "labels01_16bit.png": (Image.fromarray(binary.astype(np.uint16)), binary * 255),
        "bits.png": (Image.fromarray(binary.astype(bool)), binary * 255),
        "grey.png": (Image.fromarray(grey), grey),
        "grey_in_16bit.png": (Image.fromarray(grey.astype(np.uint16)), grey),
        "full_16bit.png": (Image.fromarray(grey.astype(np.uint16) * 257), grey),
        "empty.png": (Image.fromarray(np.zeros_like(grey)), np.zeros_like(grey)),
    }
    palette = Image.fromarray(binary, mode="L").convert("P")
    palette.putpalette([0, 0, 0, 90, 0, 0] + [0] * 762)  # class 1 drawn dark red
    cases["palette.png"] = (palette, binary * 90)
    # Two grey levels are a grey map, read as drawn: level 100 is 100 in every map of a
    # source, whether or not a map also has other levels.
    cases["two_levels.png"] = (Image.fromarray(binary * 100), binary * 100)
    for name, (image, expected) in cases.items():
        image.save(tmp_path / name)
        read = load_hint(tmp_path / name)
        assert read.dtype == np.uint8 and np.array_equal(read, expected), name
    # A JPEG's 0 and 1 are compression noise of a dark map, no class map (as for masks).
    Image.fromarray(binary).save(tmp_path / "dark.jpg")
    assert load_hint(tmp_path / "dark.jpg").max() < 8
    # A dataset prepared before this rule stored 0/1: its models were trained on that.
    assert np.array_equal(load_prepared_hint(tmp_path / "labels01.png"), binary)
    tifffile.imwrite(tmp_path / "depth.tif", (grey >= 128).astype(np.float32))
    with pytest.raises(UnreadableImageError, match="unsupported pixel type float32"):
        load_hint(tmp_path / "depth.tif")


def test_a_class_map_beside_maps_of_more_levels_of_the_same_hint_is_refused(tmp_path: Path):
    """Level 1 of a map holding only 0 and 1 reads 255; in a map of more levels, 1."""
    raw = make_phantom_dataset(tmp_path / "raw", n=4, size=16, groups=1, seed=0)
    stems = sorted(p.name.removesuffix("_mask.png") for p in raw.glob("*_mask.png"))
    organ = np.zeros((16, 16), np.uint8)
    organ[4:12, 4:12] = 1
    for index, stem in enumerate(stems):  # the first map shows class 1 alone
        levels = organ * (1 if index == 0 else 1 + (np.arange(16) > 8))
        Image.fromarray(levels.astype(np.uint8)).save(raw / f"{stem}_hint-organ.png")
    with pytest.raises(SiamdiffError, match="hint 'organ' holds only 0 and 1 in the map of") as e:
        prepare([("folder", raw)], tmp_path / "out", size=16, workers=1, progress=False)
    assert "give the maps one scale" in str(e.value) and not (tmp_path / "out").exists()
    # Maps of one scale, 0/1 class maps or 0/255 ones, prepare; the reading is not stored.
    for index, stem in enumerate(stems):
        Image.fromarray(organ * (1 if index % 2 else 255)).save(raw / f"{stem}_hint-organ.png")
    prepare([("folder", raw)], tmp_path / "out", size=16, workers=1, progress=False)
    for record in load_manifest(tmp_path / "out").records:
        assert "hint_reading" not in record.extra
        assert set(np.unique(png(tmp_path / "out" / record.hints["organ"]["file"]))) <= {0, 255}


def test_a_hint_for_some_pairs_only_is_an_error_and_other_names_keep_their_meaning(
    tmp_path: Path,
):
    raw = make_phantom_dataset(tmp_path / "raw", n=4, size=16, groups=1, seed=0)
    first = sorted(raw.glob("*_mask.png"))[0].name.removesuffix("_mask.png")
    shutil.copy(raw / f"{first}_mask.png", raw / f"{first}_hint-edge.png")  # one stray hint
    with pytest.raises(SiamdiffError, match="hint 'edge' is given for 1 of 4 pairs, not for"):
        prepare([("folder", raw)], tmp_path / "out", size=16, workers=1, progress=False)
    assert not (tmp_path / "out").exists()
    (raw / f"{first}_hint-edge.png").unlink()

    # Not hints: no image of that stem, not an image file, a folder, a bad name (skipped).
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(raw / "case_hint-1.png")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(raw / "case_hint-1_mask.png")
    (raw / f"{first}_hint-notes.txt").write_text("not a map")
    (raw / f"{first}_hint-old").mkdir()
    shutil.copy(raw / f"{first}_mask.png", raw / f"{first}_hint-a-b.png")
    result = read_source("folder", raw)
    assert len(result.pairs) == 5 and all(p.hints == () for p in result.pairs)
    assert "case_hint_1" in {p.group for p in result.pairs}  # sanitised, an image again
    reasons = {path.name: why for path, why in result.skipped}
    assert reasons == {
        f"{first}_hint-notes.txt": "not an image file",
        f"{first}_hint-a-b.png": "hint name 'a-b' is not letters, digits, '.' and '_'",
    }


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


def test_an_edited_raw_hint_is_a_major_version_even_with_a_new_size(tmp_path: Path):
    raw = make_phantom_dataset(tmp_path / "raw", n=3, size=32, groups=1, seed=0)
    add_hints(raw)
    out = tmp_path / "data"
    prepare([("folder", raw)], out, size=24, workers=1, progress=False)
    edited = sorted(raw.glob("*_hint-ramp.png"))[0]
    Image.fromarray(255 - png(edited)).save(edited)
    summary = prepare([("folder", raw)], out, size=16, overwrite=True, workers=1, progress=False)
    assert summary.dataset_version == "2.0"  # raw data changed, not only the preprocessing


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
        # The copy hint is the mask: same ops, the same pixels exactly.
        assert torch.equal(copy > 0.5, sample["mask"][0] > 0.5)
        # Photometric ops leave hints alone and nearest resampling invents no grey level.
        record = dataset.records[index]
        stored = set(np.unique(png(hinted_data / record.hints["ramp"]["file"])).tolist())
        assert set((grey * 255).round().to(torch.uint8).unique().tolist()) <= stored | {0}
    plain = PairedDataset(hinted_data, None)[0]
    assert plain["hints"].shape == (0, *plain["mask"].shape[1:])

    view = PairedDataset(hinted_data, None, build_transforms(everything, False), hints=HINTS)
    flip_only = dataclasses.replace(
        everything, rot90=False, elastic_alpha=0.0, gamma=0.0, contrast=0.0
    )
    flipped = PairedDataset(hinted_data, None, build_transforms(flip_only, True), hints=HINTS)
    for index in range(3):
        assert torch.equal(flipped[index]["hints"], view[index]["hints"].flip(-1))
        assert torch.equal(flipped[index]["mask"], view[index]["mask"].flip(-1))


def test_both_branches_get_the_maps_behind_their_own_channels():
    batch = {
        "mask": torch.tensor([[[[0.0, 1.0]]]]),
        "image": torch.tensor([[[[-1.0, 1.0]]] * 3]).reshape(1, 3, 1, 2),
        "hints": torch.tensor([[[[0.25, 0.5]]], [[[0.75, 1.0]]]]).reshape(1, 2, 1, 2),
    }
    mask_hint, image_hint = to_hints(batch)
    maps = [[0.25, 0.5], [0.75, 1.0]]
    assert mask_hint[0, :, 0].tolist() == [[0, 1]] * 3 + maps
    assert image_hint[0, :, 0].tolist() == [[0, 1]] * 3 + maps
    assert torch.equal(
        mask_to_hint(batch["mask"], batch["hints"][:, :0]), mask_to_hint(batch["mask"])
    )
    assert image_to_hint(batch["image"]).shape == (1, 3, 1, 2)


def test_a_missing_hint_names_the_dataset_and_what_it_has(hinted_data: Path, phantom_data: Path):
    with pytest.raises(SiamdiffError, match=r"has no hint 'edge' \(its hints: copy, ramp\)"):
        PairedDataset(hinted_data, hints=("edge",))
    with pytest.raises(SiamdiffError, match=r"manifest-v1.json: .* \(its hints: none\)"):
        PairedDataset(phantom_data, hints=("copy",))


@pytest.mark.parametrize("value", ["[a, a]", "[a-b]", "copy", "[.x]", "[1]"])
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

    # Without mask augmentation the maps written are the view's maps, byte for byte.
    plain = tmp_path / "plain"
    summary = synthesize(export, hinted_data, plain, steps=2, limit=4, batch_size=2, progress=False)
    assert summary.manifest_written and verify(plain).ok
    view = generator_views(hinted_data, "train", PHANTOM_SIZE, HINTS)
    by_id = {record.id: index for index, record in enumerate(view.records)}
    for record in load_manifest(plain).records:
        expected = view[by_id[record.extra["source_id"]]]["hints"]
        for channel, name in enumerate(HINTS):
            written = png(plain / record.hints[name]["file"])
            assert np.array_equal(written, (expected[channel] * 255).round().byte().numpy())
    # A deleted map makes its pair unfinished: a rerun writes it again, the same bytes.
    lost = plain / load_manifest(plain).records[0].hints["ramp"]["file"]
    before = lost.read_bytes()
    lost.unlink()
    again = synthesize(export, hinted_data, plain, steps=2, limit=4, batch_size=2, progress=False)
    assert (again.generated, again.reused) == (1, 3) and lost.read_bytes() == before

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
        assert np.array_equal(copy > 127, mask > 127)
    # Both exports read back with their hints: a synthetic set can condition again.
    for kind in ("folder", "pranet"):
        again_root = tmp_path / f"again-{kind}"
        prepared = prepare(
            [(kind, out / f"export-{kind}")],
            again_root,
            size=PHANTOM_SIZE,
            workers=1,
            progress=False,
        )
        assert prepared.records == len(records) and prepared.hints == list(HINTS)
        assert all(sorted(r.hints) == list(HINTS) for r in load_manifest(again_root).records)
    assert "extra hints: copy, ramp" in prepared.format()

    with pytest.raises(SiamdiffError, match="has no hint 'copy'"):
        synthesize(export, phantom_data, tmp_path / "none", steps=2, limit=1, progress=False)
    assert not (tmp_path / "none").exists()
    meta_path = export / "siamdiff.json"
    meta = json.loads(meta_path.read_text())
    for hints, message in (
        ([], "takes 5 hint channels but siamdiff.json lists hints"),
        (None, "hints must be a list"),
    ):
        meta_path.write_text(json.dumps({**meta, "hints": hints}))
        with pytest.raises(SiamdiffError, match=message):
            load_export(export)
    shutil.rmtree(run)


def test_an_edited_raw_hint_is_a_new_major_dataset_version(tmp_path: Path):
    raw = make_phantom_dataset(tmp_path / "raw", n=3, size=16, groups=1, seed=0)
    add_hints(raw)
    first = prepare([("folder", raw)], tmp_path / "data", size=16, workers=1, progress=False)
    hint = sorted(raw.glob("*_hint-ramp.png"))[0]
    Image.fromarray(255 - png(hint)).save(hint)
    second = prepare(
        [("folder", raw)], tmp_path / "data", size=16, workers=1, progress=False, overwrite=True
    )
    assert (first.dataset_version, second.dataset_version) == ("1.0", "2.0")


def test_hints_reach_the_sampler_in_the_order_the_model_was_trained_on(
    hinted_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Trained on [ramp, copy] (not sorted): a sampler loading the maps in another order
    would condition each ControlNet channel on the other map, and write correct files."""
    import siamdiff.synthesize as synth

    trained = ("ramp", "copy")
    run = tmp_path / "run"
    train(tiny_config(hinted_data, run, "train.max_steps=1", f"data.hints=[{','.join(trained)}]"))
    seen = []
    real = synth.ddim_sample

    def capture(model, mask_hint, *args, **kwargs):
        seen.append(mask_hint)
        return real(model, mask_hint, *args, **kwargs)

    monkeypatch.setattr(synth, "ddim_sample", capture)
    synthesize(run, hinted_data, tmp_path / "syn", steps=2, limit=2, progress=False)
    mask_hint = torch.cat(seen)
    view = generator_views(hinted_data, "train", PHANTOM_SIZE, trained)
    records = load_manifest(tmp_path / "syn").records
    by_id = {record.id: index for index, record in enumerate(view.records)}
    for row, record in enumerate(records):
        expected = view[by_id[record.extra["source_id"]]]["hints"]
        torch.testing.assert_close(mask_hint[row, 3:].float(), expected.float())

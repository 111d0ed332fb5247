"""Segmenter training, saving, loading, running and scoring on tiny phantom data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from siamdiff.data.manifest import verify
from siamdiff.errors import SiamdiffError
from siamdiff.evaluate import segmenter as segmenter_module
from siamdiff.evaluate.segmenter import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    SegmenterSpec,
    dice_iou,
    fit_segmenter,
    frame_transforms,
    frames,
    load_segmenter,
    score_segmenter,
    train_segmenter,
    training_set,
)

from .conftest import SIZE


def test_dice_iou_per_image_including_empty_masks() -> None:
    target = torch.zeros(4, 1, 4, 4, dtype=torch.bool)
    pred = torch.zeros_like(target)
    target[1, 0, 0, :] = True  # missed lesion
    pred[2, 0, 0, :] = True  # lesion predicted on an empty frame
    target[3, 0, 0, :] = True  # 4 px
    pred[3, 0, 0, 2:] = True  # 2 of them
    pred[3, 0, 1, :2] = True  # and 2 wrong ones
    dice, iou = dice_iou(pred, target)
    np.testing.assert_allclose(dice.numpy(), [1.0, 0.0, 0.0, 0.5])
    np.testing.assert_allclose(iou.numpy(), [1.0, 0.0, 0.0, 1 / 3])
    with pytest.raises(ValueError, match="differ"):
        dice_iou(pred, target[:, :, :2])


def test_scores_count_a_pixel_as_lesion_from_probability_one_half() -> None:
    masks = torch.zeros(2, 1, 8, 8)
    masks[0, 0, 2:5, 2:5] = 1
    masks[1, 0, 4:] = 1
    probabilities = torch.where(masks > 0, 0.5, 0.499)

    class FixedMaps:  # image i (every pixel i) predicts map i
        def predict_and_features(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return probabilities[images[:, 0, 0, 0].long()], torch.zeros(len(images), 4)

    dataset = [
        {"image": torch.full((3, 8, 8), float(i)), "mask": masks[i], "meta": {"id": f"x{i}"}}
        for i in range(2)
    ]
    scores = score_segmenter(FixedMaps(), dataset, batch_size=1)  # type: ignore[arg-type]
    assert scores.ids == ["x0", "x1"]
    np.testing.assert_array_equal(scores.dice, [1.0, 1.0])
    np.testing.assert_array_equal(scores.iou, [1.0, 1.0])


def test_frames_are_whole_and_independent_of_the_mask() -> None:
    # A crop placed by the mask would leak the ground truth into test images.
    image = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    left, right = np.zeros((32, 48), bool), np.zeros((32, 48), bool)
    left[10:20, 2:10], right[10:20, 38:46] = True, True
    transform = frame_transforms(32, train=False)
    a, b = (transform({"image": image, "mask": m, "meta": {}}) for m in (left, right))
    assert a["image"].shape == (3, 32, 32)
    torch.testing.assert_close(a["image"], b["image"])
    assert a["mask"][0, :, :8].any() and not a["mask"][0, :, 24:].any()
    assert b["mask"][0, :, 24:].any() and not b["mask"][0, :, :8].any()


def test_saved_segmenter_loads_and_runs(segmenter_dir: Path, real_root: Path) -> None:
    config = json.loads((segmenter_dir / CONFIG_NAME).read_text())
    assert config["spec"] == {"arch": "unet", "encoder": "resnet18", "size": SIZE}
    assert [d["kind"] for d in config["data"]] == ["real"] and config["data"][0]["images"] == 18
    assert config["val"]["images"] == 3 and config["images_per_second"] > 0
    assert config["history"][1]["loss"] < config["history"][0]["loss"]

    segmenter = load_segmenter(segmenter_dir)
    images = torch.rand(2, 3, 48, 80) * 2 - 1  # any size: resized in and back out
    probabilities, pooled = segmenter.predict_and_features(images)
    assert probabilities.shape == (2, 1, 48, 80)
    assert probabilities.min() >= 0.0 and probabilities.max() <= 1.0
    assert pooled.shape == (2, 512)
    torch.testing.assert_close(segmenter.features(images), pooled)
    torch.testing.assert_close(segmenter.predict(images), probabilities)

    scores = score_segmenter(segmenter, frames(real_root, "val", SIZE), batch_size=2)
    assert len(scores.ids) == 3 and scores.features.shape == (3, 512)
    assert scores.summary()["mdice"] == pytest.approx(config["val"]["mdice"])


def test_training_is_deterministic_for_a_seed(real_root: Path) -> None:
    dataset, _ = training_set(real_root, (), 32)
    spec = SegmenterSpec("fpn", "resnet18", 32)
    settings = {"epochs": 2, "batch_size": 6, "lr": 1e-3, "progress": False}
    # The second run loads with a worker: augmentations must not depend on who draws them.
    runs = [
        fit_segmenter(dataset, spec, seed=s, workers=w, **settings)[0]
        for s, w in ((7, 0), (7, 1), (8, 0))
    ]
    states = [r.model.state_dict() for r in runs]
    name = "decoder.p5.weight"
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not torch.equal(states[0][name], states[2][name])


def test_extra_datasets_join_the_training_set(real_root: Path, synthetic_root: Path) -> None:
    dataset, described = training_set(real_root, (synthetic_root,), SIZE)
    assert len(dataset) == 18 + 36
    assert [(d["kind"], d["split"], d["images"]) for d in described] == [
        ("real", "train", 18),
        ("synthetic", "all", 36),
    ]


def test_a_loss_that_stops_being_finite_ends_training_in_one_line(
    real_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A segmenter trained on past a NaN loss came out all-NaN, scored, saved: mDice 0."""
    real_bce = segmenter_module.F.binary_cross_entropy_with_logits
    monkeypatch.setattr(
        segmenter_module.F,
        "binary_cross_entropy_with_logits",
        lambda logits, target: real_bce(logits, target) * float("nan"),
    )
    with pytest.raises(SiamdiffError, match="loss became nan in epoch 1"):
        train_segmenter(real_root, tmp_path / "s", size=SIZE, epochs=1, progress=False)
    assert not (tmp_path / "s").exists()


def test_bad_settings_and_files_are_one_line_errors(
    segmenter_dir: Path, real_root: Path, tmp_path: Path
) -> None:
    with pytest.raises(SiamdiffError, match="multiple of 32"):
        SegmenterSpec(size=50).build()
    with pytest.raises(SiamdiffError, match=r"nope/resnet18: Wrong architecture type `nope`$"):
        train_segmenter(real_root, tmp_path / "x", arch="nope", progress=False)
    with pytest.raises(SiamdiffError, match=r"unet/nope: Wrong encoder name `nope`$"):
        SegmenterSpec(encoder="nope").build()
    assert not (tmp_path / "x").exists()
    for options, message in (
        ({"arch": "deeplabv3", "batch_size": 1}, "in batches of 1 .*more than 1 value"),
        ({"arch": "dpt"}, "dpt/resnet18: Only Timm encoders"),
        ({"lr": float("nan")}, "a finite lr > 0"),
        ({"lr": float("inf")}, "a finite lr > 0"),
    ):
        with pytest.raises(SiamdiffError, match=message):
            train_segmenter(real_root, tmp_path / "x", size=SIZE, progress=False, **options)
    # Never written into a dataset it reads, nor replacing one (or a folder holding one).
    for out in (real_root, real_root / "seg", real_root.parent):
        with pytest.raises(SiamdiffError, match="is, holds or lies inside the dataset"):
            train_segmenter(real_root, out, size=SIZE, overwrite=True, progress=False)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(SiamdiffError, match="exists and is not a segmenter"):
        train_segmenter(real_root, tmp_path / "notes", size=SIZE, overwrite=True, progress=False)
    assert verify(real_root).ok and (tmp_path / "notes" / "todo.txt").is_file()
    with pytest.raises(SiamdiffError, match="already exists"):
        train_segmenter(real_root, segmenter_dir, size=SIZE, epochs=1, progress=False)
    with pytest.raises(SiamdiffError, match=f"no {CONFIG_NAME} here"):
        load_segmenter(tmp_path)

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / CONFIG_NAME).write_bytes((segmenter_dir / CONFIG_NAME).read_bytes())
    (broken / WEIGHTS_NAME).write_bytes(b"not safetensors")
    with pytest.raises(SiamdiffError, match="cannot read segmenter weights") as error:
        load_segmenter(broken)
    assert "\n" not in str(error.value)

    config = json.loads((segmenter_dir / CONFIG_NAME).read_text())
    config["spec"]["arch"] = "fpn"
    (broken / CONFIG_NAME).write_text(json.dumps(config))
    (broken / WEIGHTS_NAME).write_bytes((segmenter_dir / WEIGHTS_NAME).read_bytes())
    with pytest.raises(SiamdiffError, match="do not fit a fpn/resnet18 segmenter"):
        load_segmenter(broken)
    # A hand-edited spec: a one-line error naming the file, never a TypeError traceback.
    for size, message in (("64", "spec.size must be an integer, got '64'"), (70, "multiple of 32")):
        config["spec"]["size"] = size
        (broken / CONFIG_NAME).write_text(json.dumps(config))
        with pytest.raises(SiamdiffError, match=message) as error:
            load_segmenter(broken)
        assert str(error.value).startswith(str(broken / CONFIG_NAME))
    del config["spec"]["size"]  # read as the default 256, a 64 px segmenter was misscored
    (broken / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(SiamdiffError, match=r"segmenter\.json: spec lacks size$"):
        load_segmenter(broken)


def test_a_segmenter_with_nan_weights_is_refused_not_scored_zero(
    segmenter_dir: Path, real_root: Path, tmp_path: Path
) -> None:
    """A NaN head predicted no lesion anywhere: mask fidelity read 0.000, as if measured."""
    from safetensors.torch import load_file, save_file

    state = load_file(segmenter_dir / WEIGHTS_NAME)
    head = next(name for name in state if name.startswith("segmentation_head"))
    state[head] = torch.full_like(state[head], float("nan"))
    broken = tmp_path / "nan"
    broken.mkdir()
    (broken / CONFIG_NAME).write_bytes((segmenter_dir / CONFIG_NAME).read_bytes())
    save_file(state, broken / WEIGHTS_NAME)
    with pytest.raises(SiamdiffError, match=rf"^{broken / WEIGHTS_NAME}: 1 weight tensors hold"):
        load_segmenter(broken)
    segmenter = load_segmenter(segmenter_dir)  # diverged in memory, as a model mid-training
    with torch.no_grad():
        segmenter.model.segmentation_head[0].weight.fill_(float("nan"))
    with pytest.raises(SiamdiffError, match="segmenter predictions are not finite"):
        score_segmenter(segmenter, frames(real_root, "val", SIZE))

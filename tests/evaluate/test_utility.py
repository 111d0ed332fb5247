"""Segmentation utility: real vs real + synthetic, several architectures and seeds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from siamdiff.data.manifest import MANIFEST_NAME, load_manifest
from siamdiff.errors import SiamdiffError
from siamdiff.evaluate.metrics import evaluate, summary_rows, utility_journal
from siamdiff.evaluate.segmenter import _learned_scored_images, training_set
from siamdiff.evaluate.utility import MATCHED, mean_std, segmentation_utility


def test_mean_std_uses_the_sample_std() -> None:
    assert mean_std([0.5, 0.7, 0.9]) == {
        "mean": pytest.approx(0.7),
        "std": pytest.approx(0.2),
        "per_seed": [0.5, 0.7, 0.9],
    }
    assert mean_std([0.4])["std"] is None  # not 0: one seed has no spread to claim


def test_utility_trains_each_arch_and_seed_on_both_sets(real_root: Path, copies: Path) -> None:
    result = segmentation_utility(
        real_root,
        copies,
        archs=("unet", "fpn"),
        seeds=(0, 1),
        epochs=1,
        size=32,
        batch_size=9,
        progress=False,
    )
    assert result["protocol"]["test_images"] == 3
    assert result["protocol"]["encoder_weights"] is None
    assert set(result["archs"]) == {"unet", "fpn"}
    for per_arch in result["archs"].values():
        assert per_arch["real"]["train_images"] == 18
        assert per_arch["real+syn"]["train_images"] == 18 + 18
        for setting in ("real", "real+syn"):
            for metric in ("mdice", "miou"):
                values = per_arch[setting][metric]["per_seed"]
                assert len(values) == 2 and all(0.0 <= v <= 1.0 for v in values)
                assert per_arch[setting][metric]["mean"] == pytest.approx(np.mean(values))
        gain = per_arch["real+syn"]["mdice"]["mean"] - per_arch["real"]["mdice"]["mean"]
        assert per_arch["gain_mdice"] == pytest.approx(gain)
    # IoU never exceeds Dice, per image and so on average.
    unet = result["archs"]["unet"]["real+syn"]
    assert all(
        i <= d for i, d in zip(unet["miou"]["per_seed"], unet["mdice"]["per_seed"], strict=True)
    )


def test_matched_steps_trains_real_only_as_long_as_real_plus_synthetic(
    real_root: Path, copies: Path
) -> None:
    """Same epochs on twice the images is more steps (18 // 7 = 2 an epoch, 36 // 7 = 5): the
    control takes at least as many (2 epochs, by the ratio of images, would be 4)."""
    result = segmentation_utility(
        real_root,
        copies,
        archs=("unet",),
        seeds=(0,),
        epochs=1,
        size=32,
        batch_size=7,
        matched_steps=True,
        progress=False,
    )["archs"]["unet"]
    assert (result["real"]["steps"], result["real+syn"]["steps"]) == (2, 5)
    assert (result[MATCHED]["epochs"], result[MATCHED]["steps"]) == (3, 6)
    assert result[MATCHED]["train_images"] == 18
    matched = result["real+syn"]["mdice"]["mean"] - result[MATCHED]["mdice"]["mean"]
    assert result["gain_matched_steps_mdice"] == pytest.approx(matched)
    rows = dict(summary_rows({"utility": {"available": True, "archs": {"unet": result}}}))
    assert f"over matched steps {matched:+.3f}" in rows["Utility unet mdice"]


def test_real_only_baseline_has_no_gain(real_root: Path) -> None:
    result = segmentation_utility(
        real_root, None, archs=("unet",), seeds=(0,), epochs=1, size=32, progress=False
    )
    assert set(result["archs"]["unet"]) == {"real"}


def test_utility_needs_a_test_split(synthetic_root: Path) -> None:
    with pytest.raises(SiamdiffError, match="no test split"):
        segmentation_utility(synthetic_root, None, epochs=1, size=32, progress=False)


def test_pairs_sampled_from_test_masks_are_refused_before_any_training(
    real_root: Path, copies: Path, resplit: Path, segmenter_dir: Path, tmp_path: Path
) -> None:
    leaking = Path(shutil.copytree(copies, tmp_path / "syn"))
    manifest = json.loads((leaking / MANIFEST_NAME).read_text())
    manifest["records"][0]["split"] = "test"  # as `siamdiff sample --masks DATA:all` records it
    (leaking / MANIFEST_NAME).write_text(json.dumps(manifest))
    expected = "1 of 18 synthetic pairs were sampled from val or test masks"
    with pytest.raises(SiamdiffError, match=expected):
        segmentation_utility(real_root, leaking, epochs=1, size=32, progress=False)
    out = tmp_path / "metrics.json"
    with pytest.raises(SiamdiffError, match=expected):
        evaluate(real_root, leaking, out, segmenter_dir=segmenter_dir, utility=True, progress=False)
    # Sampled from training masks, by a model that learned from every split (test included).
    manifest["records"][0]["split"] = "train"
    generator = {"data": str(real_root), "split": None}
    manifest["preprocessing"]["synthesis"] = {"model_trained_on": generator}
    (leaking / MANIFEST_NAME).write_text(json.dumps(manifest))
    expected = "was sampled by a model trained on every split of .*: a segmenter trained on"
    with pytest.raises(SiamdiffError, match=expected):
        evaluate(real_root, leaking, out, segmenter_dir=segmenter_dir, utility=True, progress=False)
    with pytest.raises(SiamdiffError, match=expected):  # `train-segmenter --extra` too
        training_set(real_root, (leaking,), 32)
    # Trained on the train split of data prepared otherwise, where REAL's test images are.
    generator["data"], generator["split"] = str(resplit), "train"
    (leaking / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(SiamdiffError, match="model trained on the train split of"):
        training_set(real_root, (leaking,), 32)
    # Trained on every split of other data (none of REAL's test images), or on train: fine.
    for generator["data"], generator["split"] in ((str(copies), None), (str(real_root), "train")):
        (leaking / MANIFEST_NAME).write_text(json.dumps(manifest))
        assert len(training_set(real_root, (leaking,), 32)[0]) == 36
    # Its data gone: judged by its path.
    gone = {"data": str(tmp_path / "gone"), "split": None}
    assert _learned_scored_images(gone, tmp_path / "gone")
    assert not _learned_scored_images(gone, real_root)
    # Renamed since: its images' fingerprint finds it under the new name, whatever that is.
    manifest = load_manifest(real_root)
    renamed = gone | {"images": manifest.images_fingerprint(None)}
    assert _learned_scored_images(renamed, real_root)
    assert not _learned_scored_images(renamed, copies)  # other images
    renamed |= {"split": "train", "images": manifest.images_fingerprint("train")}
    assert not _learned_scored_images(renamed, real_root)
    # Its folder holding other data since: the fingerprint, not the path, says what it saw.
    learned_real = {"data": str(copies), "split": None, "images": manifest.images_fingerprint(None)}
    assert _learned_scored_images(learned_real, real_root)
    assert not _learned_scored_images(
        {"data": str(real_root), "split": None, "images": "other images"}, real_root
    )
    with pytest.raises(SiamdiffError, match="at least one architecture and one seed"):
        evaluate(
            real_root,
            copies,
            out,
            segmenter_dir=segmenter_dir,
            utility=True,
            utility_options={"seeds": ()},
            progress=False,
        )
    assert not out.exists()


def test_an_interrupted_utility_resumes_with_the_numbers_of_an_uninterrupted_one(
    real_root: Path,
    copies: Path,
    synthetic_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import siamdiff.evaluate.utility as utility

    fits: list[tuple[str, int]] = []
    fit = utility.fit_segmenter

    def counted(*args: Any, **kwargs: Any) -> Any:
        fits.append((kwargs["desc"], kwargs["seed"]))
        return fit(*args, **kwargs)

    scored: list[list[str]] = []
    score = utility.score_segmenter

    def recorded(*args: Any, **kwargs: Any) -> Any:
        scores = score(*args, **kwargs)
        scored.append(scores.ids)
        return scores

    monkeypatch.setattr(utility, "fit_segmenter", counted)
    monkeypatch.setattr(utility, "score_segmenter", recorded)
    journal = tmp_path / "utility.jsonl"
    options = {"archs": ("unet",), "seeds": (0, 1), "epochs": 1, "size": 32, "progress": False}
    whole = segmentation_utility(real_root, copies, journal=journal, **options)
    assert len(fits) == 4 and len(journal.read_bytes().splitlines()) == 1 + 4
    test_ids = [r.id for r in load_manifest(real_root).split("test")]
    assert scored == [test_ids] * 4  # every segmenter scored on the real test split
    # Killed during the third training: two finished, and a line torn mid-write.
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(b"".join(lines[:3]) + lines[3][:20])
    fits.clear()
    assert segmentation_utility(real_root, copies, journal=journal, **options) == whole
    assert fits == [("utility unet real+syn seed 0", 0), ("utility unet real+syn seed 1", 1)]
    # A seed more reuses all four; other settings start afresh.
    fits.clear()
    more = segmentation_utility(
        real_root, copies, journal=journal, **options | {"seeds": (0, 1, 2)}
    )
    assert [seed for _, seed in fits] == [2, 2]
    assert (
        more["archs"]["unet"]["real"]["mdice"]["per_seed"][:2]
        == (whole["archs"]["unet"]["real"]["mdice"]["per_seed"])
    )
    fits.clear()
    segmentation_utility(real_root, copies, journal=journal, **options | {"lr": 5e-4})
    assert len(fits) == 4
    # Other synthetic pairs, or the same images split otherwise: afresh too.
    moved = Path(shutil.copytree(real_root, tmp_path / "moved"))
    manifest = json.loads((moved / MANIFEST_NAME).read_text())
    next(r for r in manifest["records"] if r["split"] == "train")["split"] = "val"
    (moved / MANIFEST_NAME).write_text(json.dumps(manifest))
    for real, syn in ((real_root, synthetic_root), (real_root, None), (moved, None)):
        fits.clear()
        segmentation_utility(real, syn, journal=journal, **options | {"lr": 5e-4})
        assert len(fits) == 2 * (1 + (syn is not None)), (real, syn)


def test_evaluate_keeps_the_utility_journal_only_until_its_metrics_are_written(
    real_root: Path, copies: Path, segmenter_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "metrics.json"
    options = {"archs": ("unet",), "seeds": (0,), "epochs": 1, "size": 32}
    # An interrupted --utility evaluation's trainings outlive one without --utility.
    utility_journal(out).write_text('{"utility_journal": 1}\n')
    evaluate(real_root, copies, out, segmenter_dir=segmenter_dir, kid_subsets=2, progress=False)
    assert utility_journal(out).is_file()
    out.unlink()
    metrics = evaluate(
        real_root,
        copies,
        out,
        segmenter_dir=segmenter_dir,
        utility=True,
        utility_options=options,
        kid_subsets=2,
        progress=False,
    )
    assert metrics["utility"]["protocol"]["device"].startswith("cpu-")
    assert out.is_file() and not utility_journal(out).exists()

"""metrics.json end to end on phantom data, its parts, the CLI table and the HTML report."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

from siamdiff.data.dataset import generator_views
from siamdiff.data.manifest import (
    MANIFEST_NAME,
    Manifest,
    Record,
    load_manifest,
    save_pair,
    write_manifest,
)
from siamdiff.data.phantom import make_phantom_dataset
from siamdiff.data.prepare import prepare
from siamdiff.errors import SiamdiffError
from siamdiff.evaluate.features import extract_features, frechet_distance
from siamdiff.evaluate.metrics import (
    _fd_at_size,
    _segmenter_section,
    colour_statistics,
    diversity,
    evaluate,
    format_metrics,
    mask_blind_floor,
    mask_fidelity_histogram,
    ms_ssim_betas,
    same_mask_groups,
    summary_rows,
    write_evaluation_report,
)
from siamdiff.evaluate.segmenter import (
    CONFIG_NAME,
    Segmenter,
    SegmenterSpec,
    frames,
    load_segmenter,
    score_segmenter,
    train_segmenter,
)

from .conftest import SIZE, make_synthetic

PNG = b"\x89PNG\r\n\x1a\n"


def record(id_: str, source: str | None, mask_sha256: str = "") -> Record:
    extra = {} if source is None else {"source_id": source}
    return Record(
        id_, "i.png", "m.png", "", mask_sha256, "syn", "g", "f", "train", 0.1, 8, 8, extra=extra
    )


def test_same_mask_groups_keeps_masks_with_two_or_more_samples() -> None:
    records = [record("a", "x"), record("b", "y"), record("c", "x"), record("d", None)]
    records += [record("e", "z"), record("f", "z"), record("g", "x")]
    assert same_mask_groups(records) == [[0, 2, 6], [4, 5]]
    # --mask-aug: samples of one source conditioned on other (flipped, shifted) masks
    augmented = [record("a", "x", "m1"), record("b", "x", "m2"), record("c", "x", "m1")]
    assert same_mask_groups(augmented) == [[0, 2]]


@pytest.mark.parametrize(("size", "scales"), [(16, 2), (64, 3), (128, 4), (256, 5), (512, 5)])
def test_ms_ssim_uses_the_scales_an_image_allows(size: int, scales: int) -> None:
    betas = ms_ssim_betas(size)
    assert len(betas) == scales and sum(betas) == pytest.approx(1.0)


def test_diversity_is_the_mean_ms_ssim_over_the_pairs_of_each_mask() -> None:
    base = torch.nn.functional.interpolate(
        torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(0)), size=64
    )
    images = base * 2 - 1
    synthetic = [{"image": image} for image in images]
    groups = [[0, 1, 2], [3, 4]]
    result = diversity(synthetic, groups, "no LPIPS weights")
    betas = ms_ssim_betas(64)
    by_pair = [
        multiscale_structural_similarity_index_measure(
            base[[a]], base[[b]], data_range=1.0, betas=betas
        )
        for a, b in ((0, 1), (0, 2), (1, 2), (3, 4))
    ]
    assert (result["ms_ssim"]["pairs"], result["ms_ssim"]["masks"]) == (4, 2)
    assert result["ms_ssim"]["mean"] == pytest.approx(float(torch.stack(by_pair).mean()))
    assert result["lpips"] == {"available": False, "reason": "no LPIPS weights"}


def test_fd_seg_plumbing_with_a_random_weight_segmenter(real_root: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    segmenter = Segmenter(SegmenterSpec(size=SIZE).build(), SegmenterSpec(size=SIZE), "cpu")
    real = extract_features(segmenter.features, frames(real_root, "train", SIZE))
    assert real.shape == (18, 512)
    assert frechet_distance(real, real) == pytest.approx(0.0, abs=1e-9)
    distances = []
    for noise in (5.0, 20.0, 60.0):
        root = make_synthetic(real_root, tmp_path / f"noise{noise:g}", per_mask=1, noise=noise)
        noisy = extract_features(segmenter.features, frames(root, None, SIZE))
        distances.append(frechet_distance(real, noisy))
    assert 0 < distances[0] < distances[1] < distances[2]


def test_colour_statistics(real_root: Path, copies: Path, tmp_path: Path) -> None:
    real = frames(real_root, "train", SIZE)
    same = colour_statistics(real, frames(copies, None, SIZE))
    assert same["wasserstein_rgb"] == [0.0, 0.0, 0.0] and same["histogram_js"] == 0.0
    assert same["real"] == same["synthetic"]
    pixels = torch.stack([((s["image"] + 1) * 127.5).round() for s in real]).double()
    mean, std = pixels.mean(dim=(0, 2, 3)), pixels.std(dim=(0, 2, 3), correction=0)
    np.testing.assert_allclose(same["real"]["mean"], mean.numpy(), atol=1e-3)
    np.testing.assert_allclose(same["real"]["std"], std.numpy(), atol=1e-3)
    noisy = make_synthetic(real_root, tmp_path / "noisy", per_mask=1, noise=30.0)
    different = colour_statistics(real, frames(noisy, None, SIZE))
    assert all(w > 1.0 for w in different["wasserstein_rgb"])
    assert 0.0 < different["histogram_js"] <= 1.0
    # Zero-mean noise keeps the means (up to clipping) and widens the spread.
    np.testing.assert_allclose(different["synthetic"]["mean"], same["real"]["mean"], atol=3.0)
    assert all(
        s > r for s, r in zip(different["synthetic"]["std"], same["real"]["std"], strict=True)
    )


@pytest.fixture(scope="session")
def evaluated(
    real_root: Path, synthetic_root: Path, segmenter_dir: Path, tmp_path_factory: Any
) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("eval") / "metrics.json"
    metrics = evaluate(
        real_root, synthetic_root, out, segmenter_dir=segmenter_dir, kid_subsets=10, progress=False
    )
    return metrics, out


def test_evaluate_writes_every_metric(
    evaluated: tuple[dict[str, Any], Path], real_root: Path, synthetic_root: Path
) -> None:
    metrics, out = evaluated
    assert json.loads(out.read_text()) == json.loads(json.dumps(metrics))
    assert metrics["synthetic"] == {
        "root": str(synthetic_root),
        "images": 36,
        "masks": 18,
        "resolution": None,
        "crop": "crop",
    }
    assert metrics["segmenter"]["trained_on_this_real_train_split"] is True
    assert metrics["warnings"] == [  # 36 images: enough for the plumbing, not for FD
        "FD-seg and KID-seg of 36 synthetic images are noisy and biased upwards: sample 100 or "
        "more (several hundred to compare models)"
    ]
    assert metrics["fd_seg"]["value"] > 0 and metrics["fd_seg"]["features"] == 512
    assert metrics["fd_seg"]["reference_real_test"] > 0
    # The synthetic FD at the test split's size: FD grows as the image count falls.
    assert metrics["fd_seg"]["reference_images"] == 3
    assert metrics["fd_seg"]["value_at_reference_images"] > metrics["fd_seg"]["value"]
    reference = metrics["kid_seg"]["reference_real_test"]
    assert reference.keys() == {"mean", "std", "subsets", "subset_size"}
    assert reference["subset_size"] == 3  # the test split's 3 images, not the whole sets
    assert metrics["kid_seg"]["subset_size"] == 18
    fidelity = metrics["mask_fidelity"]
    assert len(fidelity["per_image"]) == 36 and fidelity["images"] == 36
    dice = [v["dice"] for v in fidelity["per_image"].values()]
    assert fidelity["mdice"] == pytest.approx(np.mean(dice), abs=1e-6)
    assert 0 < fidelity["mask_blind_floor"]["mdice"] < 1
    fitted_on_train = mask_blind_floor(
        generator_views(real_root, "train", SIZE), frames(synthetic_root, None, SIZE)
    )
    assert fidelity["mask_blind_floor"] == pytest.approx(fitted_on_train)
    assert "floor: one mask-blind guess" in format_metrics(metrics)
    assert metrics["segmenter"]["real_test"]["images"] == 3
    assert metrics["diversity"]["ms_ssim"]["pairs"] == 18
    assert 0 < metrics["diversity"]["ms_ssim"]["mean"] < 1
    assert metrics["utility"] == {"available": False, "reason": "not requested"}
    for name in ("inception_fid", "inception_kid", "clip_i", "cmmd"):
        assert metrics["standard"][name]["available"] is False


def test_a_perfect_generator_at_half_the_metric_size_is_compared_at_its_own_resolution(
    real_root: Path, segmenter_dir: Path, tmp_path: Path
) -> None:
    """Its 32 px samples are upsampled to the segmenter's 64 px; real views cropped at 64 px
    directly hold detail no 32 px sample has, and FD-seg and the colour statistics counted
    that as a difference of a generator that makes the real views exactly."""
    perfect = make_synthetic(real_root, tmp_path / "syn", per_mask=1, resolution=SIZE // 2)
    metrics = evaluate(
        real_root, perfect, tmp_path / "m.json", segmenter_dir=segmenter_dir, progress=False
    )
    assert metrics["synthetic"]["resolution"] == SIZE // 2
    assert max(metrics["pixel_stats"]["wasserstein_rgb"]) < 0.3  # rounding to 8 bits only
    assert metrics["fd_seg"]["value"] < 0.01 * metrics["fd_seg"]["reference_real_test"]


def test_mask_fidelity_of_exact_copies_is_the_segmenters_score_on_the_originals(
    real_root: Path, copies: Path, segmenter_dir: Path, tmp_path: Path
) -> None:
    metrics = evaluate(
        real_root, copies, tmp_path / "m.json", segmenter_dir=segmenter_dir, progress=False
    )
    on_real = score_segmenter(load_segmenter(segmenter_dir), frames(real_root, "train", SIZE))
    assert metrics["mask_fidelity"]["mdice"] == pytest.approx(on_real.summary()["mdice"])
    assert metrics["fd_seg"]["value"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["pixel_stats"]["wasserstein_rgb"] == [0.0, 0.0, 0.0]
    reason = metrics["diversity"]["ms_ssim"]["reason"]
    assert metrics["diversity"]["ms_ssim"]["available"] is False and "--per-mask" in reason


def test_evaluate_refuses_bad_inputs(
    real_root: Path, synthetic_root: Path, resplit: Path, segmenter_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "metrics.json"
    with pytest.raises(SiamdiffError, match="REAL must be a real dataset"):
        evaluate(synthetic_root, real_root, out, segmenter_dir=segmenter_dir, progress=False)
    mixed = tmp_path / "mixed"
    shutil.copytree(segmenter_dir, mixed)
    config = json.loads((mixed / CONFIG_NAME).read_text())
    config["data"].append({**config["data"][0], "kind": "synthetic"})
    (mixed / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(SiamdiffError, match="trained on the real training split only"):
        evaluate(real_root, synthetic_root, out, segmenter_dir=mixed, progress=False)
    # Trained on the train split of the same images prepared otherwise: REAL's test included.
    config["data"] = [{**config["data"][0], "root": str(resplit), "fingerprint": "other"}]
    (mixed / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(SiamdiffError, match="trained on 6 of the val and test images of"):
        evaluate(real_root, synthetic_root, out, segmenter_dir=mixed, progress=False)
    warned: list[str] = []
    config["data"][0]["root"] = str(tmp_path / "gone")
    (mixed / CONFIG_NAME).write_text(json.dumps(config))
    assert _segmenter_section(mixed, real_root, warned)["dir"] == str(mixed.resolve())
    assert warned == [
        f"segmenter {mixed} was trained on other images than the training split of {real_root} "
        "(its data is gone: not checked against the test images)"
    ]
    # Sampled from another dataset's masks: CLIP-I pairs and utility splits would be wrong.
    other = tmp_path / "other"
    shutil.copytree(synthetic_root, other)
    manifest = json.loads((other / MANIFEST_NAME).read_text())
    manifest["records"][0]["source_sha256"] = "0" * 64
    (other / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(SiamdiffError, match="was conditioned on another mask"):
        evaluate(real_root, other, out, segmenter_dir=segmenter_dir, progress=False)
    manifest["records"][0]["extra"]["source_id"] = "elsewhere-p00-0000"
    (other / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(SiamdiffError, match=r"which REAL .* lacks"):
        evaluate(real_root, other, out, segmenter_dir=segmenter_dir, progress=False)
    # Utility settings that cannot build fail before any metric is computed.
    for options, message in (
        ({"archs": ("nosuch",)}, "cannot build segmenter nosuch"),
        ({"size": 100}, "multiple of 32"),
        ({"epochs": 0}, "need epochs >= 1"),
        # Builds, but cannot train: found by one step on a blank batch, not after the metrics.
        ({"archs": ("pan",), "size": 64}, "pan/resnet18 cannot train at 64 px"),
        ({"seeds": (-1,)}, "seeds must be >= 0"),
    ):
        with pytest.raises(SiamdiffError, match=message):
            evaluate(
                real_root,
                synthetic_root,
                out,
                segmenter_dir=tmp_path / "never read",
                utility=True,
                utility_options=options,
                progress=False,
            )
    assert not out.exists()
    # An --out that cannot be written is found before the metrics' hours, not after them.
    with pytest.raises(SiamdiffError, match="is a folder: name a file"):
        evaluate(real_root, synthetic_root, tmp_path, segmenter_dir=tmp_path / "never read")


def test_format_metrics_shows_values_and_reasons(evaluated: tuple[dict[str, Any], Path]) -> None:
    metrics, _ = evaluated
    labels = [label for label, _ in summary_rows(metrics)]
    assert len(labels) == len(set(labels))  # results tables are keyed by them
    text = format_metrics(metrics)
    fd = metrics["fd_seg"]["value"]
    assert re.search(rf"^FD-seg \(lower is better\) +{fd:.3f}$", text, re.MULTILINE)
    assert "Inception FID" in text and "n/a (FID Inception-V3 weights not found" in text
    assert "Segmentation utility" in text and "n/a (not requested)" in text
    utility = {
        "available": True,
        "archs": {
            "unet": {
                "real": {"mdice": {"mean": 0.5, "std": 0.01}, "miou": {"mean": 0.4, "std": 0.02}},
                "real+syn": {"mdice": {"mean": 0.6, "std": None}, "miou": {"mean": 0.5, "std": 0}},
                "gain_mdice": 0.1,
                "gain_miou": 0.1,
            }
        },
    }
    text = format_metrics({**metrics, "utility": utility})
    assert "real 0.500 ± 0.010, real+syn 0.600 (1 seed, no spread), gain +0.100" in text


def test_report_is_self_contained_and_escaped(
    evaluated: tuple[dict[str, Any], Path], tmp_path: Path
) -> None:
    metrics, _ = evaluated
    metrics = {**metrics, "real": {**metrics["real"], "root": "<script>alert(1)</script>"}}
    # A folder name that is no UTF-8 (os.fsdecode's surrogates) is shown escaped.
    metrics["synthetic"] = {**metrics["synthetic"], "root": "syn-\udcff"}
    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)
    for name in ("loss_curve.png", "samples/step-00000200.png", "samples/step-00000100.png"):
        (run / name).write_bytes(PNG + name.encode())
    os.utime(run / "samples/step-00000200.png", (1, 1))  # as a copy without times leaves them
    report = write_evaluation_report(metrics, tmp_path / "eval" / "first.json", run_dir=run)
    assert report == tmp_path / "eval" / "first.html"
    page = report.read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "syn-\\udcff" in page
    embedded = [base64.b64decode(b) for b in re.findall(r"base64,([A-Za-z0-9+/=]+)", page)]
    assert embedded[0] == (tmp_path / "eval" / "first_mask_fidelity.png").read_bytes()
    assert embedded[0].startswith(PNG)
    assert embedded[1:] == [PNG + b"loss_curve.png", PNG + b"samples/step-00000200.png"]
    assert "Samples (step-00000200.png)" in page
    # A row under a metric stays visibly under it: HTML collapses the text table's spaces.
    assert '<tr><td class="sub">at the real test split&#x27;s size</td>' in page
    assert "<tr><td>FD-seg (lower is better)</td>" in page
    # A second evaluation into the folder keeps the first one's report; --report moves it.
    second = write_evaluation_report(metrics, tmp_path / "eval" / "second.json")
    assert second.name == "second.html" and report.read_text() == page
    elsewhere = write_evaluation_report(metrics, tmp_path / "eval" / "third.json", tmp_path)
    assert elsewhere == tmp_path / "third.html"


def test_cli_evaluate_with_utility_trains_the_requested_architecture(
    real_root: Path, synthetic_root: Path, segmenter_dir: Path, tmp_path: Path
) -> None:
    from siamdiff.cli import main

    out = tmp_path / "metrics.json"
    argv = ["evaluate", str(real_root), str(synthetic_root), "--out", str(out)]
    argv += ["--segmenter", str(segmenter_dir), "--utility", "--utility-archs", "fpn"]
    argv += ["--utility-seeds", "1", "--utility-first-seed", "3"]
    argv += ["--utility-epochs", "1", "--utility-size", "32"]
    assert main(argv) == 0
    utility = json.loads(out.read_text())["utility"]
    assert list(utility["archs"]) == ["fpn"]
    assert utility["protocol"] | {"seeds": [3], "epochs": 1, "size": 32} == utility["protocol"]
    assert 0 <= utility["archs"]["fpn"]["real+syn"]["mdice"]["mean"] <= 1


def test_synthetic_images_are_compared_with_the_view_the_generator_sees(tmp_path: Path) -> None:
    """Real frames 1.5:1 with a black border, as endoscopy frames come; a model samples the
    lesion-centred square crop. A synthetic set that reproduces those crops exactly is at
    distance 0 (whole frames squashed square would put it far away)."""
    raw = make_phantom_dataset(tmp_path / "raw", n=24, size=SIZE, groups=24, seed=0)
    for path in raw.iterdir():
        square = np.asarray(Image.open(path))
        wide = np.zeros((SIZE, SIZE * 3 // 2, *square.shape[2:]), np.uint8)
        wide[:, :SIZE] = square
        Image.fromarray(wide).save(path)
    real_root = tmp_path / "real"
    prepare([("folder", raw)], real_root, size=SIZE, workers=1, progress=False)
    views = generator_views(real_root, "train", SIZE)
    records = []
    for index, source in enumerate(views.records):
        view = views[index]
        image = ((view["image"].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
        fields = {"dataset": "syn", "group": source.group, "frame": source.frame, "split": "train"}
        extra = {"source_id": source.id, "seed": 0}
        records.append(
            save_pair(
                tmp_path / "syn",
                f"syn-{source.id}",
                image,
                view["mask"][0].numpy(),
                **fields,
                extra=extra,
            )
        )
    write_manifest(tmp_path / "syn", Manifest(records=records, preprocessing={}, kind="synthetic"))
    assert {(r.width, r.height) for r in load_manifest(real_root).records} == {(96, 64)}
    segmenter = train_segmenter(real_root, tmp_path / "seg", size=SIZE, epochs=1, progress=False)
    metrics = evaluate(
        real_root,
        tmp_path / "syn",
        tmp_path / "m.json",
        segmenter_dir=segmenter,
        kid_subsets=5,
        progress=False,
    )
    assert metrics["fd_seg"]["value"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["pixel_stats"]["wasserstein_rgb"] == [0.0, 0.0, 0.0]
    whole = colour_statistics(
        frames(real_root, "train", SIZE), frames(tmp_path / "syn", None, SIZE)
    )
    assert min(whole["wasserstein_rgb"]) > 1.0  # what the whole frames' border would have cost


def test_a_report_without_per_image_scores_draws_an_empty_histogram_quietly() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mask_fidelity_histogram({}).startswith(PNG)


def test_no_fd_is_given_at_a_size_the_synthetic_set_does_not_reach() -> None:
    """6 synthetic images cannot give an FD "at the test split's 138 images"."""
    rng = np.random.default_rng(0)
    real, synthetic = rng.normal(size=(40, 4)), rng.normal(size=(6, 4))
    assert _fd_at_size(real, synthetic, 7, seed=0) is None
    assert _fd_at_size(real, synthetic, 6, seed=0) == frechet_distance(real, synthetic)
    assert _fd_at_size(real, synthetic, 3, seed=0) > 0


def test_the_mask_blind_floor_is_the_most_frequent_pixels_against_every_mask() -> None:
    """Noise samples scored mDice 0.43 against real images' 0.51: lesion-centred masks agree
    with a centred guess by themselves; the floor says how much."""

    def square(row: int, col: int) -> dict[str, torch.Tensor]:
        mask = torch.zeros(1, 4, 4)
        mask[0, row : row + 2, col : col + 2] = 1
        return {"mask": mask}

    real = [square(0, 0), square(1, 1), square(1, 1)]  # the guess: the square at (1, 1)
    synthetic = [square(0, 0), square(1, 1), square(2, 2)]  # not what the guess is fitted to
    floor = mask_blind_floor(real, synthetic, batch_size=2)
    assert floor["mdice"] == pytest.approx((2 * 1 / 8 + 1 + 2 * 1 / 8) / 3)
    assert floor["miou"] == pytest.approx((1 / 7 + 1 + 1 / 7) / 3)

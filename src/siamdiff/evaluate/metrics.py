"""``siamdiff evaluate REAL SYN``: every offline metric of a synthetic set, in one metrics.json.

Domain metrics (always computed, no pretrained weights needed) use siamdiff's own polyp
segmenter, trained on the REAL training split only (``siamdiff train-segmenter``):

- FD-seg / KID-seg: Fréchet distance and KID between the pooled deepest-encoder features
  of the real training images and of the synthetic images (the authors compare with the
  training images). A domain metric: its scale is not comparable with Inception FID.
- Mask fidelity: the segmenter's mask for each synthetic image against its conditioning
  mask, Dice / IoU per image (the replication reports' "mDice 0.615" protocol), beside the
  same segmenter's score on the real test split, in the same lesion-centred view, as a
  reference.
- Diversity: mean pairwise MS-SSIM (lower = more diverse) and LPIPS (higher = more
  diverse, when its backbone is on disk) among samples of the same conditioning mask.
- Pixel statistics: per-channel colour means / stds, per-channel Wasserstein-1 distance
  between intensity histograms, Jensen-Shannon distance between joint colour histograms.

Optional: segmentation utility (:mod:`siamdiff.evaluate.utility`) and the standard metrics
(:mod:`siamdiff.evaluate.standard`), each reported ``unavailable`` with a reason when not run.
"""

from __future__ import annotations

import base64
import html
import itertools
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from scipy.spatial.distance import jensenshannon
from scipy.stats import wasserstein_distance
from torch.utils.data import DataLoader, Dataset
from torchmetrics.functional.image import multiscale_structural_similarity_index_measure
from tqdm import tqdm

from siamdiff import __version__
from siamdiff.atomic import (
    atomic_write_bytes,
    atomic_write_json,
    check_writable_file,
)
from siamdiff.data.dataset import DEFAULT_VIEW, GeneratorView, generator_views
from siamdiff.data.manifest import Manifest, Record, load_manifest, require_intact
from siamdiff.errors import SiamdiffError
from siamdiff.evaluate.features import (
    extract_features,
    frechet_distance,
    kernel_inception_distance,
)
from siamdiff.evaluate.segmenter import (
    SegmentationScores,
    Segmenter,
    dice_iou,
    frames,
    load_segmenter,
    read_segmenter_config,
    score_segmenter,
    scored_images_learned,
)
from siamdiff.evaluate.standard import (
    MissingWeights,
    load_lpips,
    load_standard_models,
    standard_metrics,
    unavailable,
)
from siamdiff.evaluate.utility import (
    MATCHED,
    check_utility,
    format_mean_std,
    segmentation_utility,
)
from siamdiff.report import figure_png

FORMAT = "siamdiff-metrics"
# 2: the real side of FD/KID-seg, colour statistics, Inception and CLIP metrics is the
# generator's lesion-centred view (data.dataset.generator_views), no longer whole frames.
# 3: the segmenter's real-test reference is scored in that view too; FD-seg is also given at
# the real test split's image count, and KID-seg has a real-test reference.
# 4: the real side is viewed in the generator's framing and at its resolution, then resized
# to the metric's size, as the synthetic images are (synthetic.crop, synthetic.resolution).
FORMAT_VERSION = 4


def report_paths(out_json: str | Path, out_dir: str | Path | None = None) -> tuple[Path, Path]:
    """The HTML report and mask-fidelity histogram of the metrics in ``out_json``, named after
    it (a second evaluation into the folder keeps the first one's), in ``out_dir`` (default:
    beside it)."""
    out_json = Path(out_json)
    folder = Path(out_dir) if out_dir is not None else out_json.parent
    report = folder / f"{out_json.stem}.html"
    if report.resolve() == out_json.resolve():
        raise SiamdiffError("name the metrics file otherwise: .html is its report's", out_json)
    return report, folder / f"{out_json.stem}_mask_fidelity.png"


# Wang et al. 2003, the five-scale weights that torchmetrics also uses.
MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
MS_SSIM_KERNEL = 11
COLOUR_BINS = 8  # per channel, for the joint histogram
FD_DRAWS = 10  # subsets averaged for the synthetic FD at the reference's size
FEW_IMAGES = 100  # synthetic sets smaller than this get a warning on FD-seg / KID-seg
UTILITY_CHECKED = ("archs", "seeds", "encoder", "epochs", "size", "batch_size", "lr")


def conditioning_mask(record: Record) -> tuple[str, str]:
    """The mask a synthetic sample was conditioned on: its source and the mask as saved
    (``--mask-aug`` gives each sample of one source its own flipped / scaled / shifted mask)."""
    return str(record.extra.get("source_id", record.id)), record.mask_sha256


def same_mask_groups(records: Sequence[Record]) -> list[list[int]]:
    """Indices of the synthetic samples that share a conditioning mask, groups of 2 or more."""
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for index, record in enumerate(records):
        if record.extra.get("source_id") is not None:
            groups[conditioning_mask(record)].append(index)
    return [members for _, members in sorted(groups.items()) if len(members) > 1]


def ms_ssim_betas(size: int) -> tuple[float, ...]:
    """The MS-SSIM scale weights an image of side ``size`` allows, renormalised to sum to 1.

    Five scales need about 176 px with the 11 px window (torchmetrics' own bound); smaller
    images use fewer scales, so values at different sizes are not comparable.
    """
    scales = 1
    for count in range(2, len(MS_SSIM_BETAS) + 1):
        if size >= 2**count and size // (count - 1) ** 2 > MS_SSIM_KERNEL - 1:
            scales = count
    betas = np.array(MS_SSIM_BETAS[:scales])
    return tuple(float(b) for b in betas / betas.sum())


DIVERSITY_PAIRS_PER_BATCH = 64


def diversity(
    synthetic: Dataset,
    groups: Sequence[Sequence[int]],
    lpips: torch.nn.Module | str,
    *,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict[str, dict[str, Any]]:
    """Mean pairwise MS-SSIM and LPIPS over every pair of samples within each group.
    ``lpips`` is torchmetrics' LPIPS module, or the reason it is unavailable."""
    if not groups:
        reason = (
            "no conditioning mask has two or more samples (sample with --per-mask 2 or more, "
            "without --mask-aug)"
        )
        return {"ms_ssim": unavailable(reason), "lpips": unavailable(reason)}
    size = synthetic[groups[0][0]]["image"].shape[-1]
    betas = ms_ssim_betas(size)
    ssim_values, lpips_values = [], []
    for members in tqdm(groups, desc="diversity", unit="mask", disable=not progress, leave=False):
        images = torch.stack([synthetic[i]["image"] for i in members]).to(device)
        pairs = list(itertools.combinations(range(len(members)), 2))
        # In chunks: --per-mask 50 is 1225 pairs of one mask, a batch no GPU holds at 256 px.
        for start in range(0, len(pairs), DIVERSITY_PAIRS_PER_BATCH):
            first, second = zip(*pairs[start : start + DIVERSITY_PAIRS_PER_BATCH], strict=True)
            a, b = images[list(first)], images[list(second)]
            with torch.inference_mode():
                ssim_values.append(
                    multiscale_structural_similarity_index_measure(
                        (a + 1) / 2, (b + 1) / 2, data_range=1.0, betas=betas, reduction="none"
                    ).cpu()
                )
                if not isinstance(lpips, str):
                    lpips_values.append(lpips(a, b).reshape(-1).cpu())
    counts = {"pairs": sum(len(v) for v in ssim_values), "masks": len(groups)}
    ssim = torch.cat(ssim_values).double()
    result = {
        "ms_ssim": {
            "available": True,
            "mean": float(ssim.mean()),
            "std": float(ssim.std()) if len(ssim) > 1 else 0.0,
            "scales": len(betas),
            "size": size,
            **counts,
        }
    }
    if isinstance(lpips, str):
        result["lpips"] = unavailable(lpips)
    else:
        scores = torch.cat(lpips_values).double()
        result["lpips"] = {"available": True, "mean": float(scores.mean()), **counts}
    return result


def colour_histograms(
    dataset: Dataset, batch_size: int = 32, workers: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel 256-bin histograms (3 x 256) and the joint ``COLOUR_BINS``³ histogram."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    channels = torch.zeros(3, 256, dtype=torch.float64)
    joint = torch.zeros(COLOUR_BINS**3, dtype=torch.float64)
    shift = 8 - int(np.log2(COLOUR_BINS))
    for batch in loader:
        pixels = ((batch["image"] + 1) * 127.5).round().clamp(0, 255).long()
        pixels = pixels.permute(1, 0, 2, 3).reshape(3, -1)
        for c in range(3):
            channels[c] += torch.bincount(pixels[c], minlength=256)
        coarse = pixels >> shift
        cell = (coarse[0] * COLOUR_BINS + coarse[1]) * COLOUR_BINS + coarse[2]
        joint += torch.bincount(cell, minlength=COLOUR_BINS**3)
    return channels.numpy(), joint.numpy()


def colour_statistics(real: Dataset, synthetic: Dataset, workers: int = 0) -> dict[str, Any]:
    """Colour means / stds (0..255) of both sets and the distances between their histograms."""
    (real_channels, real_joint), (syn_channels, syn_joint) = (
        colour_histograms(data, workers=workers) for data in (real, synthetic)
    )
    levels = np.arange(256, dtype=np.float64)

    def moments(histograms: np.ndarray) -> dict[str, list[float]]:
        weights = histograms / histograms.sum(axis=1, keepdims=True)
        mean = weights @ levels
        std = np.sqrt(weights @ levels**2 - mean**2)
        return {"mean": mean.round(3).tolist(), "std": std.round(3).tolist()}

    return {
        "available": True,
        "real": moments(real_channels),
        "synthetic": moments(syn_channels),
        "wasserstein_rgb": [
            float(wasserstein_distance(levels, levels, real_channels[c], syn_channels[c]))
            for c in range(3)
        ],
        "histogram_js": float(jensenshannon(real_joint, syn_joint, base=2)),
        "histogram_bins": COLOUR_BINS,
    }


def _per_image(scores: SegmentationScores) -> dict[str, dict[str, float]]:
    return {
        image_id: {"dice": round(float(d), 6), "iou": round(float(i), 6)}
        for image_id, d, i in zip(scores.ids, scores.dice, scores.iou, strict=True)
    }


def _segmenter_section(segmenter_dir: Path, real_root: Path, warnings: list[str]) -> dict[str, Any]:
    """What the segmenter was trained on; it must be real data only (else FD-seg is biased)."""
    config = read_segmenter_config(segmenter_dir)
    data = config.get("data", [])
    if len(data) != 1 or data[0].get("kind") != "real":
        raise SiamdiffError(
            "this segmenter was trained with extra data; FD-seg, KID-seg and mask fidelity "
            "need one trained on the real training split only",
            segmenter_dir,
        )
    same_split = data[0].get("fingerprint") == load_manifest(real_root).images_fingerprint("train")
    if not same_split:
        learned = scored_images_learned(data[0].get("root", ""), data[0].get("split"), real_root)
        if learned:
            raise SiamdiffError(
                f"this segmenter was trained on {learned} of the val and test images of "
                f"{real_root}: its scores there, the scale mask fidelity is read against, "
                "would be inflated (train-segmenter on its training split)",
                segmenter_dir,
            )
        unchecked = " (its data is gone: not checked against the test images)"
        warnings.append(
            f"segmenter {segmenter_dir} was trained on other images than the training split "
            f"of {real_root}{unchecked if learned is None else ''}"
        )
    return {
        "dir": str(segmenter_dir.resolve()),
        **config["spec"],
        "training": config.get("training", {}),
        "trained_on_this_real_train_split": same_split,
    }


def segmenter_metrics(
    segmenter: Segmenter,
    real_root: Path,
    syn_root: Path,
    *,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 0,
    batch_size: int = 16,
    workers: int = 0,
    progress: bool = False,
    view: GeneratorView = DEFAULT_VIEW,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """FD-seg, KID-seg and mask fidelity of the synthetic set; and the segmenter's own score
    on the real test split (None without one), the scale to read mask fidelity against.
    ``view``: the generator's, in which the real images are seen (generator_views)."""
    size = segmenter.spec.size
    scan = {"batch_size": batch_size, "workers": workers, "progress": progress}

    def features(split: str) -> np.ndarray:
        return extract_features(
            segmenter.features,
            generator_views(real_root, split, size, view=view),
            desc=f"segmenter features real {split}",
            device=segmenter.device,
            **scan,
        )

    real = features("train")
    synthetic_frames = frames(syn_root, None, size)
    synthetic = score_segmenter(segmenter, synthetic_frames, desc="segment syn", **scan)
    kid_mean, kid_std = kernel_inception_distance(
        real, synthetic.features, kid_subsets, kid_subset_size, seed
    )
    metrics: dict[str, Any] = {
        "fd_seg": {
            "available": True,
            "value": frechet_distance(real, synthetic.features),
            "features": real.shape[1],
        },
        "kid_seg": {
            "available": True,
            "mean": kid_mean,
            "std": kid_std,
            "subsets": kid_subsets,
            "subset_size": min(kid_subset_size, len(real), len(synthetic.features)),
        },
        "mask_fidelity": {
            "available": True,
            **synthetic.summary(),
            "median_dice": float(np.median(synthetic.dice)),
            "mask_blind_floor": mask_blind_floor(
                generator_views(real_root, "train", size, view=view), synthetic_frames, batch_size
            ),
            "per_image": _per_image(synthetic),
        },
    }
    if not load_manifest(real_root).split("test"):
        return metrics, None
    # In the view the synthetic images have (the lesion-centred square): the same task.
    test_view = generator_views(real_root, "test", size, view=view)
    test = score_segmenter(segmenter, test_view, desc="segment test", **scan)
    if len(test.ids) > 1:
        # How far real images the segmenter never saw lie from its training images. FD is
        # biased upwards the more the fewer images it sees: the synthetic set's FD is also
        # given at the test split's size, the one to read the reference against.
        test_features = features("test")
        n = len(test_features)
        metrics["fd_seg"] |= {
            "reference_real_test": frechet_distance(real, test_features),
            "reference_images": n,
            "value_at_reference_images": _fd_at_size(real, synthetic.features, n, seed),
        }
        kid_mean, kid_std = kernel_inception_distance(
            real, test_features, kid_subsets, kid_subset_size, seed
        )
        metrics["kid_seg"]["reference_real_test"] = {
            "mean": kid_mean,
            "std": kid_std,
            "subsets": kid_subsets,
            "subset_size": min(kid_subset_size, len(real), n),
        }
    return metrics, {**test.summary(), "per_image": _per_image(test)}


def _fd_at_size(real: np.ndarray, synthetic: np.ndarray, size: int, seed: int) -> float | None:
    """Mean FD of ``FD_DRAWS`` random ``size``-image subsets of the synthetic features; None
    when there are fewer than ``size`` (an FD of fewer images is not at that size)."""
    if size > len(synthetic):
        return None
    if size == len(synthetic):
        return frechet_distance(real, synthetic)
    rng = np.random.default_rng(seed)
    draws = [rng.choice(len(synthetic), size, replace=False) for _ in range(FD_DRAWS)]
    return float(np.mean([frechet_distance(real, synthetic[d]) for d in draws]))


def _check_inputs(real_root: Path, syn_root: Path) -> tuple[Manifest, Manifest]:
    """Both manifests; REAL must be real and SYN synthetic (catches swapped arguments)."""
    real, synthetic = load_manifest(real_root), load_manifest(syn_root)
    if real.kind != "real":
        raise SiamdiffError(f"REAL must be a real dataset, this one is {real.kind}", real_root)
    if synthetic.kind != "synthetic":
        raise SiamdiffError(
            f"SYN must be a synthetic set (siamdiff sample), this one is {synthetic.kind}",
            syn_root,
        )
    for root, count in ((real_root, len(real.split("train"))), (syn_root, len(synthetic.records))):
        if count < 2:
            raise SiamdiffError(f"needs at least 2 images to compare, has {count}", root)
    # CLIP-I pairs each sample with its source image and utility trusts the sources' splits:
    # both hold only for samples of REAL's own masks.
    masks = {record.id: record.mask_sha256 for record in real.records}
    for record in synthetic.records:
        source = record.extra.get("source_id")
        if source is None:
            continue
        if source not in masks:
            raise SiamdiffError(
                f"sample {record.id} comes from mask {source}, which REAL {real_root} lacks",
                syn_root,
            )
        if record.source_sha256 and record.source_sha256 != masks[source]:
            raise SiamdiffError(
                f"sample {record.id} was conditioned on another mask {source} than REAL's "
                "(sampled from another dataset, or REAL's masks changed since)",
                syn_root,
            )
    return real, synthetic


def evaluate(
    real_root: str | Path,
    syn_root: str | Path,
    out_json: str | Path,
    *,
    segmenter_dir: str | Path,
    utility: bool = False,
    utility_options: Mapping[str, Any] | None = None,
    inception_weights: str | Path | None = None,
    clip_model: str | Path | None = None,
    lpips_net: str = "alex",
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 0,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    workers: int = 0,
    progress: bool = True,
    verify: bool = True,
) -> dict[str, Any]:
    """Compute every metric of SYN against REAL and write them to ``out_json`` (atomically).

    ``utility_options`` are keyword arguments of :func:`segmentation_utility` (archs, seeds,
    epochs, size, ...), used when ``utility`` is true. Deterministic for ``seed``. ``verify``:
    both datasets are refused up front when their files no longer match their manifests.
    """
    real_root, syn_root, segmenter_dir = Path(real_root), Path(syn_root), Path(segmenter_dir)
    # Every problem found now, not after the metrics' hours; inside an input, the metrics
    # would overwrite a manifest or a config, or fail the dataset's verify.
    inputs = {"the real dataset": real_root, "the synthetic set": syn_root}
    check_writable_file(out_json, inputs | {"the segmenter": segmenter_dir})
    if kid_subsets < 1 or kid_subset_size < 2:
        raise SiamdiffError(
            f"KID needs at least 1 subset of at least 2 images, got {kid_subsets} of "
            f"{kid_subset_size}"
        )
    real_manifest, syn_manifest = _check_inputs(real_root, syn_root)
    for root in (real_root, syn_root) if verify else ():
        require_intact(root, "pass --no-verify")
    if utility:
        options = {k: v for k, v in (utility_options or {}).items() if k in UTILITY_CHECKED}
        check_utility(real_root, syn_root, **options)
    try:
        lpips: torch.nn.Module | str = load_lpips(lpips_net, device)
    except MissingWeights as exc:
        lpips = str(exc)
    standard_models = load_standard_models(inception_weights, clip_model, device)
    # The generator's framing and size (its resolution None for a set siamdiff did not sample).
    view = GeneratorView.of_synthesis(syn_manifest.preprocessing.get("synthesis", {}))
    warnings: list[str] = []
    metrics: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_by": f"siamdiff {__version__}",
        "real": {
            "root": str(real_root.resolve()),  # a report rebuilt elsewhere finds it
            "dataset_version": real_manifest.dataset_version,
            "train_images": len(real_manifest.split("train")),
        },
        "synthetic": {
            "root": str(syn_root.resolve()),
            "images": len(syn_manifest.records),
            "masks": len({conditioning_mask(r) for r in syn_manifest.records}),
            "resolution": view.resolution,
            "crop": view.crop,
        },
        "segmenter": _segmenter_section(segmenter_dir, real_root, warnings),
    }
    segmenter = load_segmenter(segmenter_dir, device)
    domain, real_test = segmenter_metrics(
        segmenter,
        real_root,
        syn_root,
        kid_subsets=kid_subsets,
        kid_subset_size=kid_subset_size,
        seed=seed,
        batch_size=batch_size,
        workers=workers,
        progress=progress,
        view=view,
    )
    metrics |= domain
    if real_test is not None:
        metrics["segmenter"]["real_test"] = real_test
    images, test_images = len(syn_manifest.records), metrics["fd_seg"].get("reference_images")
    if images < FEW_IMAGES:
        warnings.append(
            f"FD-seg and KID-seg of {images} synthetic images are noisy and biased upwards: "
            f"sample {FEW_IMAGES} or more (several hundred to compare models)"
        )
    if test_images and images < test_images:
        warnings.append(
            f"the synthetic set ({images} images) is smaller than the real test split "
            f"({test_images}): FD-seg at the test split's size is n/a"
        )

    size = segmenter.spec.size
    real_train = generator_views(real_root, "train", size, view=view)
    synthetic = frames(syn_root, None, size)
    groups = same_mask_groups(synthetic.records)
    metrics["diversity"] = diversity(synthetic, groups, lpips, device=device, progress=progress)
    metrics["pixel_stats"] = colour_statistics(real_train, synthetic, workers)
    metrics["standard"] = standard_metrics(
        real_root,
        syn_root,
        models=standard_models,
        view=view,
        kid_subsets=kid_subsets,
        kid_subset_size=kid_subset_size,
        seed=seed,
        batch_size=batch_size,
        device=device,
        progress=progress,
    )
    del standard_models  # Inception and CLIP, not kept through --utility's training
    journal = utility_journal(out_json)
    metrics["utility"] = (
        segmentation_utility(
            real_root,
            syn_root,
            device=device,
            workers=workers,
            progress=progress,
            journal=journal,
            **(utility_options or {}),
        )
        if utility
        else unavailable("not requested")
    )
    metrics["warnings"] = warnings
    atomic_write_json(out_json, metrics)
    if utility:  # its numbers are in out_json now; without --utility, kept for the one that has
        journal.unlink(missing_ok=True)
    return metrics


def utility_journal(out_json: str | Path) -> Path:
    """Where ``evaluate --utility`` keeps its finished trainings until ``out_json`` is written:
    an interrupted evaluation resumes from them."""
    out_json = Path(out_json)
    return out_json.with_name(f".{out_json.name}.utility.jsonl")


def _value(entry: Mapping[str, Any] | None, text: str) -> str:
    """``text`` formatted with the entry's fields, or why the metric is missing."""
    if not entry:
        return "n/a"
    if not entry.get("available", True):
        return f"n/a ({entry.get('reason', 'unavailable')})"
    return text.format(**entry)


def _kid(entry: Mapping[str, Any] | None) -> str:
    """Mean ± std, or the mean alone when there is no spread: one subset, or every subset
    the whole sets."""
    if entry and entry.get("available", True) and entry.get("std") is None:
        why = "one subset" if entry.get("subsets") == 1 else "whole sets"
        return _value(entry, f"{{mean:.4f}} ({why}, no subset spread)")
    return _value(entry, "{mean:.4f} ± {std:.4f}")


def summary_rows(metrics: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(metric, value) rows for the CLI table and the HTML report."""
    standard = metrics.get("standard", {})
    diversity_ = metrics.get("diversity", {})
    fd_seg = metrics.get("fd_seg", {})
    reference = fd_seg.get("reference_real_test")
    same_size = fd_seg.get("value_at_reference_images")
    real_test = metrics.get("segmenter", {}).get("real_test")
    pixel = metrics.get("pixel_stats")
    rows = [
        ("FD-seg (lower is better)", _value(metrics.get("fd_seg"), "{value:.3f}")),
        (
            "  at the real test split's size",
            "n/a"
            if same_size is None
            else f"{same_size:.3f} ({fd_seg['reference_images']} images)",
        ),
        (  # labels are unique: tables are built keyed by them
            "  reference: real test vs real train (FD)",
            "n/a" if reference is None else f"{reference:.3f}",
        ),
        ("KID-seg (lower is better)", _kid(metrics.get("kid_seg"))),
        (
            "  reference: real test vs real train (KID)",
            _kid(metrics.get("kid_seg", {}).get("reference_real_test")),
        ),
        (
            "Mask fidelity mDice / mIoU",
            _value(metrics.get("mask_fidelity"), "{mdice:.3f} / {miou:.3f}"),
        ),
        ("  reference: segmenter on real test", _value(real_test, "{mdice:.3f} / {miou:.3f}")),
        (
            "  floor: one mask-blind guess",
            _value(
                metrics.get("mask_fidelity", {}).get("mask_blind_floor"), "{mdice:.3f} / {miou:.3f}"
            ),
        ),
        (
            "MS-SSIM same mask (lower = more diverse)",
            _value(diversity_.get("ms_ssim"), "{mean:.3f} ({pairs} pairs)"),
        ),
        (
            "LPIPS same mask (higher = more diverse)",
            _value(diversity_.get("lpips"), "{mean:.3f} ({pairs} pairs)"),
        ),
        (
            "Colour W1 R / G / B (0..255)",
            "n/a" if not pixel else " / ".join(f"{w:.2f}" for w in pixel["wasserstein_rgb"]),
        ),
        ("Colour histogram JS distance", _value(pixel, "{histogram_js:.3f}")),
        ("Inception FID", _value(standard.get("inception_fid"), "{value:.2f}")),
        ("Inception KID", _kid(standard.get("inception_kid"))),
        ("CLIP-I (higher is closer)", _value(standard.get("clip_i"), "{value:.4f}")),
        ("CMMD (lower is better)", _value(standard.get("cmmd"), "{value:.4f}")),
    ]
    utility = metrics.get("utility", {})
    if not utility.get("available", False):
        rows.append(("Segmentation utility", _value(utility, "")))
    for arch, result in utility.get("archs", {}).items():
        for metric in ("mdice", "miou"):
            cells = [
                f"{name} {format_mean_std(result[name][metric])}"
                for name in ("real", "real+syn", MATCHED)
                if name in result
            ]
            if f"gain_{metric}" in result:
                cells.append(f"gain {_signed(result[f'gain_{metric}'])}")
            if f"gain_matched_steps_{metric}" in result:
                cells.append(
                    f"over matched steps {_signed(result[f'gain_matched_steps_{metric}'])}"
                )
            rows.append((f"Utility {arch} {metric}", ", ".join(cells)))
    return rows


def format_metrics(metrics: Mapping[str, Any]) -> str:
    """The metrics as an aligned two-column text table, then any warnings."""
    rows = summary_rows(metrics)
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    lines += [f"warning: {w}" for w in metrics.get("warnings", [])]
    return "\n".join(lines)


def _masks(dataset: Dataset, batch_size: int) -> Iterator[torch.Tensor]:
    for batch in DataLoader(dataset, batch_size=batch_size):
        yield batch["mask"][:, 0] >= 0.5


def mask_blind_floor(fit: Dataset, scored: Dataset, batch_size: int = 16) -> dict[str, float]:
    """mDice / mIoU against ``scored``'s masks of one guess made without looking: the pixels
    most often lesion among ``fit``'s masks (the real training masks, framed as the generator
    frames them), as many as their mean area. A generator that ignores its mask (or draws
    noise) scores about this much: framed around their lesions, masks agree with a centred
    blob by themselves. Mask fidelity means something only above it."""
    total, count = None, 0
    for masks in _masks(fit, batch_size):
        summed = masks.sum(0, dtype=torch.float64)
        total = summed if total is None else total + summed
        count += len(masks)
    frequency = total.flatten() / count
    guess = torch.zeros_like(frequency, dtype=torch.bool)
    guess[frequency.topk(round(float(frequency.sum()))).indices] = True
    guess = guess.reshape(total.shape)
    scores = [dice_iou(guess.expand_as(masks), masks) for masks in _masks(scored, batch_size)]
    dice, iou = (torch.cat([score[k] for score in scores]) for k in (0, 1))
    return {"mdice": float(dice.mean()), "miou": float(iou.mean())}


def _signed(value: float) -> str:
    """``+0.012``; a gain that rounds to nothing is ``+0.000``, never ``-0.000``."""
    return f"{round(value, 3) + 0.0:+.3f}"


def mask_fidelity_histogram(metrics: Mapping[str, Any]) -> bytes:
    """PNG: per-image Dice of the synthetic images (and of the real test images, for scale)."""
    figure = Figure(figsize=(6, 3.5))
    ax = figure.add_subplot()
    bins = np.linspace(0.0, 1.0, 21)
    sets = (
        ("synthetic vs conditioning mask", metrics.get("mask_fidelity", {})),
        ("real test vs ground truth", metrics.get("segmenter", {}).get("real_test", {})),
    )
    for label, entry in sets:
        dice = [v["dice"] for v in entry.get("per_image", {}).values()]
        if dice:
            ax.hist(dice, bins=bins, alpha=0.6, density=True, label=f"{label} (n={len(dice)})")
    ax.set_xlabel("Dice per image")
    ax.set_ylabel("density")
    ax.set_title("Mask fidelity: segmenter trained on real data")
    if ax.has_data():
        ax.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    return figure_png(figure)


def _img(title: str, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    title = html.escape(title)
    return f'<h2>{title}</h2>\n<img alt="{title}" src="data:image/png;base64,{data}">'


def _table_row(name: str, value: str) -> str:
    """A metric's row; one indented under it in the text table (a reference, a floor) is
    indented here by its class, as HTML collapses leading spaces."""
    label = (
        f'<td class="sub">{html.escape(name.strip())}</td>'
        if name.startswith(" ")
        else (f"<td>{html.escape(name)}</td>")
    )
    return f"<tr>{label}<td>{html.escape(value)}</td></tr>"


def write_evaluation_report(
    metrics: Mapping[str, Any],
    out_json: str | Path,
    out_dir: str | Path | None = None,
    run_dir: str | Path | None = None,
) -> Path:
    """Write the HTML report (self-contained: images embedded) and the mask-fidelity
    histogram of the metrics written to ``out_json`` (see :func:`report_paths`); with
    ``run_dir``, embed its ``loss_curve.png`` and newest ``samples/*.png``."""
    report, histogram_path = report_paths(out_json, out_dir)
    histogram = mask_fidelity_histogram(metrics)
    atomic_write_bytes(histogram_path, histogram)
    table = "\n".join(_table_row(name, value) for name, value in summary_rows(metrics))
    sections = [_img("Mask fidelity per image", histogram)]
    synthetic_grid = Path(str(metrics.get("synthetic", {}).get("root", ""))) / "samples.png"
    if synthetic_grid.is_file():  # written by `siamdiff sample`: mask | real | synthetic
        sections.insert(
            0, _img("Synthetic samples (mask | real | synthetic)", synthetic_grid.read_bytes())
        )
    if run_dir is not None:
        run_dir = Path(run_dir)
        loss_curve = run_dir / "loss_curve.png"
        if loss_curve.is_file():
            sections.append(_img("Training losses", loss_curve.read_bytes()))
        # The zero-padded step in the name, not the file time (a copy resets it), is the order.
        grids = sorted(run_dir.glob("samples/*.png"))
        if grids:
            sections.append(_img(f"Samples ({grids[-1].name})", grids[-1].read_bytes()))
    notes = [
        "FD-seg / KID-seg use the pooled features of a polyp segmenter trained by siamdiff on "
        "the real training split: a domain metric, not comparable with Inception FID.",
        *[f"Warning: {w}" for w in metrics.get("warnings", [])],
    ]
    real, synthetic = metrics.get("real", {}), metrics.get("synthetic", {})

    def text(value: Any) -> str:
        return html.escape(str(value))

    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>siamdiff evaluation</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}
td{{padding:2px 12px;border-bottom:1px solid #ddd}}td.sub{{padding-left:2.5em;color:#555}}
img{{max-width:100%}}</style></head>
<body><h1>siamdiff evaluation</h1>
<p>Real: {text(real.get("root"))} ({text(real.get("train_images"))} training images)<br>
Synthetic: {text(synthetic.get("root"))} ({text(synthetic.get("images"))} images,
{text(synthetic.get("masks"))} masks)<br>{text(metrics.get("created_by"))}</p>
<table>
{table}
</table>
{"".join(f"<p>{text(n)}</p>" for n in notes)}
{chr(10).join(sections)}
</body></html>
"""
    # A folder name that is no UTF-8 (Linux allows any bytes) is shown escaped, not a crash.
    atomic_write_bytes(report, page.encode("utf-8", "backslashreplace"))
    return report

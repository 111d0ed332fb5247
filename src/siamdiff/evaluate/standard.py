"""The field's standard metrics, computed only when their pretrained weights are on disk.

- Inception FID / KID: 2048-d pool features of the FID Inception-V3 (the TF-ported
  weights that torch-fidelity and torchmetrics use), from a file given by the user or
  torch hub's cache, where torch-fidelity keeps ``weights-inception-2015-12-05-6726825d.pth``.
- LPIPS (torchmetrics): the linear heads ship in the torchmetrics wheel; the AlexNet / VGG /
  SqueezeNet backbone comes from torchvision's download cache (torch hub ``checkpoints/``).
- CLIP-I and CMMD: a local Hugging Face CLIP directory given by the user.

Every file is looked for BEFORE any library call that would try to download it (offline,
a download hangs or fails slowly). A metric whose weights are absent is reported as
``{"available": false, "reason": ...}``, never replaced by something else.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch.utils.data import Dataset

from siamdiff.data.dataset import DEFAULT_VIEW, GeneratorView, generator_views
from siamdiff.errors import SiamdiffError, first_line
from siamdiff.evaluate.features import (
    cmmd,
    extract_features,
    frechet_distance,
    kernel_inception_distance,
)
from siamdiff.evaluate.segmenter import frames

# The file name of torch-fidelity's URL_INCEPTION_V3, which torch hub caches under it.
INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_SIZE = 299
LPIPS_BACKBONES = {"alex": "alexnet", "vgg": "vgg16", "squeeze": "squeezenet1_1"}
CLIP_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")


class MissingWeights(Exception):
    """Pretrained weights that are not on this machine; the message says where to put them."""


def unavailable(reason: str) -> dict[str, Any]:
    return {"available": False, "reason": reason}


def hub_checkpoint(name: str) -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` caches (and first looks for) ``name``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Model tensors in [-1, 1] -> uint8 in [0, 255]."""
    return ((images.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def find_inception_weights(path: str | Path | None = None) -> Path:
    """The FID Inception weights: ``path`` if given, else torch hub's cache."""
    candidate = Path(path) if path is not None else hub_checkpoint(INCEPTION_WEIGHTS)
    if not candidate.is_file():
        how = "" if path is not None else " (pass its path, or put it there)"
        raise MissingWeights(f"FID Inception-V3 weights not found at {candidate}{how}")
    return candidate


def inception_extractor(
    weights: Path, device: str | torch.device = "cpu"
) -> Callable[[torch.Tensor], torch.Tensor]:
    """2048-d pool features of images in [-1, 1], via torchmetrics' ``NoTrainInceptionV3``."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    try:
        network = NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=["2048"],
            feature_extractor_weights_path=str(weights),
        ).to(device)
    except Exception as exc:  # torch.load raises anything on a damaged file (ValueError, ...)
        raise SiamdiffError(f"cannot load FID Inception weights ({exc})", weights) from exc
    return lambda images: network(to_uint8(images))


def inception_fid_kid(
    real: Dataset,
    synthetic: Dataset,
    extractor: Callable[[torch.Tensor], torch.Tensor],
    *,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 0,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict[str, dict[str, Any]]:
    """``{"inception_fid": ..., "inception_kid": ...}`` between two datasets of frames
    (fed at 299 px, the network's input size, so that no second resize happens)."""
    a, b = (
        extract_features(extractor, data, batch_size, device, progress=progress, desc=desc)
        for data, desc in ((real, "inception real"), (synthetic, "inception synthetic"))
    )
    mean, std = kernel_inception_distance(a, b, kid_subsets, kid_subset_size, seed)
    fid: dict[str, Any] = {
        "available": True,
        "value": frechet_distance(a, b),
        "images": len(b),
        "real_images": len(a),
    }
    if min(len(a), len(b)) < a.shape[1]:
        fid["note"] = (
            f"{len(a)} real and {len(b)} synthetic images for {a.shape[1]}-d features: a "
            "covariance is rank-deficient and FID biased upwards; compare only at equal "
            "counts, or read KID"
        )
    return {
        "inception_fid": fid,
        "inception_kid": {
            "available": True,
            "mean": mean,
            "std": std,
            "subsets": kid_subsets,
            "subset_size": min(kid_subset_size, len(a), len(b)),
        },
    }


def lpips_backbone_file(net: str) -> Path:
    """The torchvision cache file the LPIPS backbone ``net`` loads its ImageNet weights from."""
    if net not in LPIPS_BACKBONES:
        raise SiamdiffError(f"LPIPS network must be one of {sorted(LPIPS_BACKBONES)}, got {net!r}")
    weights = torchvision.models.get_model_weights(LPIPS_BACKBONES[net]).DEFAULT
    return hub_checkpoint(Path(weights.url).name)


def load_lpips(net: str = "alex", device: str | torch.device = "cpu") -> torch.nn.Module:
    """torchmetrics' LPIPS (``reduction="none"``: one score per pair) for images in [-1, 1]."""
    backbone = lpips_backbone_file(net)
    if not backbone.is_file():
        raise MissingWeights(f"LPIPS {net} backbone weights not found at {backbone}")
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    try:
        lpips = LearnedPerceptualImagePatchSimilarity(net_type=net, reduction="none")
    # torch.load of a damaged file raises nearly anything (as Inception's and CLIP's do).
    except Exception as exc:
        raise SiamdiffError(
            f"cannot load LPIPS {net} weights ({first_line(exc)})", backbone
        ) from exc
    return lpips.to(device)


def clip_embedder(
    model_dir: str | Path | None, device: str | torch.device = "cpu"
) -> tuple[Callable[[torch.Tensor], torch.Tensor], int, str]:
    """Image embeddings of a local Hugging Face CLIP model (images in [-1, 1]); also its
    input size and name."""
    if model_dir is None:
        raise MissingWeights("no CLIP model directory given")
    directory = Path(model_dir)
    has_weights = any((directory / name).is_file() for name in CLIP_WEIGHT_FILES)
    for name, present in (
        ("config.json", (directory / "config.json").is_file()),
        ("preprocessor_config.json", (directory / "preprocessor_config.json").is_file()),
        ("weights", has_weights),
    ):
        if not present:
            raise MissingWeights(f"{directory} is not a local CLIP model (no {name})")
    from transformers import CLIPImageProcessor, CLIPModel

    try:
        processor = CLIPImageProcessor.from_pretrained(directory, local_files_only=True)
        model = CLIPModel.from_pretrained(directory, local_files_only=True).to(device).eval()
    except Exception as exc:  # a damaged file raises anything (SafetensorError, ...)
        raise SiamdiffError(f"cannot load the CLIP model ({exc})", directory) from exc

    def embed(images: torch.Tensor) -> torch.Tensor:
        pixels = processor(images=list(to_uint8(images).cpu()), return_tensors="pt")
        pooled = model.vision_model(pixel_values=pixels["pixel_values"].to(device)).pooler_output
        return model.visual_projection(pooled)

    size = int(processor.crop_size["height"])
    return embed, size, str(getattr(model.config, "name_or_path", "") or directory)


def clip_metrics(
    real: Dataset,
    reference: Sequence[int],
    synthetic: Dataset,
    sources: list[int | None],
    embed: Callable[[torch.Tensor], torch.Tensor],
    *,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict[str, dict[str, Any]]:
    """``{"clip_i": ..., "cmmd": ...}``. ``reference`` indexes the images of ``real`` the
    distribution is compared with (the training split); ``sources[i]`` is the index in
    ``real`` of the image whose mask conditioned synthetic image ``i`` (None when not there).

    CLIP-I: mean cosine similarity between each synthetic image and its source image, of
    any split. CMMD: between the reference and all synthetic embeddings (:func:`features.cmmd`).
    """
    a, b = (
        extract_features(embed, data, batch_size, device, progress=progress, desc=desc)
        for data, desc in ((real, "clip real"), (synthetic, "clip synthetic"))
    )
    pairs = [(i, j) for i, j in enumerate(sources) if j is not None]
    if pairs:
        syn, src = (np.array(index) for index in zip(*pairs, strict=True))
        unit_b = b[syn] / np.linalg.norm(b[syn], axis=1, keepdims=True)
        unit_a = a[src] / np.linalg.norm(a[src], axis=1, keepdims=True)
        similarity = float((unit_a * unit_b).sum(axis=1).mean())
        clip_i = {"available": True, "value": similarity, "pairs": len(pairs)}
    else:
        clip_i = unavailable("no synthetic image's source image is in the real set")
    return {"clip_i": clip_i, "cmmd": {"available": True, "value": cmmd(a[list(reference)], b)}}


@dataclass(frozen=True)
class StandardModels:
    """The standard metrics' feature networks, loaded, or why each one is unavailable."""

    inception: tuple[Callable[[torch.Tensor], torch.Tensor], Path] | str
    clip: tuple[Callable[[torch.Tensor], torch.Tensor], int, str] | str


def load_standard_models(
    inception_weights: str | Path | None = None,
    clip_model: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> StandardModels:
    """Inception and CLIP, each from its local weights; damaged weights, or weights the user
    named that are not there (a typo), are a one-line error, found before the evaluation's
    other metrics; weights looked for in the cache and absent make the metric unavailable."""
    inception: tuple[Callable[[torch.Tensor], torch.Tensor], Path] | str
    try:
        weights = find_inception_weights(inception_weights)
        inception = (inception_extractor(weights, device), weights)
    except MissingWeights as exc:
        if inception_weights is not None:
            raise SiamdiffError(str(exc)) from exc
        inception = str(exc)
    clip: tuple[Callable[[torch.Tensor], torch.Tensor], int, str] | str
    try:
        clip = clip_embedder(clip_model, device)
    except MissingWeights as exc:
        if clip_model is not None:
            raise SiamdiffError(str(exc)) from exc
        clip = str(exc)
    return StandardModels(inception, clip)


def standard_metrics(
    real_root: str | Path,
    syn_root: str | Path,
    *,
    models: StandardModels | None = None,
    inception_weights: str | Path | None = None,
    clip_model: str | Path | None = None,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 0,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    progress: bool = False,
    view: GeneratorView = DEFAULT_VIEW,
) -> dict[str, dict[str, Any]]:
    """Inception FID / KID, CLIP-I and CMMD between the real training split and the whole
    synthetic set; each one ``unavailable`` when its weights are not on disk. ``models``
    (:func:`load_standard_models`) replaces ``inception_weights`` and ``clip_model``;
    ``view`` is the generator's (see ``generator_views``)."""
    models = models or load_standard_models(inception_weights, clip_model, device)
    common = {"batch_size": batch_size, "device": device, "progress": progress}
    results: dict[str, dict[str, Any]] = {}
    if isinstance(models.inception, str):
        why = unavailable(models.inception)
        results |= {"inception_fid": why, "inception_kid": why}
    else:
        extractor, weights = models.inception
        real, synthetic = (
            generator_views(real_root, "train", INCEPTION_SIZE, view=view),
            frames(syn_root, None, INCEPTION_SIZE),
        )
        kid = {"kid_subsets": kid_subsets, "kid_subset_size": kid_subset_size, "seed": seed}
        for name, value in inception_fid_kid(real, synthetic, extractor, **kid, **common).items():
            results[name] = {**value, "weights": str(weights)}
    if isinstance(models.clip, str):
        results |= {"clip_i": unavailable(models.clip), "cmmd": unavailable(models.clip)}
    else:
        embed, size, model_name = models.clip
        # Every split: a sample conditioned on a val or test mask has its source image there.
        real = generator_views(real_root, None, size, view=view)
        training = [i for i, record in enumerate(real.records) if record.split == "train"]
        synthetic = frames(syn_root, None, size)
        index = {record.id: i for i, record in enumerate(real.records)}
        sources = [index.get(record.extra.get("source_id")) for record in synthetic.records]
        clip = clip_metrics(real, training, synthetic, sources, embed, **common)
        for name, value in clip.items():
            results[name] = {**value, "model": model_name} if value["available"] else value
    return results

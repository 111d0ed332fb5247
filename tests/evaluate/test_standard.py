"""Standard metrics: found only on disk, never downloaded; computed with random weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

from siamdiff.data.phantom import make_phantom_dataset
from siamdiff.data.prepare import prepare
from siamdiff.errors import SiamdiffError
from siamdiff.evaluate import metrics as metrics_module
from siamdiff.evaluate.metrics import diversity, same_mask_groups
from siamdiff.evaluate.segmenter import frames
from siamdiff.evaluate.standard import (
    INCEPTION_WEIGHTS,
    MissingWeights,
    clip_embedder,
    find_inception_weights,
    hub_checkpoint,
    inception_fid_kid,
    load_lpips,
    load_standard_models,
    lpips_backbone_file,
    standard_metrics,
)

from .conftest import SIZE, make_synthetic


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch hub cache, and a download function that fails the test if called."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_download(url: str, *args: object, **kwargs: object) -> None:
        raise AssertionError(f"tried to download {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    checkpoints = hub_checkpoint("x").parent
    assert checkpoints.is_relative_to(tmp_path)
    return checkpoints


@pytest.fixture(scope="session")
def inception_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random-weight FID Inception, saved as torch-fidelity saves the real one."""
    from torch_fidelity import feature_extractor_inceptionv3 as fidelity

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fidelity, "load_state_dict_from_url", lambda *a, **k: {})
        patch.setattr(fidelity.FeatureExtractorInceptionV3, "load_state_dict", lambda *a: None)
        torch.manual_seed(0)
        network = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for module in network.modules():
        if isinstance(module, torch.nn.Conv2d):  # default init makes the features vanish
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / INCEPTION_WEIGHTS
    torch.save(network.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random CLIP in Hugging Face layout."""
    text = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
    text |= {"num_attention_heads": 2, "vocab_size": 64, "max_position_embeddings": 16}
    text |= {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
    vision |= {"num_attention_heads": 2, "image_size": 32, "patch_size": 8}
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8))
    path = tmp_path_factory.mktemp("clip") / "tiny-clip"
    model.save_pretrained(path)
    processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def noisy_copies(real_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic(real_root, tmp_path_factory.mktemp("noisy") / "syn", 1, noise=40.0)


def test_inception_file_name_is_torch_fidelitys() -> None:
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    assert URL_INCEPTION_V3.endswith("/" + INCEPTION_WEIGHTS)


def test_absent_weights_are_reported_never_downloaded(
    offline_hub: Path, real_root: Path, copies: Path
) -> None:
    results = standard_metrics(real_root, copies)
    assert set(results) == {"inception_fid", "inception_kid", "clip_i", "cmmd"}
    assert all(entry["available"] is False for entry in results.values())
    assert str(offline_hub / INCEPTION_WEIGHTS) in results["inception_fid"]["reason"]
    assert results["cmmd"]["reason"] == "no CLIP model directory given"
    with pytest.raises(MissingWeights, match=r"alexnet-owt-7be5be79\.pth"):
        load_lpips("alex")
    # Named by the user: a typo is an error before any metric, not an "n/a" hours later.
    with pytest.raises(SiamdiffError, match=r"weights not found at .*absent\.pth"):
        load_standard_models(inception_weights=offline_hub / "absent.pth")
    with pytest.raises(SiamdiffError, match="nope is not a local CLIP model"):
        load_standard_models(clip_model=offline_hub / "nope")


def test_the_fid_note_counts_the_real_images_too() -> None:
    """2100 samples against a real training split of 1195 (under 2048) gave a biased FID
    without the note: only the synthetic count was checked."""
    generator = torch.Generator().manual_seed(0)
    real, synthetic = (torch.randn(n, 1, 4, 4, generator=generator) for n in (10, 40))
    flat = lambda images: images.reshape(len(images), -1)  # noqa: E731 (16-d features)
    fid = inception_fid_kid(real, synthetic, flat, kid_subsets=2, kid_subset_size=5)
    fid = fid["inception_fid"]
    assert (fid["images"], fid["real_images"]) == (40, 10)
    assert fid["note"].startswith("10 real and 40 synthetic images for 16-d features")
    enough = inception_fid_kid(real.repeat(2, 1, 1, 1), synthetic, flat, kid_subsets=2)
    assert "note" not in enough["inception_fid"]


def test_inception_fid_kid_from_the_hub_cache_or_a_path(
    offline_hub: Path, inception_file: Path, tmp_path: Path
) -> None:
    # Inception at 299 px is slow on a CPU: 5 real and 5 synthetic frames only.
    real = prepare(
        [("folder", make_phantom_dataset(tmp_path / "raw", n=8, size=SIZE, groups=8))],
        tmp_path / "real",
        size=SIZE,
        workers=1,
        progress=False,
    ).out
    noisy = make_synthetic(real, tmp_path / "noisy", per_mask=1, noise=40.0)
    assert find_inception_weights(inception_file) == inception_file
    offline_hub.mkdir(parents=True)
    (offline_hub / INCEPTION_WEIGHTS).symlink_to(inception_file)
    results = standard_metrics(real, noisy, kid_subsets=5)
    fid, kid = results["inception_fid"], results["inception_kid"]
    assert fid["available"] is True and kid["available"] is True
    assert fid["weights"] == str(offline_hub / INCEPTION_WEIGHTS)
    assert fid["value"] > 1e-6
    assert fid["images"] == 5 and "rank-deficient" in fid["note"]  # 5 images, 2048-d
    assert kid["subset_size"] == 5 and np.isfinite(kid["mean"])
    assert kid["std"] is None  # 5 and 5 images: every subset is both whole sets


def test_clip_i_and_cmmd_with_a_local_clip(
    offline_hub: Path, clip_dir: Path, real_root: Path, copies: Path, noisy_copies: Path
) -> None:
    same = standard_metrics(real_root, copies, clip_model=clip_dir)
    assert same["clip_i"]["value"] == pytest.approx(1.0, abs=1e-5)  # each is its source
    assert same["clip_i"]["pairs"] == 18 and same["clip_i"]["model"]
    assert same["cmmd"]["value"] == pytest.approx(0.0, abs=1e-9)
    different = standard_metrics(real_root, noisy_copies, clip_model=clip_dir)
    assert different["clip_i"]["value"] < 1.0 - 1e-4
    assert different["cmmd"]["value"] > 1e-6
    assert different["inception_fid"]["available"] is False  # independent of CLIP


def test_clip_i_pairs_samples_of_val_or_test_masks_with_their_sources(
    offline_hub: Path, clip_dir: Path, real_root: Path, tmp_path: Path
) -> None:
    """`siamdiff sample --masks DATA` samples every split: the source of a test mask's sample
    is a test image, which CLIP-I looked for among the training images only."""
    test_copies = make_synthetic(real_root, tmp_path / "syn", per_mask=1, split="test")
    clip_i = standard_metrics(real_root, test_copies, clip_model=clip_dir)["clip_i"]
    assert clip_i["pairs"] == 3 and clip_i["value"] == pytest.approx(1.0, abs=1e-5)


def test_an_incomplete_clip_directory_is_named(tmp_path: Path, clip_dir: Path) -> None:
    partial = tmp_path / "clip"
    partial.mkdir()
    (partial / "config.json").write_bytes((clip_dir / "config.json").read_bytes())
    with pytest.raises(MissingWeights, match=r"no preprocessor_config\.json"):
        clip_embedder(partial)


def test_damaged_inception_or_clip_weights_are_one_line(tmp_path: Path, clip_dir: Path) -> None:
    garbage = tmp_path / "inception.pth"
    garbage.write_text("garbage")  # torch.load raised ValueError, which went uncaught
    with pytest.raises(SiamdiffError, match="cannot load FID Inception weights"):
        load_standard_models(inception_weights=garbage)
    damaged = tmp_path / "clip"
    damaged.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        (damaged / name).write_bytes((clip_dir / name).read_bytes())
    (damaged / "model.safetensors").write_bytes(b"x")  # SafetensorError, uncaught
    with pytest.raises(SiamdiffError, match="cannot load the CLIP model"):
        load_standard_models(clip_model=damaged)


def test_damaged_lpips_weights_are_one_line(offline_hub: Path) -> None:
    offline_hub.mkdir(parents=True)
    lpips_backbone_file("squeeze").write_text("garbage")
    with pytest.raises(SiamdiffError, match="cannot load LPIPS squeeze weights"):
        load_lpips("squeeze")


def test_lpips_diversity_with_a_cached_backbone(
    offline_hub: Path, real_root: Path, synthetic_root: Path, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    offline_hub.mkdir(parents=True)
    torch.save(torchvision.models.squeezenet1_1().state_dict(), lpips_backbone_file("squeeze"))
    lpips = load_lpips("squeeze")
    twins = make_synthetic(real_root, tmp_path / "twins", per_mask=2)
    results = {}
    for name, root in (("twins", twins), ("noisy", synthetic_root)):
        data = frames(root, None, SIZE)
        results[name] = diversity(data, same_mask_groups(data.records), lpips)
    assert results["twins"]["lpips"]["mean"] == pytest.approx(0.0, abs=1e-6)
    assert results["twins"]["ms_ssim"]["mean"] == pytest.approx(1.0, abs=1e-5)
    assert results["noisy"]["lpips"]["mean"] > 1e-4
    assert results["noisy"]["ms_ssim"]["mean"] < 0.999
    assert results["noisy"]["lpips"]["pairs"] == 18


def test_diversity_in_chunks_of_pairs_scores_every_pair_alike(
    real_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pairs go through MS-SSIM in chunks (--per-mask 50 is 1225 pairs of one mask): a
    mask's pairs split over chunks give what one batch gives."""
    noisy = make_synthetic(real_root, tmp_path / "syn", per_mask=3, noise=30.0)
    data = frames(noisy, None, SIZE)
    whole = diversity(data, same_mask_groups(data.records), "no LPIPS")
    monkeypatch.setattr(metrics_module, "DIVERSITY_PAIRS_PER_BATCH", 2)
    chunked = diversity(data, same_mask_groups(data.records), "no LPIPS")
    assert chunked["ms_ssim"]["pairs"] == whole["ms_ssim"]["pairs"] == 18 * 3
    assert chunked["ms_ssim"]["mean"] == pytest.approx(whole["ms_ssim"]["mean"], rel=1e-6)

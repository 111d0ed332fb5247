"""Seeded model building and augmentation leave every generator but the CPU's alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from siamdiff.data.dataset import PairedDataset, SeededAugmentation
from siamdiff.evaluate.segmenter import SegmenterSpec, fit_segmenter
from siamdiff.models.autoencoder import random_kl_vae
from siamdiff.models.backbone import build_backbone
from siamdiff.train_vae import VAESettings, build_vae


def test_seeded_building_leaves_the_gpu_generators_and_the_cpu_state_alone(
    phantom_data: Path, monkeypatch: pytest.MonkeyPatch
):
    """torch.manual_seed also seeds every CUDA generator, for good: each rank's training
    noise was drawn from backbone.seed (every rank alike) instead of its own seed."""
    reseeded: list[int] = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", reseeded.append)
    data = PairedDataset(phantom_data)
    before = torch.get_rng_state()
    build_backbone({"kind": "tiny", "prompt": "p", "seed": 3}, latent_channels=4)
    random_kl_vae(seed=3)
    build_vae(VAESettings(widths=(8, 8), seed=3))
    SeededAugmentation(data, seed=3)[0]
    assert reseeded == []
    assert torch.equal(torch.get_rng_state(), before)


def test_segmenter_training_seeds_every_generator_and_restores_the_cpus(phantom_data: Path):
    """Its dropout on a GPU follows the seed too (FPN has Dropout2d); GPU generators are
    forked as well, which a CPU-only machine cannot show."""
    data = PairedDataset(phantom_data)
    before = torch.get_rng_state()
    spec = SegmenterSpec("fpn", "resnet18", 32)
    fit = {"epochs": 1, "batch_size": 8, "lr": 1e-3, "progress": False}
    first, _ = fit_segmenter(data, spec, seed=3, **fit)
    again, _ = fit_segmenter(data, spec, seed=3, **fit)
    weights = (first.model.state_dict(), again.model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert torch.equal(torch.get_rng_state(), before)

"""Segmentation utility (the paper's protocol): does adding synthetic pairs help a segmenter?

For each architecture and seed, one segmenter is trained on the real training split and
one on the real training split plus the whole synthetic set, with identical settings
(same epochs, so the second sees more images); both are tested on the real test split.
Reported: mDice / mIoU (mean of per-image scores) per seed, their mean and sample std
over seeds, and the mean gain of real + synthetic over real only.

Same epochs means the real + synthetic segmenter also takes more optimiser steps (twice as
many with one synthetic pair per real one). ``matched_steps`` adds a control that tells the
two apart: real only, trained for as many steps as real + synthetic (more epochs, rounded
up: at least as many), and the gain over it.

Each finished training is journaled (``journal``): a measurement interrupted after hours
resumes at the first training it had not finished, and gives the numbers an uninterrupted one
gives (each training is seeded on its own). The journal is kept only for identical settings,
data, device and siamdiff version; seeds or architectures added later reuse the ones done.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from siamdiff import __version__
from siamdiff.atomic import JsonLinesJournal, atomic_write_bytes, json_line
from siamdiff.data.manifest import load_manifest
from siamdiff.errors import SiamdiffError
from siamdiff.evaluate.segmenter import (
    SegmenterSpec,
    check_training_settings,
    fit_segmenter,
    frames,
    score_segmenter,
    steps_per_epoch,
    training_set,
    training_split,
)
from siamdiff.runtime import device_label


def mean_std(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample std (ddof=1; None for a single value, whose 0 would claim an exact
    value) and the values themselves."""
    array = np.asarray(values, dtype=np.float64)
    std = float(array.std(ddof=1)) if len(array) > 1 else None
    return {"mean": float(array.mean()), "std": std, "per_seed": [float(v) for v in array]}


def format_mean_std(stats: Mapping[str, Any]) -> str:
    """``mean ± std``, or the mean of one seed said as such."""
    if stats["std"] is None:
        return f"{stats['mean']:.3f} (1 seed, no spread)"
    return f"{stats['mean']:.3f} ± {stats['std']:.3f}"


MATCHED = "real (matched steps)"
DEFAULT_ARCHS = ("unet", "fpn")
DEFAULT_SEEDS = (0, 1, 2)


def check_utility(
    real_root: str | Path,
    syn_root: str | Path | None,
    archs: Sequence[str] = DEFAULT_ARCHS,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    *,
    encoder: str = "resnet18",
    epochs: int = 20,
    size: int = 256,
    batch_size: int = 8,
    lr: float = 1e-3,
) -> None:
    """Refuse, in one line and before any training, what :func:`segmentation_utility` cannot
    measure honestly or cannot build."""
    if not archs or not seeds:
        raise SiamdiffError("segmentation utility needs at least one architecture and one seed")
    if min(seeds) < 0:
        raise SiamdiffError(f"segmentation utility seeds must be >= 0, got {min(seeds)}")
    check_training_settings(epochs, batch_size, lr)
    for arch in archs:
        SegmenterSpec(arch, encoder, size).check_trains(batch_size)
    if not load_manifest(real_root).split("test"):
        raise SiamdiffError("has no test split to measure segmentation utility on", real_root)
    if syn_root is not None:
        training_split(load_manifest(syn_root), syn_root, real_root)


def _data_digest(real_root: str | Path, syn_root: str | Path | None) -> str:
    """SHA-256 naming every pair of both datasets (split, image and mask), for the journal."""
    pairs = [
        (root_name, r.id, r.split, r.image_sha256, r.mask_sha256)
        for root_name, root in (("real", real_root), ("syn", syn_root))
        if root is not None
        for r in load_manifest(root).records
    ]
    return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()


def _journaled(path: Path, header: dict[str, Any]) -> dict[tuple[str, str, int], dict[str, Any]]:
    """The trainings ``path`` journaled under ``header``; a journal of other settings (or none)
    is started afresh with it."""
    lines = path.read_bytes().splitlines() if path.is_file() else []
    entries = []
    for line in lines:
        with contextlib.suppress(ValueError):  # a line torn by a crash
            entries.append(json.loads(line))
    if not entries or entries[0] != header:
        atomic_write_bytes(path, json_line(header))
        return {}
    return {(e["arch"], e["set"], e["seed"]): e for e in entries[1:] if "arch" in e}


def segmentation_utility(
    real_root: str | Path,
    syn_root: str | Path | None,
    *,
    archs: Sequence[str] = DEFAULT_ARCHS,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    encoder: str = "resnet18",
    epochs: int = 20,
    size: int = 256,
    batch_size: int = 8,
    lr: float = 1e-3,
    matched_steps: bool = False,
    device: str | torch.device = "cpu",
    workers: int = 0,
    progress: bool = True,
    journal: str | Path | None = None,
) -> dict[str, Any]:
    """Train ``len(archs) x len(seeds)`` segmenters per training set and score them on the
    real test split. ``syn_root=None`` trains on real data only (a baseline);
    ``matched_steps`` adds real only at real + synthetic's step count; ``journal``: the file
    that keeps finished trainings for a rerun (module docstring)."""
    check_utility(
        real_root,
        syn_root,
        archs,
        seeds,
        encoder=encoder,
        epochs=epochs,
        size=size,
        batch_size=batch_size,
        lr=lr,
    )
    test = frames(real_root, "test", size)
    real, _ = training_set(real_root, (), size)
    sets = {"real": (real, epochs)}
    if syn_root is not None:
        sets["real+syn"] = (training_set(real_root, (syn_root,), size)[0], epochs)
        if matched_steps:
            with_syn = steps_per_epoch(len(sets["real+syn"][0]), batch_size) * epochs
            sets[MATCHED] = (real, math.ceil(with_syn / steps_per_epoch(len(real), batch_size)))
    protocol = {
        "encoder": encoder,
        "encoder_weights": None,
        "epochs": epochs,
        "size": size,
        "batch_size": batch_size,
        "lr": lr,
        "seeds": list(seeds),
        "test_images": len(test),
        "device": device_label(device),
    }
    header = {
        "utility_journal": 1,
        "created_by": f"siamdiff {__version__}",
        "data": _data_digest(real_root, syn_root),
        **{k: v for k, v in protocol.items() if k not in ("seeds", "test_images")},
    }
    done = _journaled(Path(journal), header) if journal is not None else {}
    if done and progress:
        print(f"utility: {len(done)} trainings already done, in {journal}", file=sys.stderr)

    shared = {"batch_size": batch_size, "lr": lr, "device": device, "workers": workers}

    def fit_and_score(arch: str, name: str, seed: int) -> dict[str, Any]:
        dataset, setting_epochs = sets[name]
        spec = SegmenterSpec(arch, encoder, size)
        desc = f"utility {arch} {name} seed {seed}"
        segmenter, record = fit_segmenter(
            dataset, spec, epochs=setting_epochs, seed=seed, progress=progress, desc=desc, **shared
        )
        summary = score_segmenter(segmenter, test, batch_size).summary()
        score = {"arch": arch, "set": name, "seed": seed, "steps": record["steps"]}
        return score | {"mdice": summary["mdice"], "miou": summary["miou"]}

    results: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        log = (
            stack.enter_context(contextlib.closing(JsonLinesJournal(Path(journal))))
            if journal is not None
            else None
        )
        for arch in archs:
            per_setting: dict[str, Any] = {}
            for name, (dataset, setting_epochs) in sets.items():
                scores = []
                for seed in seeds:
                    score = done.get((arch, name, seed))
                    if score is None:
                        score = fit_and_score(arch, name, seed)
                        if log is not None:
                            log.append(score)
                    scores.append(score)
                per_setting[name] = {
                    "train_images": len(dataset),
                    "epochs": setting_epochs,
                    "steps": scores[-1]["steps"],
                    "mdice": mean_std([score["mdice"] for score in scores]),
                    "miou": mean_std([score["miou"] for score in scores]),
                }
            results[arch] = per_setting | _gains(per_setting)
    return {"available": True, "protocol": protocol, "archs": results}


def _gains(per_setting: Mapping[str, Any]) -> dict[str, float]:
    """Real + synthetic's mean gains over real only (and over the matched-steps control)."""
    gains = {}
    for metric in ("mdice", "miou") if "real+syn" in per_setting else ():
        with_syn = per_setting["real+syn"][metric]["mean"]
        gains[f"gain_{metric}"] = with_syn - per_setting["real"][metric]["mean"]
        if MATCHED in per_setting:
            gains[f"gain_matched_steps_{metric}"] = with_syn - per_setting[MATCHED][metric]["mean"]
    return gains

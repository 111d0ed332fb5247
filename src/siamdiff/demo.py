"""``siamdiff demo``: the whole pipeline on procedural phantom data, on a laptop CPU.

phantom images -> prepare -> verify -> stats -> train (tiny backbone) -> sample grid.
Nothing is downloaded; every stage writes what a real run writes.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from siamdiff.config import load_config
from siamdiff.data.manifest import format_verify, verify
from siamdiff.data.phantom import make_phantom_dataset
from siamdiff.data.prepare import prepare
from siamdiff.data.stats import format_stats, write_stats
from siamdiff.errors import SiamdiffError
from siamdiff.train import train

PHANTOM_IMAGES = 48
PHANTOM_SIZE = 128
TRAIN_SIZE = 64


def run_demo(out: Path, train_steps: int = 400, overwrite: bool = False) -> Path:
    """Run every stage into `out`; returns the training run directory."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise SiamdiffError("already exists (pass --overwrite to replace it)", out)
        shutil.rmtree(out)
    started = time.perf_counter()
    # The demo's tensors are tiny: a second intra-op thread saves little and, when anything else
    # shares the CPU, its spin-waiting makes steps up to 10x slower.
    torch.set_num_threads(1)

    def stage(name: str) -> None:
        print(f"\n== {name} ({time.perf_counter() - started:.0f} s)", flush=True)

    stage("1/5 phantom data")
    raw = make_phantom_dataset(out / "raw", n=PHANTOM_IMAGES, size=PHANTOM_SIZE, seed=0)
    print(f"{PHANTOM_IMAGES} image-mask pairs in {raw}")

    stage("2/5 prepare")
    data = out / "data"
    print(prepare([("folder", raw)], data, size=TRAIN_SIZE).format())

    stage("3/5 verify")
    report = verify(data)
    print(format_verify(report))
    if not report.ok:
        raise SiamdiffError("freshly prepared data does not verify", data)

    stage("4/5 stats")
    print(format_stats(write_stats(data)))

    stage(f"5/5 train (tiny backbone, {train_steps} steps)")
    run_dir = out / "run"
    cfg = load_config(
        "tiny",
        [
            f"data.root={data}",
            f"run_dir={run_dir}",
            f"train.max_steps={train_steps}",
            f"data.transforms.size={TRAIN_SIZE}",
            f"train.checkpoint_every={train_steps}",
            f"train.sample_every={train_steps}",
        ],
    )
    train(cfg)
    stage("done")
    print(f"data: {data}\nrun: {run_dir} (loss_curve.png, samples/, checkpoints/, tb/)")
    return run_dir

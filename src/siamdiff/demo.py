"""``siamdiff demo``: the whole pipeline on procedural phantom data, on a laptop CPU.

phantom images -> prepare -> verify -> stats -> train (tiny backbone) -> export -> sample
-> segmenter on the real split -> evaluate -> metrics.html.
Nothing is downloaded; every stage writes what a real run writes.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from siamdiff.atomic import check_replaceable, clear_removed, remove_tree
from siamdiff.config import load_config
from siamdiff.data.manifest import format_verify, verify
from siamdiff.data.phantom import make_phantom_dataset
from siamdiff.data.prepare import prepare
from siamdiff.data.stats import format_stats, write_stats
from siamdiff.errors import SiamdiffError
from siamdiff.evaluate.metrics import evaluate, format_metrics, write_evaluation_report
from siamdiff.evaluate.segmenter import train_segmenter
from siamdiff.export import export_run
from siamdiff.synthesize import synthesize
from siamdiff.train import train

PHANTOM_IMAGES = 48
PHANTOM_SIZE = 128
TRAIN_SIZE = 64
SAMPLE_STEPS = 20
SEGMENTER_EPOCHS = 3
MARKER = ".siamdiff-demo"  # what --overwrite may delete: a folder a demo wrote, nothing else


def run_demo(out: Path, train_steps: int = 400, overwrite: bool = False) -> Path:
    """Run every stage into `out`; returns the training run directory."""
    out = Path(out)
    if train_steps < 1:
        raise SiamdiffError(f"--train-steps must be at least 1, got {train_steps}")
    if out.is_symlink():
        raise SiamdiffError("is a symbolic link: name the folder itself for the demo", out)
    clear_removed(out)  # an interrupted --overwrite's
    if out.exists() and not out.is_dir():
        raise SiamdiffError("is a file, not a folder for the demo", out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise SiamdiffError("already exists (pass --overwrite to replace it)", out)
        if not (out / MARKER).is_file():
            raise SiamdiffError(
                "holds files the demo did not write; --overwrite replaces only a demo folder",
                out,
            )
        check_replaceable(out)
        remove_tree(out)  # in place, interrupted after the marker went, --overwrite would refuse
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by siamdiff demo; --overwrite may replace this folder\n")
    # The demo's tensors are tiny: a second intra-op thread saves little and, when anything else
    # shares the CPU, its spin-waiting makes steps up to 10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_stages(out, train_steps)
    finally:
        torch.set_num_threads(threads)


def _run_stages(out: Path, train_steps: int) -> Path:
    started = time.perf_counter()

    def stage(name: str) -> None:
        print(f"\n== {name} ({time.perf_counter() - started:.0f} s)", flush=True)

    stage("1/8 phantom data")
    raw = make_phantom_dataset(out / "raw", n=PHANTOM_IMAGES, size=PHANTOM_SIZE, seed=0)
    print(f"{PHANTOM_IMAGES} image-mask pairs in {raw}")

    stage("2/8 prepare")
    data = out / "data"
    print(prepare([("folder", raw)], data, size=TRAIN_SIZE).format())

    stage("3/8 verify")
    report = verify(data)
    print(format_verify(report))
    if not report.ok:
        raise SiamdiffError("freshly prepared data does not verify", data)

    stage("4/8 stats")
    print(format_stats(write_stats(data)))

    stage(f"5/8 train (tiny backbone, {train_steps} steps)")
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

    stage("6/8 export + sample (Mask-Diffusion, DDIM, one pair per training mask)")
    model = export_run(run_dir, out / "model")
    synthetic = out / "synthetic"
    print(synthesize(model, data, synthetic, steps=SAMPLE_STEPS, batch_size=8).format())

    stage("7/8 segmenter trained on the real training split (the evaluation's yardstick)")
    segmenter = train_segmenter(
        data, out / "segmenter", size=TRAIN_SIZE, epochs=SEGMENTER_EPOCHS, batch_size=8
    )

    stage("8/8 evaluate")
    metrics_json = out / "evaluation" / "metrics.json"
    metrics = evaluate(data, synthetic, metrics_json, segmenter_dir=segmenter)
    print(format_metrics(metrics))
    report = write_evaluation_report(metrics, metrics_json, run_dir=run_dir)
    stage("done")
    print(
        f"data: {data}\nrun: {run_dir} (loss_curve.png, samples/, checkpoints/, tb/)\n"
        f"synthetic pairs: {synthetic} (samples.png)\nreport: {report}"
    )
    return run_dir

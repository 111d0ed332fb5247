"""``siamdiff`` command line: parse, load config, call one function per verb.

Every handler imports its module lazily so ``siamdiff --help`` stays instant, and every
user-facing failure surfaces as one line: ``siamdiff: error: <file>: <problem>``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

from siamdiff import __version__
from siamdiff.errors import SiamdiffError, compile_failure, first_line

SOURCE_KINDS = ("kvasir-seg", "cvc-clinicdb", "pranet", "folder", "nnunet")
LOG_PROGRESS_SECONDS = 30  # a progress line this often when stderr is a log file


def _source(text: str) -> tuple[str, Path]:
    kind, sep, directory = text.partition("=")
    if not sep or kind not in SOURCE_KINDS or not directory:
        raise argparse.ArgumentTypeError(
            f"expected KIND=DIR with KIND one of {', '.join(SOURCE_KINDS)}, got {text!r}"
        )
    return kind, Path(directory)


def cmd_prepare(args: argparse.Namespace) -> int:
    from siamdiff.data.prepare import prepare

    summary = prepare(
        args.source,
        args.out,
        size=args.size,
        mask_threshold=args.mask_threshold,
        image_bits=args.image_bits,
        overwrite=args.overwrite,
        strict=args.strict,
        drop_empty=args.drop_empty,
        workers=args.workers,
    )
    print(summary.format())
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from siamdiff.data.manifest import format_verify, verify

    report = verify(args.data)
    print(format_verify(report))
    return 0 if report.ok else 1


def cmd_stats(args: argparse.Namespace) -> int:
    from siamdiff.data.stats import STATS_JSON, STATS_PNG, format_stats, write_stats

    print(format_stats(write_stats(args.data, args.png)))
    png = args.png if args.png is not None else args.data / STATS_PNG
    print(f"written: {args.data / STATS_JSON}, {png}")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from siamdiff.data.download import CVC_CLINICDB_HELP, KVASIR_URL, download_kvasir

    if args.dataset == "cvc-clinicdb":
        print(CVC_CLINICDB_HELP)
        return 0
    path = download_kvasir(
        args.dest, url=args.url or KVASIR_URL, expected_sha256=args.sha256, overwrite=args.overwrite
    )
    print(f"Kvasir-SEG is in {path}; next: siamdiff prepare --source kvasir-seg={path} --out DATA")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from siamdiff.atomic import exclusive_writer
    from siamdiff.config import load_config
    from siamdiff.train import train

    cfg = load_config(args.config, args.overrides)
    # A requeued job while the first still runs would interleave checkpoints and logs.
    rank = int(os.environ.get("RANK", "0"))
    with exclusive_writer(Path(cfg.run_dir).resolve(), rank, "siamdiff train"):
        run_dir = train(cfg, resume=args.resume)
    if rank == 0:  # a launch's every process would say it
        print(f"run written to {run_dir}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from siamdiff.export import export_run

    out = export_run(args.run, args.out, checkpoint=args.checkpoint, overwrite=args.overwrite)
    print(f"exported to {out}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from siamdiff.sample import SCHEDULERS
    from siamdiff.synthesize import SAMPLE_RANK_WAIT, split_masks_argument, synthesize

    if args.scheduler not in SCHEDULERS:
        raise SiamdiffError(f"unknown --scheduler {args.scheduler!r} ({', '.join(SCHEDULERS)})")
    masks_root, split = split_masks_argument(args.masks)
    device = chosen_device(args.device)
    # One process, or one of `accelerate launch`'s; on CPU accelerate sees the launch only
    # when told that CPU is the device.
    # A resumed job's ranks may hold very unequal work: the idle ones wait at the end for
    # hours, past NCCL's default 10 minutes.
    state = PartialState(cpu=device == "cpu", timeout=SAMPLE_RANK_WAIT)
    if device == "cuda" and state.num_processes > 1:
        device = f"cuda:{state.local_process_index}"  # one GPU per process, not all on GPU 0
    summary = synthesize(
        args.model,
        masks_root,
        args.out,
        split=split,
        per_mask=args.per_mask,
        steps=args.steps,
        guidance=args.guidance,
        control_scale=args.control_scale,
        eta=args.eta,
        seed=args.seed,
        scheduler=args.scheduler,
        mask_aug=[a for a in args.mask_aug.split(",") if a],
        batch_size=args.batch_size,
        device=device,
        formats=[f for f in args.format.split(",") if f],
        overwrite=args.overwrite,
        rank=state.process_index,
        world_size=state.num_processes,
        limit=args.limit,
        speed=args.speed,
        verify=not args.no_verify,
    )
    print(summary.format())
    return 0


def cmd_train_segmenter(args: argparse.Namespace) -> int:
    from siamdiff.evaluate.segmenter import train_segmenter

    out = train_segmenter(
        args.data,
        args.out,
        arch=args.arch,
        encoder=args.encoder,
        size=args.size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        extra_roots=tuple(args.extra),
        device=chosen_device(args.device),
        workers=args.workers,
        overwrite=args.overwrite,
        verify=not args.no_verify,
    )
    from siamdiff.evaluate.segmenter import CONFIG_NAME

    val = json.loads((out / CONFIG_NAME).read_text(encoding="utf-8")).get("val")
    score = (
        f"; validation mDice {val['mdice']:.3f}, mIoU {val['miou']:.3f} ({val['images']} images)"
        if val
        else " (the dataset has no val split to score it on)"
    )
    print(f"segmenter written to {out}{score}")
    return 0


def cmd_train_vae(args: argparse.Namespace) -> int:
    from siamdiff.train_vae import VAESettings, train_vae

    settings = VAESettings(
        size=args.size,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        widths=args.widths,
        layers_per_block=args.layers_per_block,
        latent_channels=args.latent_channels,
        kl_weight=args.kl_weight,
        ssim_weight=args.ssim_weight,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
    )
    out = train_vae(
        args.data,
        args.out,
        settings,
        device=chosen_device(args.device),
        workers=args.workers,
        resume=args.resume,
        overwrite=args.overwrite,
        verify=not args.no_verify,
    )
    print(
        f"autoencoder written to {out}; train on it with "
        f"autoencoder.kind=diffusers-kl autoencoder.path={out}"
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from siamdiff.atomic import check_writable_file
    from siamdiff.evaluate.metrics import (
        evaluate,
        format_metrics,
        report_paths,
        write_evaluation_report,
    )

    utility_options = {
        "epochs": args.utility_epochs,
        "size": args.utility_size,
        "seeds": tuple(
            range(args.utility_first_seed, args.utility_first_seed + args.utility_seeds)
        ),
        "archs": tuple(a for a in args.utility_archs.split(",") if a),
        "matched_steps": args.utility_matched_steps,
    }
    if args.run is not None and not (
        (args.run / "loss_curve.png").is_file() or (args.run / "samples").is_dir()
    ):  # found out before the evaluation's hours, not from a report without the run
        raise SiamdiffError("not a training run (no loss_curve.png, no samples/)", args.run)
    if args.report is not None and args.report.exists() and not args.report.is_dir():
        raise SiamdiffError("is a file: --report names a folder", args.report)
    inputs = {"the real dataset": args.real, "the synthetic set": args.syn}
    inputs |= {"the segmenter": args.segmenter, "the run": args.run}
    reports = report_paths(args.out, args.report)
    for path in (args.out, *reports):
        check_writable_file(path, inputs)
    if args.out.is_file() and not args.overwrite:  # an earlier evaluation may have taken hours
        raise SiamdiffError("exists: pass --overwrite to replace this evaluation", args.out)
    for path in reports if not args.overwrite else ():
        if path.exists():  # another evaluation's, named after an --out of the same name
            raise SiamdiffError(
                "exists: name --out or --report otherwise, or pass --overwrite to replace it",
                path,
            )
    metrics = evaluate(
        args.real,
        args.syn,
        args.out,
        segmenter_dir=args.segmenter,
        utility=args.utility,
        utility_options=utility_options,
        inception_weights=args.inception_weights,
        clip_model=args.clip_model,
        device=chosen_device(args.device),
        workers=args.workers,
        verify=not args.no_verify,
    )
    print(format_metrics(metrics))
    report = write_evaluation_report(metrics, args.out, args.report, run_dir=args.run)
    print(f"metrics: {args.out}\nreport: {report}")
    return 0


def cmd_rate(args: argparse.Namespace) -> int:
    from siamdiff import rate

    if args.export is not None:
        summary = rate.export_results(args.export)
        print(f"wrote mos.json, mos.csv, mos.png to {args.export} ({summary['answers']} answers)")
        return 0
    if args.study is None:
        raise SiamdiffError("rate needs SYN REAL --study DIR (or --study DIR to resume one)")
    from siamdiff.rate.server import check_can_listen

    check_can_listen(args.host, args.port)  # before minutes of building, not after
    study = rate.open_study(
        args.syn,
        args.real,
        args.study,
        per_source=args.per_source,
        repeats=args.repeats,
        seed=args.seed,
        overlay=args.overlay,
    )
    rate.serve(study.root, host=args.host, port=args.port)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from siamdiff.demo import run_demo

    run_demo(args.out, train_steps=args.train_steps, overwrite=args.overwrite)
    return 0


class OneLineParser(argparse.ArgumentParser):
    """A usage mistake is one line, like every other error, pointing at --help (argparse
    prints its usage block first). Options are never abbreviated: a typo such as `--resum`
    is an error, not silently an option it begins, whose meaning a new option would change."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{"allow_abbrev": False, **kwargs})

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="siamdiff",
        description="Siamese-Diffusion: synthetic image-mask pairs for segmentation.",
    )
    parser.add_argument("--version", action="version", version=f"siamdiff {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def no_verify(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--no-verify",
            action="store_true",
            help="skip re-hashing the datasets against their manifests before starting",
        )

    def verb(name: str, handler: Callable[[argparse.Namespace], int], text: str):
        sub = verbs.add_parser(name, help=text, description=text)
        sub.set_defaults(handler=handler)
        return sub

    demo = verb("demo", cmd_demo, "Run the whole pipeline on built-in phantom data (no downloads).")
    demo.add_argument("--out", type=Path, default=Path("siamdiff-demo"))
    demo.add_argument("--train-steps", type=at_least(1), default=400)
    demo.add_argument("--overwrite", action="store_true")

    prep = verb("prepare", cmd_prepare, "Read public layouts into one siamdiff dataset.")
    prep.add_argument("--source", type=_source, action="append", required=True, metavar="KIND=DIR")
    prep.add_argument("--out", type=Path, required=True)
    prep.add_argument("--size", type=int, default=384, help="shorter side in pixels")
    prep.add_argument(
        "--mask-threshold",
        type=int,
        default=128,
        help="grey masks: foreground = value >= this (label masks: nonzero)",
    )
    prep.add_argument(
        "--image-bits",
        type=int,
        default=16,
        help="bit depth of images stored in 16 bits: 12 for 12-bit data (default: all 16)",
    )
    prep.add_argument("--workers", type=at_least(0), default=2)
    prep.add_argument("--strict", action="store_true", help="any skipped file is an error")
    prep.add_argument("--drop-empty", action="store_true", help="leave out frames with empty masks")
    prep.add_argument("--overwrite", action="store_true")

    ver = verb("verify", cmd_verify, "Re-hash a dataset against its manifest.")
    ver.add_argument("data", type=Path)

    stats = verb("stats", cmd_stats, "Counts and mask-coverage distribution of a dataset.")
    stats.add_argument("data", type=Path)
    stats.add_argument(
        "--png", type=Path, default=None, help="histogram path (default DATA/stats.png)"
    )

    down = verb("download", cmd_download, "Download a public dataset (needs internet).")
    down.add_argument("dataset", choices=("kvasir-seg", "cvc-clinicdb"))
    down.add_argument("--dest", type=Path, default=Path("raw"))
    down.add_argument("--url", default=None, help="mirror URL of the zip, or the zip's path")
    down.add_argument("--sha256", default=None, help="expected SHA-256 of the zip")
    down.add_argument("--overwrite", action="store_true")

    train = verb("train", cmd_train, "Train Siamese-Diffusion (or the mask-only baseline).")
    train.add_argument("config", help="YAML file or a built-in name (tiny, scratch, sd15)")
    train.add_argument("overrides", nargs="*", metavar="key=value")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint")

    sample = verb(
        "sample", cmd_sample, "Synthesise image-mask pairs from masks with Mask-Diffusion."
    )
    sample.add_argument("model", type=Path, help="an export directory or a training run")
    sample.add_argument(
        "--masks",
        required=True,
        metavar="DATA[:split]",
        help="conditioning masks: a siamdiff dataset; train split unless :val, :test or :all",
    )
    sample.add_argument("--out", type=Path, required=True)
    no_verify(sample)
    sample.add_argument("--per-mask", type=int, default=1)
    sample.add_argument("--steps", type=int, default=50)
    sample.add_argument("--guidance", type=float, default=9.0)
    sample.add_argument(
        "--control-scale",
        type=float,
        default=1.0,
        help="multiplies the ControlNet's residuals: 0 ignores the mask, > 1 follows it harder",
    )
    sample.add_argument("--eta", type=float, default=0.0)
    sample.add_argument(
        "--speed",
        default="",
        help="comma list of speed levers: channels_last, bf16_frozen (CUDA), compile "
        "(docs/performance.md)",
    )
    sample.add_argument("--seed", type=int, default=42)
    sample.add_argument("--scheduler", default="ddim", help="ddim | dpmsolver++ | unipc")
    sample.add_argument("--mask-aug", default="", help="comma list of flip, scale, shift")
    sample.add_argument("--batch-size", type=int, default=8)
    sample.add_argument("--device", default=None, help=DEVICE_HELP)
    sample.add_argument(
        "--format", default="", help="also export: comma list of pranet, nnunet, folder"
    )
    sample.add_argument(
        "--limit", type=int, default=None, help="only N masks, spread evenly over the split"
    )
    sample.add_argument("--overwrite", action="store_true")

    seg = verb(
        "train-segmenter",
        cmd_train_segmenter,
        "Train a segmentation model (segmentation-models-pytorch) on a dataset.",
    )
    seg.add_argument("data", type=Path, help="a siamdiff dataset (its train split)")
    seg.add_argument("--out", type=Path, required=True, help="the segmenter's folder")
    seg.add_argument("--arch", default="unet", help="segmentation-models-pytorch architecture")
    seg.add_argument("--encoder", default="resnet18", help="its encoder (random init)")
    seg.add_argument(
        "--size", type=int, default=256, help="square input, px: a multiple of 32 (5 poolings)"
    )
    seg.add_argument("--epochs", type=at_least(1), default=10, help="passes over the data")
    seg.add_argument("--batch-size", type=at_least(1), default=8, help="images per step")
    seg.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    seg.add_argument("--seed", type=at_least(0), default=0, help="weights and batch order")
    seg.add_argument(
        "--extra",
        type=Path,
        action="append",
        default=[],
        help="another dataset to train on as well (e.g. a synthetic set)",
    )
    seg.add_argument("--device", default=None, help=DEVICE_HELP)
    seg.add_argument("--workers", type=at_least(0), default=0, help="DataLoader workers")
    seg.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    no_verify(seg)

    vae = verb(
        "train-vae",
        cmd_train_vae,
        "Train a latent autoencoder (diffusers AutoencoderKL, f=8) on a dataset's images, for "
        "when no pretrained one is at hand.",
    )
    vae.add_argument("data", type=Path, help="a siamdiff dataset (its training split)")
    vae.add_argument("--out", type=Path, required=True, help="the autoencoder's folder")
    vae.add_argument("--size", type=int, default=128, help="square training crops, px")
    vae.add_argument("--steps", type=at_least(1), default=3000, help="optimiser steps")
    vae.add_argument("--batch-size", type=at_least(1), default=16, help="crops per step")
    vae.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate")
    vae.add_argument(
        "--widths",
        type=comma_integers,
        default="32,64,128,128",
        help="channels of the 4 encoder/decoder blocks, comma-separated",
    )
    vae.add_argument(
        "--layers-per-block", type=at_least(1), default=1, help="ResNet layers per block"
    )
    vae.add_argument("--latent-channels", type=at_least(1), default=4, help="latent channels")
    vae.add_argument(
        "--kl-weight", type=float, default=1e-6, help="KL term weight (Stable Diffusion's)"
    )
    vae.add_argument("--ssim-weight", type=float, default=0.2, help="weight of 1 - SSIM")
    vae.add_argument("--seed", type=at_least(0), default=0, help="weights and batches")
    vae.add_argument("--checkpoint-every", type=at_least(1), default=250, help="steps")
    vae.add_argument("--device", default=None, help=DEVICE_HELP)
    vae.add_argument("--workers", type=at_least(0), default=0, help="DataLoader workers")
    vae.add_argument("--resume", action="store_true", help="continue an unfinished run in --out")
    no_verify(vae)
    vae.add_argument(
        "--overwrite", action="store_true", help="train again over a finished model in --out"
    )

    ev = verb("evaluate", cmd_evaluate, "Metrics of a synthetic set against the real one.")
    ev.add_argument("real", type=Path)
    ev.add_argument("syn", type=Path)
    ev.add_argument("--out", type=Path, default=Path("metrics.json"))
    ev.add_argument(
        "--segmenter",
        type=Path,
        required=True,
        help="from `siamdiff train-segmenter REAL` (real training split only)",
    )
    ev.add_argument(
        "--utility",
        action="store_true",
        help="also train segmenters on real vs real + synthetic (slow)",
    )
    ev.add_argument("--utility-epochs", type=at_least(1), default=20)
    ev.add_argument("--utility-size", type=int, default=256)
    ev.add_argument("--utility-seeds", type=at_least(1), default=3, help="how many seeds")
    ev.add_argument(
        "--utility-first-seed",
        type=at_least(0),
        default=0,
        help="seeds are FIRST .. FIRST + N - 1 (more seeds for an earlier evaluation)",
    )
    ev.add_argument("--utility-archs", default="unet,fpn", help="comma list of smp architectures")
    ev.add_argument(
        "--utility-matched-steps",
        action="store_true",
        help="also train real only for as many steps as real + synthetic: is the gain the "
        "synthetic data's, or the extra steps'?",
    )
    ev.add_argument("--inception-weights", type=Path, default=None)
    ev.add_argument("--clip-model", type=Path, default=None)
    ev.add_argument(
        "--report",
        type=Path,
        default=None,
        help="folder of the report (OUT's name .html, default: beside --out)",
    )
    ev.add_argument("--run", type=Path, default=None, help="training run whose curves to include")
    ev.add_argument("--device", default=None, help=DEVICE_HELP)
    ev.add_argument("--workers", type=at_least(0), default=0)
    ev.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    no_verify(ev)

    rate = verb("rate", cmd_rate, "Blinded realism rating (MOS) of synthetic vs real images.")
    rate.add_argument("syn", type=Path, nargs="?", help="synthetic dataset")
    rate.add_argument("real", type=Path, nargs="?", help="real dataset")
    rate.add_argument("--study", type=Path, help="study directory (created, or resumed)")
    rate.add_argument("--host", default="127.0.0.1")
    rate.add_argument("--port", type=int, default=8765)
    rate.add_argument(
        "--per-source",
        type=int,
        default=None,
        help="images per source (default: the smaller set's size)",
    )
    # None = not given: a resumed study is checked against the options given only.
    rate.add_argument(
        "--repeats",
        type=at_least(0),
        default=None,
        help="items shown twice (default 3, fewer in a tiny study)",
    )
    rate.add_argument("--seed", type=at_least(0), default=None, help="default 0")
    rate.add_argument("--overlay", action="store_true", default=None, help="mask overlay on demand")
    rate.add_argument(
        "--export",
        type=Path,
        default=None,
        metavar="DIR",
        help="write mos.json / mos.csv / mos.png for a study and exit",
    )

    export = verb("export", cmd_export, "Write a diffusers-style model directory from a run.")
    export.add_argument("run", type=Path)
    export.add_argument("out", type=Path)
    export.add_argument(
        "--checkpoint",
        default=None,
        help="checkpoint: step-00000040 or 40 (default: the newest intact one)",
    )
    export.add_argument("--overwrite", action="store_true")
    for sub in verbs.choices.values():
        show_defaults(sub)
    return parser


def check_device(name: str) -> None:
    """Refuse, in one line, a --device torch does not know or this machine does not have."""
    import torch

    try:
        try:
            device = torch.device(name)
        except RuntimeError as exc:  # torch lists its twenty device types: name ours
            raise RuntimeError("not a device name: use cpu, cuda, cuda:N, mps or xpu") from exc
        if device.type == "meta":
            raise RuntimeError("holds no data")
        if device.type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if count == 0 or (device.index or 0) >= count:
                raise RuntimeError(f"this machine has {count} CUDA device(s)")
        else:
            torch.empty(0, device=device)  # an MPS or XPU this machine lacks fails here
    except (RuntimeError, AssertionError) as exc:
        raise SiamdiffError(f"--device {name!r} cannot be used ({first_line(exc)})") from exc


def comma_integers(text: str) -> tuple[int, ...]:
    """argparse type: ``32,64,128`` -> (32, 64, 128)."""
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be integers separated by commas, got {text!r}"
        ) from None


DEVICE_HELP = "cpu, cuda, cuda:N (default: cuda when available)"


def chosen_device(requested: str | None) -> str:
    """``--device``, by default the GPU when there is one (as ``train`` does)."""
    import torch

    return requested or ("cuda" if torch.cuda.is_available() else "cpu")


def show_defaults(parser: argparse.ArgumentParser) -> None:
    """End every option's help with its default, but for defaults that say nothing (an off
    flag, no value, an empty list)."""
    for action in parser._actions:
        default = action.default
        silent = default is None or default is False or default in ("", [], argparse.SUPPRESS)
        if action.option_strings and not silent and "%(default)" not in (action.help or ""):
            action.help = f"{action.help or ''} (default: %(default)s)".lstrip()


def at_least(smallest: int) -> Callable[[str], int]:
    """argparse type: an integer >= ``smallest`` (a worker count, a step count)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = smallest - 1
        if value < smallest:
            raise argparse.ArgumentTypeError(f"must be an integer >= {smallest}, got {text!r}")
        return value

    return parse


class ProgressAsLines:
    """A stderr that is no terminal (a cluster job's log file) written as lines: progress bars
    redraw with carriage returns, which would make a whole run one line of the log. A redraw
    becomes a line at most every ``interval`` seconds (tqdm's own pacing cannot be relied on:
    it reads TQDM_MININTERVAL when first imported), a bar's final state always; blank lines
    are dropped, and other attributes are the stream's."""

    def __init__(self, stream: TextIO, interval: float = 0.0) -> None:
        self.stream = stream
        self.interval = interval
        self.pending = ""  # the unfinished line
        self.redrawn = False  # it is a bar's redraw ("\r" + the whole bar, then a flush)
        self.held: str | None = None  # the newest redraw not yet in the log
        self.last = -math.inf  # when a redraw was last written

    def _redraw(self, line: str) -> None:
        self.held = line
        if time.monotonic() - self.last >= self.interval:
            self.stream.write(line + "\n")
            self.held, self.last = None, time.monotonic()

    def write(self, text: str) -> int:
        self.redrawn = self.redrawn or "\r" in text
        pieces = re.split(r"([\r\n])", self.pending + text)
        self.pending = pieces.pop()
        for line, end in zip(pieces[::2], pieces[1::2], strict=True):
            if end == "\r" and line.strip():
                self._redraw(line)
            elif end == "\n" and line.strip():
                self.stream.write(line + "\n")
                self.held = None
            elif end == "\n" and self.held is not None:  # a bar closed: its final state
                self.stream.write(self.held + "\n")
                self.held = None
        return len(text)

    def flush(self) -> None:
        if self.redrawn:  # in the log now, not at the next redraw (a cleared bar: dropped)
            if self.pending.strip():
                self._redraw(self.pending)
            self.pending, self.redrawn = "", False
        self.stream.flush()

    def finish(self) -> None:
        self.write("\n")
        self.stream.flush()

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


@contextlib.contextmanager
def progress_for_logs() -> Iterator[None]:
    """In a log (stderr no terminal): progress as lines, one every 30 s."""
    if sys.stderr.isatty() or isinstance(sys.stderr, ProgressAsLines):
        yield
        return
    stderr = sys.stderr
    interval = os.environ.get("TQDM_MININTERVAL", str(LOG_PROGRESS_SECONDS))
    try:
        seconds = max(float(interval), 0.0)
    except ValueError:
        seconds = LOG_PROGRESS_SECONDS
    sys.stderr = lines = ProgressAsLines(stderr, seconds)
    try:
        yield
    finally:
        lines.finish()
        sys.stderr = stderr


# What a user does after Ctrl-C, per verb (the others wrote nothing and start again).
AFTER_INTERRUPT = {
    "train": "pass --resume to go on from the last checkpoint",
    "train-vae": "pass --resume to go on from the last checkpoint",
    "sample": "the same command again goes on (finished pairs are kept)",
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops filling `key=value ...` at the first flag: `train CONFIG --resume a=b`
    # leaves a=b over. Those are overrides too, wherever they stand.
    if extra and hasattr(args, "overrides") and all("=" in e and e[0] != "-" for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    with progress_for_logs():
        return _run(args)


PEER_STOPPED = (
    "another process of this launch stopped; its own error says why (this one lost its "
    "connection to it)"
)
# What gloo and NCCL say when a collective's peer process has gone (not a timeout or an
# internal error, which every rank would meet and must show as they are).
PEER_GONE = re.compile(
    r"closed by peer|connection reset by peer|broken pipe|remote process exited", re.IGNORECASE
)


def peer_failed(exc: RuntimeError) -> bool:
    """Whether ``exc`` is a collective failing because another rank of a launch stopped."""
    import torch.distributed as dist

    return (
        dist.is_available()
        and dist.is_initialized()
        and dist.get_world_size() > 1
        and bool(PEER_GONE.search(str(exc)))
    )


def _run(args: argparse.Namespace) -> int:
    try:
        if getattr(args, "device", None) is not None:
            check_device(args.device)
        return args.handler(args)
    except SiamdiffError as exc:
        message = str(exc)
        worker = re.match(r"Caught (\w+) in DataLoader worker", message)
        if worker:  # re-raised by a DataLoader worker, traceback folded in, ending in the error
            message = message.rsplit(f"{worker.group(1)}: ", 1)[-1]
        print(f"siamdiff: error: {message}", file=sys.stderr)
        return 2
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"siamdiff: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        failure = compile_failure(exc)
        if failure is not None:
            print(f"siamdiff: error: {failure}", file=sys.stderr)
            return 2
        if not peer_failed(exc):
            raise
        # The failed rank printed its own one-line error; this one only lost its peer.
        print(f"siamdiff: error: {PEER_STOPPED}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = AFTER_INTERRUPT.get(args.verb)
        if args.verb == "sample" and args.overwrite:  # it would delete the finished pairs
            hint = "the same command without --overwrite goes on (finished pairs are kept)"
        print(f"siamdiff: interrupted{f'; {hint}' if hint else ''}", file=sys.stderr)
        return 130

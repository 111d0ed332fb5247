"""Collect run.sh's evaluations into results.json, results.md, sweep.png and grid-<arm>.png.

results.md is the table of every (arm, guidance, control scale), then ``notes.md`` (reading the
numbers), written by hand.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
from pathlib import Path

import torch
from matplotlib.figure import Figure

from siamdiff.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from siamdiff.bench import device_label
from siamdiff.evaluate.utility import format_mean_std, mean_std
from siamdiff.synthesize import comparison_grid

POLYP_RESULTS = Path(__file__).resolve().parents[1] / "polyp_siamese_vs_maskonly" / "results.json"
GRID_MASKS = 4  # of the 8 sampled test masks: the PNGs stay near 1 MB
DEFAULT_GUIDANCE, DEFAULT_SCALE = 9.0, 1.0  # the method's sampler (method.md)
COLUMNS = (  # (results key, table header, lower is better)
    ("fd_seg", "FD-seg", True),
    ("kid_seg", "KID-seg", True),
    ("fidelity_mdice", "fidelity mDice", False),
    ("fidelity_miou", "fidelity mIoU", False),
    ("ms_ssim", "MS-SSIM", True),
    ("colour_js", "colour JS", True),
)


def parse_setting(text: str) -> tuple[float, float]:
    guidance, scale = text.split(":")
    return float(guidance), float(scale)


def setting_dir(work: Path, arm: str, setting: str) -> Path:
    guidance, scale = setting.split(":")
    return work / f"{arm}-g{guidance}-c{scale}"


def labelled(arm: str, setting: str) -> dict:
    guidance, scale = parse_setting(setting)
    return {"arm": arm, "guidance": guidance, "control_scale": scale}


def row(work: Path, arm: str, setting: str, seconds: dict[str, int]) -> dict:
    metrics = json.loads((setting_dir(work, arm, setting) / "eval" / "metrics.json").read_text())
    fidelity = metrics["mask_fidelity"]
    g, c = setting.split(":")
    return labelled(arm, setting) | {
        "fd_seg": metrics["fd_seg"]["value"],
        "fd_seg_reference_real_test": metrics["fd_seg"]["reference_real_test"],
        "kid_seg": metrics["kid_seg"]["mean"],
        "kid_seg_std": metrics["kid_seg"]["std"],
        "fidelity_mdice": fidelity["mdice"],
        "fidelity_miou": fidelity["miou"],
        "fidelity_median_dice": fidelity["median_dice"],
        "ms_ssim": metrics["diversity"]["ms_ssim"]["mean"],
        "colour_js": metrics["pixel_stats"]["histogram_js"],
        "images": fidelity["images"],
        "sample_seconds": seconds.get(f"sample {arm} g{g} c{c}"),
    }


def utility_row(metrics_paths: list[Path], arm: str, setting: str) -> dict:
    """The U-Net utility numbers of the evaluations with ``--utility`` among ``metrics_paths``
    (missing ones skipped), their seeds pooled; real and real + syn pair up seed by seed."""
    runs = [json.loads(p.read_text())["utility"] for p in metrics_paths if p.exists()]

    def pooled(training_set: str, metric: str) -> dict:
        return mean_std(
            [v for u in runs for v in u["archs"]["unet"][training_set][metric]["per_seed"]]
        )

    real, syn = pooled("real", "mdice"), pooled("real+syn", "mdice")
    gains = [b - a for a, b in zip(real["per_seed"], syn["per_seed"], strict=True)]
    return labelled(arm, setting) | {
        "seeds": [seed for u in runs for seed in u["protocol"]["seeds"]],
        "real_mdice": real,
        "real_syn_mdice": syn,
        "gain_mdice": syn["mean"] - real["mean"],
        "gain_miou": pooled("real+syn", "miou")["mean"] - pooled("real", "miou")["mean"],
        "seeds_ahead": sum(gain > 0 for gain in gains),
    }


def utility_table(rows: list[dict]) -> str:
    def cell(stats: dict) -> str:
        seeds = ", ".join(f"{v:.3f}" for v in stats["per_seed"])
        return f"{format_mean_std(stats)} ({seeds})"

    lines = [
        "| arm | guidance | control scale | seeds | real mDice (per seed) "
        "| real + syn mDice (per seed) | gain mDice | gain mIoU | real + syn ahead |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['arm']} | {r['guidance']:g} | {r['control_scale']:g} "
        f"| {min(r['seeds'])}-{max(r['seeds'])} | {cell(r['real_mdice'])} "
        f"| {cell(r['real_syn_mdice'])} | {r['gain_mdice']:+.3f} | {r['gain_miou']:+.3f} "
        f"| {r['seeds_ahead']} of {len(r['seeds'])} |"
        for r in rows
    ]
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    lines = [
        "| arm | guidance | control scale | " + " | ".join(h for _, h, _ in COLUMNS) + " |",
        "|---|---|---|" + "---|" * len(COLUMNS),
    ]
    for r in rows:
        best = {
            key: (min if lower else max)(o[key] for o in rows if o["arm"] == r["arm"])
            for key, _, lower in COLUMNS
        }
        cells = [
            f"**{r[key]:.3f}**" if r[key] == best[key] else f"{r[key]:.3f}" for key, _, _ in COLUMNS
        ]
        lines.append(
            f"| {r['arm']} | {r['guidance']:g} | {r['control_scale']:g} | {' | '.join(cells)} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], arms: list[str], path: Path) -> None:
    """Fidelity, FD-seg and MS-SSIM against guidance (scale 1) and control scale (guidance 9)."""
    shown = (
        ("fidelity_mdice", "mask fidelity mDice"),
        ("fd_seg", "FD-seg"),
        ("ms_ssim", "MS-SSIM"),
    )
    axes_for = (
        ("guidance", "control_scale", DEFAULT_SCALE),
        ("control_scale", "guidance", DEFAULT_GUIDANCE),
    )
    fig = Figure(figsize=(12, 6.5))
    axes = fig.subplots(len(axes_for), len(shown), squeeze=False)
    for line, (varied, fixed, value) in enumerate(axes_for):
        for column, (key, label) in enumerate(shown):
            ax = axes[line][column]
            for arm in arms:
                points = sorted(
                    (r[varied], r[key]) for r in rows if r["arm"] == arm and r[fixed] == value
                )
                ax.plot(*zip(*points, strict=True), marker="o", label=arm)
            ax.set_xlabel(f"{varied.replace('_', ' ')} ({fixed.replace('_', ' ')} {value:g})")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(path, buffer.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--polyp", type=Path, required=True, help="the polyp experiment's out/")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--arms", nargs="+", required=True)
    parser.add_argument("--settings", nargs="+", required=True, help="guidance:control_scale")
    parser.add_argument(
        "--utility-settings", nargs="*", default=[], help="settings evaluated with --utility"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--commit", default=None, help="the commit the swept models were trained at (HEAD)"
    )
    args = parser.parse_args()
    commit = (
        args.commit
        or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    )

    seconds: dict[str, int] = {}
    stages = args.work / "stages.jsonl"
    for line in stages.read_text().splitlines() if stages.exists() else []:
        stage = json.loads(line)
        seconds[stage["stage"]] = stage["seconds"]
    rows = [row(args.work, arm, s, seconds) for arm in args.arms for s in args.settings]
    first = json.loads(
        (
            setting_dir(args.work, args.arms[0], args.settings[0]) / "syn" / "manifest-v1.json"
        ).read_text()
    )["records"][0]["extra"]["sampler"]
    polyp_results = json.loads(POLYP_RESULTS.read_text())
    results = {
        "experiment": "sampling_sweep",
        "command": f"git checkout {commit}, then bash experiments/polyp_siamese_vs_maskonly/"
        "run.sh and bash experiments/sampling_sweep/run.sh",
        "device": device_label(torch.device(args.device)),
        "models": f"polyp_siamese_vs_maskonly ({polyp_results['scale']})",
        "sampler": {k: v for k, v in first.items() if k not in ("guidance", "control_scale")},
        "masks": "160 training masks x 2 seeds (the polyp experiment's), 8 test masks for grids",
        "rows": rows,
        # The method's sampler (guidance 9, scale 1) is the polyp experiment's own evaluation.
        "utility": [
            utility_row([args.polyp / f"eval-{arm}" / "metrics.json"], arm, "9:1")
            for arm in args.arms
        ]
        + [
            utility_row(
                [
                    setting_dir(args.work, arm, s) / name / "metrics.json"
                    for name in ("eval-utility", "eval-utility-more")
                ],
                arm,
                s,
            )
            for arm in args.arms
            for s in args.utility_settings
        ],
    }
    notes = args.out / "notes.md"
    labels = " | ".join(f"g {s.split(':')[0]}, c {s.split(':')[1]}" for s in args.settings)
    text = (
        "# Sampling sweep: guidance and ControlNet scale\n\n"
        f"Device: {results['device']}. Models: {results['models']}.\n"
        f"Sampler: {results['sampler']}; {results['masks']}.\n"
        f"Reproduce: `git checkout {commit}`, then `bash experiments/polyp_siamese_vs_maskonly/"
        "run.sh` and `bash experiments/sampling_sweep/run.sh` (at a later commit they sweep the "
        "later models, see Models below). Every number: `results.json`. "
        "Best per arm in bold.\n\n"
        f"{table(rows)}\n\n"
        f"FD-seg of the real test images against the real training images: "
        f"{rows[0]['fd_seg_reference_real_test']:.3f}.\n\n"
        "![fidelity, FD-seg and MS-SSIM against guidance and control scale](sweep.png)\n\n"
        "Segmentation utility (U-Net, 96 px, 5 epochs; the polyp experiment's protocol and "
        "yardstick; the seeds pair up, real and real + syn trained from the same seed):\n\n"
        f"{utility_table(results['utility'])}\n\n"
        + "".join(
            f"Test masks, {arm} (mask | real | {labels}):\n\n![{arm}](grid-{arm}.png)\n\n"
            for arm in args.arms
        )
        + (notes.read_text() if notes.exists() else "")
    )
    # Written only once every table is made: a missing evaluation leaves the old files whole.
    atomic_write_json(args.out / "results.json", results)
    plot(rows, args.arms, args.out / "sweep.png")
    for arm in args.arms:
        grids = [setting_dir(args.work, arm, s) / "grid" for s in args.settings]
        comparison_grid(args.out / f"grid-{arm}.png", args.polyp / "data", grids, count=GRID_MASKS)
    atomic_write_text(args.out / "results.md", text)
    print(text)


if __name__ == "__main__":
    main()

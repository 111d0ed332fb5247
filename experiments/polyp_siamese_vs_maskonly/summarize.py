"""Collect run.sh's outputs into results.json, results.md and samples.png (in --out).

results.md is the metric table of both arms, then ``notes.md`` in --out (what worked, what did
not), written by hand after reading the numbers. The scale is read from the runs' own resolved
configs, which must agree on everything but the arm, the run folder and the latent cache: the
comparison is at equal budget or not made.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from siamdiff.atomic import atomic_write_json, atomic_write_text
from siamdiff.config import RUN_CONFIG, flat_settings, load_config
from siamdiff.data.dataset import PairedDataset
from siamdiff.data.transforms import TransformConfig, build_transforms
from siamdiff.evaluate.metrics import summary_rows
from siamdiff.export import load_export
from siamdiff.models.dhi import mask_to_hint
from siamdiff.report import read_loss_log, training_seconds
from siamdiff.synthesize import comparison_grid

GRID_MASKS = 8
PER_ARM = ("model.mode", "run_dir", "data.latent_cache")  # all else is the shared budget


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or platform.machine(),
    )
    return f"cpu: {cpu}, {os.cpu_count()} cores, one thread per arm"


def stage_seconds(work: Path, arms: list[str]) -> dict[str, int]:
    """Wall seconds per finished stage run (a resumed stage adds its runs up). Training time
    comes from the loss log instead, which also counts the steps of interrupted runs."""
    totals: dict[str, int] = defaultdict(int)
    path = work / "stages.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        row = json.loads(line)
        totals[row["stage"]] += row["seconds"]
    for arm in arms:
        rows = read_loss_log(work / f"run-{arm}" / "losses.jsonl")
        totals[f"train {arm}"] = round(training_seconds(rows))
    return dict(totals)


def comparison_table(arms: list[str], metrics: dict[str, dict]) -> str:
    """Markdown: one row per metric, one column per arm; why a metric is n/a goes below."""
    columns = {arm: dict(summary_rows(metrics[arm])) for arm in arms}
    lines = [f"| metric | {' | '.join(arms)} |", "|---|" + "---|" * len(arms)]
    unavailable: dict[str, str] = {}
    for name in columns[arms[0]]:
        cells = [columns[arm].get(name, "n/a") for arm in arms]
        if all(cell.startswith("n/a") for cell in cells):
            unavailable[name.strip()] = cells[0].removeprefix("n/a (").removesuffix(")")
            continue
        lines.append(f"| {name.strip()} | {' | '.join(cells)} |")
    lines += ["", "Not measured here:"] if unavailable else []
    lines += [f"- {name}: {reason or 'unavailable'}" for name, reason in unavailable.items()]
    return "\n".join(lines)


def held_out_table(arms: list[str], per_arm: dict[str, dict]) -> str:
    held_out = {arm: per_arm[arm]["held_out"] for arm in arms}
    lines = [
        "Mask-Diffusion's eps MSE on the real test images (lower is better; same noise and t "
        "for both arms): over the whole image, then inside the lesion with its own mask and with "
        "another test image's mask as the hint (the rise is how much the denoiser uses the mask "
        "where the lesion is):",
        "",
        "| t | " + " | ".join(f"{arm}: whole / lesion / lesion, other mask" for arm in arms) + " |",
        "|---|" + "---|" * len(arms),
    ]
    for row in held_out[arms[0]]:
        cells = (" / ".join(f"{v:.4f}" for v in held_out[arm][row].values()) for arm in arms)
        lines.append(f"| {row.removeprefix('t=')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


HELD_OUT_T = (50, 200, 500, 800, 950)


@torch.no_grad()
def held_out_denoising(model_dir: Path, data: Path, size: int) -> dict[str, dict[str, float]]:
    """Mask-Diffusion's eps MSE on the real *test* images at fixed t, same noise for every arm:
    how well each arm denoises images it never saw, whatever its samples look like. Per t:
    ``whole`` image; ``lesion``, inside the lesion (the mask pooled to the latent grid weighs
    each latent pixel); ``lesion_other_mask``, the same with each image hinted by the next
    image's mask: a denoiser that ignores its mask scores the same with either."""
    loaded = load_export(model_dir)
    model, autoencoder = loaded.model, loaded.autoencoder
    view = PairedDataset(
        data, "test", transform=build_transforms(TransformConfig(size=size), False)
    )
    items = [view[i] for i in range(len(view))]
    z0 = autoencoder.encode(torch.stack([it["image"] for it in items]))
    masks = torch.stack([it["mask"] for it in items])
    hints = {"own": mask_to_hint(masks), "other": mask_to_hint(masks.roll(1, dims=0))}
    lesion = F.adaptive_avg_pool2d(masks.float(), z0.shape[-2:])
    context = model.text([loaded.prompt] * len(items))
    gen = torch.Generator().manual_seed(0)
    result = {}
    for t_value in HELD_OUT_T:
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.full((len(items),), t_value)
        zt = model.noise_scheduler.add_noise(z0, noise, t)
        errors = {
            name: (model.predict_eps(zt, t, model.predict_mask(zt, t, context, hint)) - noise)
            .pow(2)
            .mean(dim=1, keepdim=True)
            for name, hint in hints.items()
        }
        result[f"t={t_value}"] = {
            "whole": float(errors["own"].mean()),
            "lesion": float((errors["own"] * lesion).sum() / lesion.sum()),
            "lesion_other_mask": float((errors["other"] * lesion).sum() / lesion.sum()),
        }
    result["mean"] = {
        key: sum(row[key] for row in result.values()) / len(HELD_OUT_T)
        for key in result[f"t={HELD_OUT_T[0]}"]
    }
    return result


def equal_budget_config(runs: list[Path], per_arm: tuple[str, ...] = PER_ARM) -> DictConfig:
    """The first run's resolved training config, once every run's agrees with it on all but
    ``per_arm``; otherwise the settings that differ, as an error."""
    configs = [load_config(run / RUN_CONFIG) for run in runs]
    flat = [flat_settings(OmegaConf.to_container(cfg)) for cfg in configs]
    differ = sorted(
        key
        for key in set().union(*flat)
        if key not in per_arm and len({repr(f.get(key)) for f in flat}) > 1
    )
    if differ:
        raise SystemExit(f"the arms were not trained at equal budget: {', '.join(differ)} differ")
    shared = configs[0]
    for key in per_arm:
        OmegaConf.update(shared, key, None)
    return shared


def experiment_parser(description: str | None) -> argparse.ArgumentParser:
    """The options every experiment's summarize.py takes: run.sh's work folder, the folder the
    results go to, the device the experiment ran on."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    return parser


def main() -> None:
    parser = experiment_parser(__doc__)
    parser.add_argument("--arms", nargs="+", required=True)
    parser.add_argument("--command", required=True, help="the line that reruns the experiment")
    parser.add_argument("--solver-study", default=None, help="eval-NAME of a faster sampler run")
    args = parser.parse_args()

    metrics = {
        arm: json.loads((args.work / f"eval-{arm}" / "metrics.json").read_text())
        for arm in args.arms
    }
    cfg = equal_budget_config([args.work / f"run-{arm}" for arm in args.arms])
    size = int(cfg.data.transforms.size)
    synthesis = json.loads((args.work / f"syn-{args.arms[0]}" / "manifest-v1.json").read_text())
    sampler = synthesis["records"][0]["extra"]["sampler"]
    results = {
        "experiment": "polyp_siamese_vs_maskonly",
        "command": args.command,
        "device": device_name(args.device),
        "scale": f"{size} px, {cfg.train.max_steps} steps x batch "
        f"{cfg.train.batch_size}, backbone {cfg.backbone.kind}, UNet widths "
        f"{list(cfg.backbone.unet.get('block_out_channels', [])) or 'preset'}, "
        f"{cfg.backbone.prediction_type} target",
        "config": OmegaConf.to_container(cfg),
        "seed": int(cfg.seed),
        "sampling": sampler | {"images_per_arm": len(synthesis["records"])},
        "stage_seconds": stage_seconds(args.work, args.arms),
        "arms": {
            arm: {
                "metrics": metrics[arm],
                "final_losses": _last_losses(args.work / f"run-{arm}" / "losses.jsonl"),
                "held_out": held_out_denoising(
                    args.work / f"model-{arm}", args.work / "data", size
                ),
            }
            for arm in args.arms
        },
    }
    solver_text = ""
    if args.solver_study:
        study = json.loads((args.work / f"eval-{args.solver_study}" / "metrics.json").read_text())
        arm = args.arms[-1]
        results["solver_study"] = {
            "arm": arm,
            "sampler": json.loads(
                (args.work / f"syn-{args.solver_study}" / "manifest-v1.json").read_text()
            )["records"][0]["extra"]["sampler"],
            "metrics": study,
        }
        names = [f"{arm} DDIM {sampler['steps']}", f"{arm} DPM-Solver++ 20"]
        table = comparison_table(names, {names[0]: metrics[arm], names[1]: study})
        solver_text = f"## The faster solver's cost\n\n{table}\n\n"
    atomic_write_json(args.out / "results.json", results)

    notes = args.out / "notes.md"
    text = (
        f"# Siamese-Diffusion vs mask-only: results\n\n"
        f"Device: {results['device']}. Scale: {results['scale']}.\n"
        f"Reproduce: `{results['command']}`. Every number: `results.json`.\n\n"
        f"{comparison_table(args.arms, metrics)}\n\n"
        f"{held_out_table(args.arms, results['arms'])}\n\n"
        f"Wall time per stage (s): "
        + ", ".join(f"{k} {v}" for k, v in results["stage_seconds"].items())
        + "\n\n![mask | real | "
        + " | ".join(args.arms)
        + "](samples.png)\n\n"
        + solver_text
        + (notes.read_text() if notes.exists() else "")
    )
    atomic_write_text(args.out / "results.md", text)
    grids = [args.work / f"grid-{arm}" for arm in args.arms]
    comparison_grid(args.out / "samples.png", args.work / "data", grids, count=GRID_MASKS)
    print(text)


def _last_losses(path: Path) -> dict[str, float]:
    rows = read_loss_log(path)
    return {k: v for k, v in rows[-1].items() if k != "step"} | {"step": rows[-1]["step"]}


if __name__ == "__main__":
    main()

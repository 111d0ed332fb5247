"""Held-out reconstructions of three latent autoencoders on the same images (run.sh).

Writes results.json, results.md and reconstructions.png (held-out image | DCT | TAEF2 |
each train-vae model) beside this script. ``--vae "NAME=DIR"`` names each trained model; its
training seconds are the steps' own time in its loss log (resumed parts added up).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
from pathlib import Path

import torch
from torchmetrics.functional.image import structural_similarity_index_measure

from siamdiff.atomic import atomic_write_json
from siamdiff.data.manifest import load_manifest
from siamdiff.models.autoencoder import load_autoencoder
from siamdiff.report import save_columns, training_seconds
from siamdiff.train_vae import ImageCrops

SIZE = 128  # the prepared data's short side: whole-height centre crops


def scores(images: torch.Tensor, remade: torch.Tensor) -> dict[str, float]:
    """PSNR (dB) and SSIM of images in [0, 1], L1 in [-1, 1] units, over the whole set."""
    a, b = (images + 1) / 2, (remade + 1) / 2
    mse = ((a - b) ** 2).mean(dim=(1, 2, 3)).clamp_min(1e-12)
    return {
        "psnr_db": float((10 * torch.log10(1 / mse)).mean()),
        "ssim": float(structural_similarity_index_measure(b, a, data_range=1.0)),
        "l1": float((images - remade).abs().mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    for flag in ("--data", "--taef2", "--out"):
        parser.add_argument(flag, type=Path, required=True)
    parser.add_argument("--vae", action="append", required=True, help="NAME=DIR, repeatable")
    args = parser.parse_args()
    trained = {name: Path(path) for name, path in (v.split("=", 1) for v in args.vae)}
    held_out = load_manifest(args.data).split("val")
    crops = ImageCrops(args.data, held_out, SIZE)
    images = torch.stack([crops[(i, None)] for i in range(len(crops))])
    autoencoders = {
        "dct": {"kind": "dct"},
        "taef2": {"kind": "taef2", "path": str(args.taef2)},
        **{name: {"kind": "diffusers-kl", "path": str(path)} for name, path in trained.items()},
    }
    results, columns = {}, [images[:8]]
    for name, spec in autoencoders.items():
        autoencoder = load_autoencoder(spec)
        with torch.no_grad():
            latents = torch.cat([autoencoder.encode(b) for b in images.split(16)])
            remade = torch.cat([autoencoder.decode(z) for z in latents.split(16)])
        parameters = sum(p.numel() for p in autoencoder.parameters())
        results[name] = {
            **scores(images, remade),
            "latent_shape": list(latents.shape[1:]),
            "compression": images[0].numel() / latents[0].numel(),
            "scaled_latent_std": float(latents.std()),
            "parameters": parameters,
        }
        columns.append(remade[:8])
    training = {}
    for name, path in trained.items():
        info = json.loads((path / "training.json").read_text())
        training[name] = {
            "settings": info["settings"],
            "train_images": info["data"]["train_images"],
            "train_seconds": round(training_seconds(info["losses"])),
            "scaling_factor": info["scaling_factor"],
            "held_out_in_training": info["held_out"],
            "loss_first": info["losses"][0],
            "loss_last": info["losses"][-1],
        }
    summary = {
        "command": "bash experiments/train_vae_cpu/run.sh",
        "device": f"cpu ({platform.processor() or platform.machine()}), 1 thread",
        "held_out": {"split": "val", "images": len(images), "size": SIZE},
        "train_vae": training,
        "autoencoders": results,
    }
    atomic_write_json(args.out / "results.json", summary)
    save_columns(args.out / "reconstructions.png", *columns)
    lines = [
        "# train-vae at CPU scale: held-out reconstructions",
        "",
        f"Device: {summary['device']}. Reproduce: `{summary['command']}`.",
        f"Held out: the {len(images)} validation images, {SIZE} px centre crops.",
        "",
    ]
    for name, run in training.items():
        settings = run["settings"]
        lines.append(
            f"- {name}: widths {settings['widths']}, {settings['latent_channels']} latent "
            f"channels, {settings['size']} px crops, batch {settings['batch_size']}, "
            f"{settings['steps']} steps, lr {settings['lr']} on {run['train_images']} training "
            f"images ({run['train_seconds']} s)."
        )
    lines += [
        "",
        "| autoencoder | parameters | latent (C x h x w) | PSNR dB | SSIM | L1 | latent std |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        shape = " x ".join(map(str, r["latent_shape"]))
        lines.append(
            f"| {name} | {r['parameters'] / 1e6:.2f}M | {shape} | {r['psnr_db']:.2f} | "
            f"{r['ssim']:.3f} | {r['l1']:.4f} | {r['scaled_latent_std']:.2f} |"
        )
    columns_named = " | ".join(["held-out", "DCT", "TAEF2", *trained])
    lines += ["", f"![{columns_named}](reconstructions.png)", ""]
    (args.out / "results.md").write_text("\n".join(lines))
    print("\n".join(lines))
    assert all(math.isfinite(r["psnr_db"]) for r in results.values())


if __name__ == "__main__":
    main()

"""Held-out reconstructions of three latent autoencoders on the same images (run.sh).

Writes results.json, results.md and reconstructions.png (held-out image | DCT | TAEF2 |
train-vae) beside this script.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
from pathlib import Path

import torch
from torchmetrics.functional.image import structural_similarity_index_measure

from siamdiff.data.manifest import load_manifest
from siamdiff.models.autoencoder import load_autoencoder
from siamdiff.report import save_columns
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
    for flag in ("--data", "--vae", "--taef2", "--out"):
        parser.add_argument(flag, type=Path, required=True)
    parser.add_argument("--train-seconds", type=int, required=True)
    args = parser.parse_args()
    held_out = load_manifest(args.data).split("val")
    crops = ImageCrops(args.data, held_out, SIZE)
    images = torch.stack([crops[(i, None)] for i in range(len(crops))])
    autoencoders = {
        "dct": {"kind": "dct"},
        "taef2": {"kind": "taef2", "path": str(args.taef2)},
        "train-vae": {"kind": "diffusers-kl", "path": str(args.vae)},
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
    info = json.loads((args.vae / "training.json").read_text())
    summary = {
        "command": "bash experiments/train_vae_cpu/run.sh",
        "device": f"cpu ({platform.processor() or platform.machine()}), 1 thread",
        "held_out": {"split": "val", "images": len(images), "size": SIZE},
        "train_vae": {
            "settings": info["settings"],
            "train_images": info["data"]["train_images"],
            "train_seconds": args.train_seconds,
            "scaling_factor": info["scaling_factor"],
            "loss_first": info["losses"][0],
            "loss_last": info["losses"][-1],
        },
        "autoencoders": results,
    }
    (args.out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    save_columns(args.out / "reconstructions.png", *columns)
    settings = info["settings"]
    lines = [
        "# train-vae at CPU scale: held-out reconstructions",
        "",
        f"Device: {summary['device']}. Reproduce: `{summary['command']}`.",
        f"train-vae: widths {settings['widths']}, {settings['size']} px crops, batch "
        f"{settings['batch_size']}, {settings['steps']} steps, lr {settings['lr']} on "
        f"{info['data']['train_images']} training images ({args.train_seconds} s).",
        f"Held out: the {len(images)} validation images, {SIZE} px centre crops.",
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
    lines += ["", "![held-out | DCT | TAEF2 | train-vae](reconstructions.png)", ""]
    (args.out / "results.md").write_text("\n".join(lines))
    print("\n".join(lines))
    assert all(math.isfinite(r["psnr_db"]) for r in results.values())


if __name__ == "__main__":
    main()

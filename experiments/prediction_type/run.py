"""eps- vs v-prediction for a small from-scratch backbone, everything else equal.

The model, data, seed, steps, batch and optimiser of the CPU-scale polyp experiment
(../polyp_siamese_vs_maskonly/cpu.yaml, mask-only), trained by one plain loop that differs
between the two arms only in the UNet's target (eps or v). Reports, on the real test split,
the eps and x0 MSE at fixed t, and the latents and images DDIM makes from 8 test masks.

    python experiments/prediction_type/run.py            # needs ../polyp_siamese_vs_maskonly/out
                                                         # (its run.sh prepares data + latents)
Writes results.json, results.md and samples.png (mask | real | eps | v) beside this file.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from siamdiff.atomic import atomic_write_json, atomic_write_text
from siamdiff.config import load_config
from siamdiff.data.cache import LatentCache, pair_entry
from siamdiff.data.dataset import PairedDataset
from siamdiff.data.transforms import TransformConfig, build_transforms, cached_view_name
from siamdiff.export import build_model
from siamdiff.models.dhi import mask_to_hint
from siamdiff.report import save_sample_grid
from siamdiff.sample import ddim_sample

HERE = Path(__file__).resolve().parent
POLYP = HERE.parent / "polyp_siamese_vs_maskonly"
ARMS = ("epsilon", "v_prediction")
HELD_OUT_T = (50, 200, 500, 800, 950, 990)
GRID_MASKS = 8


def split(work: Path, name: str, size: int) -> PairedDataset:
    return PairedDataset(
        work / "data", name, transform=build_transforms(TransformConfig(size), False)
    )


def run_arm(prediction_type: str, work: Path, shared: Path, steps: int) -> dict:
    torch.set_num_threads(1)  # one core per arm, both arms side by side
    cfg = load_config(
        POLYP / "cpu.yaml",
        [
            f"data.root={work / 'data'}",
            f"autoencoder.path={shared / 'weights/taef2'}",
            "model.mode=mask-only",
            f"backbone.prediction_type={prediction_type}",
        ],
    )
    model, autoencoder, _ = build_model(cfg)
    prompt, size, batch = cfg.backbone.prompt, int(cfg.data.transforms.size), cfg.train.batch_size
    train = split(work, "train", size)
    view = cached_view_name(TransformConfig.from_dict(OmegaConf.to_container(cfg.data.transforms)))
    cache_path = work / "latents-mask-only.lmdb"
    cache = LatentCache(cache_path, autoencoder.identity, view, True)
    items = [train[i] for i in range(len(train))]
    metas = [it["meta"] for it in items]
    latents = [cache.get(pair_entry(m["image_sha256"], m["mask_sha256"])) for m in metas]
    if any(z is None for z in latents):
        raise SystemExit(
            f"{cache_path}: no latents of view {view} for {sum(z is None for z in latents)} "
            "training pairs: run ../polyp_siamese_vs_maskonly/run.sh first (its mask-only arm "
            "builds them)"
        )
    z_train = torch.stack(latents).float()
    hints = mask_to_hint(torch.stack([it["mask"] for it in items]))

    parameters = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(parameters, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    warmup = cfg.optim.warmup_steps
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: min(1.0, (s + 1) / warmup))
    gen = torch.Generator().manual_seed(cfg.seed)
    losses, start = [], time.time()
    for _ in tqdm(range(steps), desc=prediction_type, position=ARMS.index(prediction_type)):
        index = torch.randint(0, len(z_train), (batch,), generator=gen)
        z0, noise = z_train[index], torch.randn(z_train[index].shape, generator=gen)
        t = torch.randint(0, 1000, (batch,), generator=gen)
        zt = model.noise_scheduler.add_noise(z0, noise, t)
        prediction = model.predict_mask(zt, t, model.text([prompt] * batch), hints[index])
        loss = F.mse_loss(prediction, model.target(z0, noise, t))
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, cfg.optim.max_grad_norm)
        optimiser.step()
        schedule.step()
        losses.append(float(loss))
    tail = losses[-50:]
    result = {"train_seconds": round(time.time() - start), "final_loss": sum(tail) / len(tail)}

    model.eval()
    test = split(work, "test", size)
    images = torch.stack([test[i]["image"] for i in range(len(test))])
    masks = torch.stack([test[i]["mask"] for i in range(len(test))])
    with torch.no_grad():
        z_test = autoencoder.encode(images)
        text = model.text([prompt] * len(test))
        gen = torch.Generator().manual_seed(0)
        for t_value in HELD_OUT_T:
            noise = torch.randn(z_test.shape, generator=gen)
            t = torch.full((len(test),), t_value)
            zt = model.noise_scheduler.add_noise(z_test, noise, t)
            prediction = model.predict_mask(zt, t, text, mask_to_hint(masks))
            eps = model.predict_eps(zt, t, prediction)
            x0 = model.predict_x0(zt, t, prediction)
            result[f"eps_mse_t{t_value}"] = float((eps - noise).pow(2).mean())
            result[f"x0_mse_t{t_value}"] = float((x0 - z_test).pow(2).mean())
        # DDIM 20 steps, guidance 9, the same noise for both arms.
        shown = min(GRID_MASKS, len(test))
        latents = ddim_sample(
            model,
            mask_to_hint(masks[:shown]),
            model.text([prompt] * shown),
            model.text([""] * shown),
            steps=20,
            guidance=cfg.train.guidance,
            generator=torch.Generator().manual_seed(1),
        )
        result["sample_latent_std"] = float(latents.std())
        result["real_latent_std"] = float(z_test.std())
        result["images"] = autoencoder.decode(latents)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", type=Path, default=POLYP / "out")
    parser.add_argument("--shared", type=Path, default=HERE.parents[2] / "shared")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    with ProcessPoolExecutor(len(ARMS)) as pool:
        futures = [pool.submit(run_arm, a, args.work, args.shared, args.steps) for a in ARMS]
        results = dict(zip(ARMS, (f.result() for f in futures), strict=True))

    size = int(load_config(POLYP / "cpu.yaml").data.transforms.size)
    test = split(args.work, "test", size)
    grid = [test[i] for i in range(min(GRID_MASKS, len(test)))]
    save_sample_grid(
        args.out / "samples.png",
        torch.stack([it["mask"] for it in grid]),
        torch.stack([it["image"] for it in grid]),
        *(results[arm].pop("images") for arm in ARMS),
    )
    atomic_write_json(args.out / "results.json", {"steps": args.steps, **results})
    rows = list(results[ARMS[0]])
    table = ["| | " + " | ".join(ARMS) + " |", "|---|" + "---|" * len(ARMS)]
    table += [
        f"| {row} | " + " | ".join(f"{results[a][row]:.4g}" for a in ARMS) + " |" for row in rows
    ]
    atomic_write_text(
        args.out / "results.md",
        f"# eps- vs v-prediction, {args.steps} steps (CPU, 2 cores)\n\n" + "\n".join(table) + "\n\n"
        "![mask | real | eps | v](samples.png)\n",
    )
    print("\n".join(table))


if __name__ == "__main__":
    main()

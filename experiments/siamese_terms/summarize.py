"""Collect run.sh's outputs into results.json and results.md (in --out).

The table sets each variant beside the polyp experiment's two arms (same data, seed, model and
budget: the variants' configs must equal its Siamese arm's but for their own settings), then the
held-out mask-use probe of that experiment for all four. ``notes.md`` in --out, written by hand
after reading the numbers, is appended.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from siamdiff.atomic import atomic_write_json, atomic_write_text
from siamdiff.config import RUN_CONFIG, load_config
from siamdiff.report import read_loss_log, training_seconds
from siamdiff.synthesize import comparison_grid

POLYP = Path(__file__).resolve().parents[1] / "polyp_siamese_vs_maskonly" / "summarize.py"
_spec = importlib.util.spec_from_file_location("polyp_summarize", POLYP)
assert _spec is not None and _spec.loader is not None
polyp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(polyp)

# run.sh points each variant at the polyp experiment's data where it lies now: the reference
# config may record the folder's path before a rename, so data.root is checked on its own.
PER_RUN = ("run_dir", "data.root", "data.latent_cache")


def main() -> None:
    parser = polyp.experiment_parser(__doc__)
    parser.add_argument("--polyp", type=Path, required=True, help="the polyp experiment's work")
    parser.add_argument(
        "--variants", nargs="+", required=True, help="NAME=KEY=VALUE[;KEY=VALUE...] each"
    )
    parser.add_argument("--command", required=True, help="the line that reruns the experiment")
    args = parser.parse_args()

    variants = dict(spec.split("=", 1) for spec in args.variants)
    reference = args.polyp / "run-siamese"
    # Each variant against the reference on its own: one may differ only in its own settings.
    configs = [
        polyp.equal_budget_config(
            [reference, args.work / f"run-{name}"],
            (*PER_RUN, *(setting.split("=", 1)[0] for setting in settings.split(";"))),
        )
        for name, settings in variants.items()
    ]
    for name in variants:
        root = Path(load_config(args.work / f"run-{name}" / RUN_CONFIG).data.root)
        if root.resolve() != (args.polyp / "data").resolve():
            raise SystemExit(f"run-{name} trained on {root}, not on {args.polyp / 'data'}")
    cfg = configs[0]
    size = int(cfg.data.transforms.size)
    # Where each arm's files are: the reference arms in the polyp experiment's work folder.
    places = {"mask-only": args.polyp, "siamese": args.polyp} | dict.fromkeys(variants, args.work)
    metrics = {
        arm: json.loads((work / f"eval-{arm}" / "metrics.json").read_text())
        for arm, work in places.items()
    }
    arms = {
        arm: {
            "setting": variants.get(arm, f"model.mode={arm}"),
            "metrics": metrics[arm],
            "training_seconds": round(
                training_seconds(read_loss_log(work / f"run-{arm}" / "losses.jsonl"))
            ),
            "held_out": polyp.held_out_denoising(work / f"model-{arm}", args.polyp / "data", size),
        }
        for arm, work in places.items()
    }
    results = {
        "experiment": "siamese_terms",
        "command": args.command,
        "device": polyp.device_name(args.device),
        "scale": f"{size} px, {cfg.train.max_steps} steps x batch {cfg.train.batch_size}, "
        f"backbone {cfg.backbone.kind}, {cfg.backbone.prediction_type} target",
        "polyp_work": str(args.polyp),
        "arms": arms,
    }
    atomic_write_json(args.out / "results.json", results)
    names = list(places)
    notes = args.out / "notes.md"
    text = (
        "# Siamese-Diffusion variants and mask fidelity\n\n"
        f"Device: {results['device']}. Scale: {results['scale']}.\n"
        f"Reproduce: `{results['command']}`. Every number: `results.json`.\n\n"
        + "".join(f"- {arm}: `{arm_result['setting']}`\n" for arm, arm_result in arms.items())
        + f"\n{polyp.comparison_table(names, metrics)}\n\n"
        f"{polyp.held_out_table(names, arms)}\n\n"
        f"![mask | real | {' | '.join(names)}](samples.png)\n\n"
        + (notes.read_text() if notes.exists() else "")
    )
    atomic_write_text(args.out / "results.md", text)
    grids = [work / f"grid-{arm}" for arm, work in places.items()]
    comparison_grid(args.out / "samples.png", args.polyp / "data", grids, count=polyp.GRID_MASKS)
    print(text)


if __name__ == "__main__":
    main()

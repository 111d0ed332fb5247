"""Collect run.sh's evaluations into results.json, results.md and samples.png (in --out).

Each arm sampled at the new ControlNet scale is set beside the same model's scale-1 evaluation in
the polyp experiment's work folder. The comparison is made only when the two sample sets are the
same pairs (masks, sample indices, seeds) drawn with the same sampler but for its control scale,
and when both evaluations ran the same utility protocol. ``notes.md`` in --out, written by hand
after reading the numbers, is appended to results.md.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from siamdiff.atomic import atomic_write_json, atomic_write_text
from siamdiff.evaluate.utility import format_mean_std
from siamdiff.synthesize import comparison_grid

POLYP = Path(__file__).resolve().parents[1] / "polyp_siamese_vs_maskonly" / "summarize.py"
_spec = importlib.util.spec_from_file_location("polyp_summarize", POLYP)
assert _spec is not None and _spec.loader is not None
polyp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(polyp)

REPO = Path(__file__).resolve().parents[2]
POLYP_RESULTS = json.loads((POLYP.parent / "results.json").read_text())
MATCHED = "real (matched steps)"


def sample_set(folder: Path) -> tuple[dict, set[tuple[str, int, int]]]:
    """The sampler settings of a synthetic set (all its records', which must agree) and its
    pairs as (source mask, sample index, seed)."""
    records = json.loads((folder / "manifest-v1.json").read_text())["records"]
    samplers = {json.dumps(r["extra"]["sampler"], sort_keys=True) for r in records}
    if len(samplers) != 1:
        raise SystemExit(f"{folder}: its pairs were drawn with {len(samplers)} sampler settings")
    pairs = {
        (r["extra"]["source_id"], r["extra"]["sample_index"], r["extra"]["seed"]) for r in records
    }
    return json.loads(samplers.pop()), pairs


def same_but_scale(reference: Path, candidate: Path) -> dict:
    """The candidate set's sampler, once it is the reference's but for the control scale and
    both sets hold the same pairs; otherwise what differs, as an error."""
    (ref_sampler, ref_pairs), (sampler, pairs) = sample_set(reference), sample_set(candidate)
    differ = sorted(
        key
        for key in ref_sampler.keys() | sampler.keys()
        if key != "control_scale" and ref_sampler.get(key) != sampler.get(key)
    )
    if differ:
        raise SystemExit(f"{candidate} was sampled unlike {reference}: {', '.join(differ)} differ")
    if pairs != ref_pairs:
        raise SystemExit(
            f"{candidate} and {reference} hold different pairs "
            f"({len(pairs ^ ref_pairs)} not in both)"
        )
    return sampler


def arm_row(metrics: dict, scale: float) -> dict:
    """The numbers a row of the table shows, from one evaluation's metrics.json."""
    unet = metrics["utility"]["archs"]["unet"]
    matched = unet[MATCHED]["mdice"]["per_seed"]
    with_syn = unet["real+syn"]["mdice"]["per_seed"]
    return {
        "control_scale": scale,
        "fidelity_mdice": metrics["mask_fidelity"]["mdice"],
        "fd_seg": metrics["fd_seg"]["value"],
        "kid_seg": metrics["kid_seg"]["mean"],
        "ms_ssim": metrics["diversity"]["ms_ssim"]["mean"],
        "real_mdice": unet["real"]["mdice"],
        "real_matched_mdice": unet[MATCHED]["mdice"],
        "real_syn_mdice": unet["real+syn"]["mdice"],
        "steps": {name: unet[name]["steps"] for name in ("real", MATCHED, "real+syn")},
        "gain_mdice": unet["gain_mdice"],
        "gain_matched_steps_mdice": unet["gain_matched_steps_mdice"],
        "gain_matched_steps_miou": unet["gain_matched_steps_miou"],
        "seeds_ahead_of_matched": sum(b > a for a, b in zip(matched, with_syn, strict=True)),
        "seeds": len(matched),
    }


def per_image_change(before: dict, after: dict) -> dict:
    """How the same pairs' fidelity Dice moved between two scales (same seeds: same noise)."""
    ids = sorted(before["mask_fidelity"]["per_image"])
    changes = [
        after["mask_fidelity"]["per_image"][i]["dice"]
        - before["mask_fidelity"]["per_image"][i]["dice"]
        for i in ids
    ]
    return {
        "images": len(changes),
        "mean_dice_change": sum(changes) / len(changes),
        "images_improved": sum(change > 0 for change in changes),
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| arm | control scale | fidelity mDice | FD-seg | KID-seg | MS-SSIM | real + syn mDice "
        "| gain over real, same epochs | gain over real, matched steps | seeds ahead (matched) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['arm']} | {r['control_scale']:g} | {r['fidelity_mdice']:.3f} | {r['fd_seg']:.2f} "
        f"| {r['kid_seg']:.3f} | {r['ms_ssim']:.3f} | {format_mean_std(r['real_syn_mdice'])} "
        f"| {r['gain_mdice']:+.3f} | {r['gain_matched_steps_mdice']:+.3f} "
        f"| {r['seeds_ahead_of_matched']} of {r['seeds']} |"
        for r in rows
    ]
    return "\n".join(lines)


def main() -> None:
    parser = polyp.experiment_parser(__doc__)
    parser.add_argument("--polyp", type=Path, required=True, help="the polyp experiment's work")
    parser.add_argument("--arms", nargs="+", required=True)
    parser.add_argument("--control-scale", type=float, required=True)
    parser.add_argument("--command", required=True, help="the line that reruns the experiment")
    args = parser.parse_args()

    if args.control_scale == 1.0:
        raise SystemExit(
            "--control-scale 1 is the polyp experiment's own scale: nothing to compare"
        )
    places = {1.0: args.polyp, args.control_scale: args.work}
    rows, changes, baselines = [], {}, {}
    for arm in args.arms:
        sampler = same_but_scale(args.polyp / f"syn-{arm}", args.work / f"syn-{arm}")
        if sampler["control_scale"] != args.control_scale:
            raise SystemExit(f"{args.work / f'syn-{arm}'}: sampled at {sampler['control_scale']}")
        metrics = {
            scale: json.loads((work / f"eval-{arm}" / "metrics.json").read_text())
            for scale, work in places.items()
        }
        protocols = [m["utility"]["protocol"] for m in metrics.values()]
        if protocols[0] != protocols[1]:
            raise SystemExit(f"{arm}: the two evaluations ran different utility protocols")
        rows += [{"arm": arm} | arm_row(m, scale) for scale, m in metrics.items()]
        changes[arm] = per_image_change(metrics[1.0], metrics[args.control_scale])
        baselines[arm] = {
            name: [
                m["utility"]["archs"]["unet"][name]["mdice"]["per_seed"] for m in metrics.values()
            ]
            for name in ("real", MATCHED)
        }
    # The real-only runs depend on the data, protocol and (matched) step count, never on the
    # synthetic set's images: every evaluation should have retrained them to the same numbers.
    reproduced = all(runs[0] == runs[1] for arm in baselines.values() for runs in arm.values())
    results = {
        "experiment": "control_scale_utility",
        "command": args.command,
        "device": polyp.device_name(args.device),
        "models": f"polyp_siamese_vs_maskonly's ({POLYP_RESULTS['scale']}), from "
        f"{os.path.relpath(args.polyp.resolve(), REPO)}",
        "sampler": {k: v for k, v in sampler.items() if k != "control_scale"},
        "protocol": protocols[0],
        "rows": rows,
        "per_image_fidelity_change": changes,
        "real_only_runs_reproduced": reproduced,
    }
    atomic_write_json(args.out / "results.json", results)
    real, matched = rows[0]["real_mdice"], rows[0]["real_matched_mdice"]
    notes = args.out / "notes.md"
    columns = [f"{arm} c{scale:g}" for arm in args.arms for scale in places]
    text = (
        f"# ControlNet scale {args.control_scale:g} and segmentation utility\n\n"
        f"Device: {results['device']}. Models: {results['models']}.\n"
        f"Sampler: {results['sampler']} (control scale as in the table), 160 training masks x 2 "
        "seeds, the same pairs at both scales.\n"
        f"Reproduce: `{results['command']}`. Every number: `results.json`.\n\n"
        f"{table(rows)}\n\n"
        f"Real alone (U-Net, {protocols[0]['size']} px, seeds {protocols[0]['seeds']}): "
        f"{format_mean_std(real)} mDice at {rows[0]['steps']['real']} steps, "
        f"{format_mean_std(matched)} at {rows[0]['steps'][MATCHED]} steps (matched to real + "
        f"syn's {rows[0]['steps']['real+syn']}); "
        + (
            "every evaluation retrained them to the same numbers.\n\n"
            if reproduced
            else "NOT reproduced exactly across evaluations: see results.json.\n\n"
        )
        + "Per-image fidelity, same pairs at both scales: "
        + "; ".join(
            f"{arm} {c['mean_dice_change']:+.3f} Dice on average, {c['images_improved']} of "
            f"{c['images']} images improved"
            for arm, c in changes.items()
        )
        + ".\n\n"
        + f"![mask | real | {' | '.join(columns)}](samples.png)\n\n"
        + (notes.read_text() if notes.exists() else "")
    )
    atomic_write_text(args.out / "results.md", text)
    grids = [work / f"grid-{arm}" for arm in args.arms for work in places.values()]
    comparison_grid(args.out / "samples.png", args.polyp / "data", grids, count=polyp.GRID_MASKS)
    print(text)


if __name__ == "__main__":
    main()

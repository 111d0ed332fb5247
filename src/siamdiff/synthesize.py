"""``siamdiff sample``: a trained model + a dataset's masks -> a synthetic siamdiff dataset.

Output (``SYN``), the same layout and manifest as ``siamdiff prepare``, so ``verify``,
``stats`` and ``train`` read it::

    {source_id}-s{k:02d}.png        synthetic image k of source mask ``source_id``
    {source_id}-s{k:02d}_mask.png   the mask it was conditioned on (after mask augmentation)
    {source_id}-s{k:02d}_hint-H.png the extra hint maps it was conditioned on (docs/hints.md)
    manifest-v1.json                kind "synthetic"; written last, from the journal
    samples.png                     mask | real | synthetic for the first 8 masks
    export-{pranet,nnunet,folder}/  optional copies in other tools' layouts
    .settings.json                  what determines the bytes; a rerun must match it
    .journal-{rank}.jsonl           one fsync'd line per finished pair (resume)
    .journal-manifest.jsonl         the manifest's pairs, in a copy that lost its journals

Sampling is Mask-Diffusion only (method.md, "Sampling"); bf16 autocast on CUDA.

Determinism: sample ``k`` of source mask ``m`` draws its noise and its mask augmentation
from seeds derived from ``(seed, m, k)``, never from its batch position or rank. The
network's floating point does depend on the batch it runs in (kernels block matmuls by
batch size), so the job is cut into fixed batches, ``batch_size`` consecutive masks' sample
``k``, and each batch is always computed whole: the same command on the same device gives
the same bytes whatever the number of ranks or interruptions; another batch size, or on a
CPU another thread count (torchrun and accelerate give each process one thread; records name
it), moves some pixels by one grey level. A larger ``per_mask`` grows a set: samples 0 ..
``per_mask - 1`` fill the same batches whatever ``per_mask`` is, so the set's pairs are kept
and the grown set holds the bytes a fresh run would.

Resume: a pair counts as finished when its journal line exists and all its files (image,
mask, hint maps) still hash to it; a batch with an unfinished pair is recomputed and only
its unfinished pairs are written, each file atomically. The manifest is written last, from
the journals, once every pair is finished. A training run directory is sampled at its
newest checkpoint, exported to a temporary directory first.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F
from tqdm.auto import tqdm

from siamdiff.atomic import (
    JsonLinesJournal,
    atomic_output_dir,
    atomic_save_png,
    atomic_write_bytes,
    atomic_write_json,
    check_apart,
    check_replaceable,
    clear_removed,
    exclusive_writer,
    json_line,
    remove_tree,
)
from siamdiff.data.dataset import DEFAULT_VIEW, GeneratorView, PairedDataset, generator_views
from siamdiff.data.manifest import (
    MANIFEST_NAME,
    SPLITS,
    Manifest,
    Record,
    load_manifest,
    require_intact,
    save_pair,
    sha256_file,
    write_manifest,
)
from siamdiff.data.readers import HINT_DIR_PREFIX, HINT_MARK, load_mask, load_rgb
from siamdiff.data.transforms import lesion_centre
from siamdiff.errors import SiamdiffError, out_of_memory_error
from siamdiff.export import (
    META_NAME,
    LoadedModel,
    export_hints,
    export_run,
    load_export,
    read_export_meta,
    trained_on,
    weights_digest,
)
from siamdiff.models.backbone import TRAIN_TIMESTEPS
from siamdiff.models.dhi import BASE_HINT_CHANNELS, mask_to_hint
from siamdiff.models.speed import apply_levers, parse_levers
from siamdiff.report import save_sample_grid, to_uint8_rgb
from siamdiff.sample import SCHEDULERS, SOLVER_SPACING, ddim_sample, step_range

MASK_AUGMENTATIONS = ("flip", "scale", "shift")
FORMATS = ("pranet", "nnunet", "folder")
SETTINGS_NAME = ".settings.json"
MANIFEST_JOURNAL = ".journal-manifest.jsonl"  # a copy's manifest records, when it has no journal
GRID_NAME = "samples.png"
GRID_MASKS = 8
# Mask augmentation ranges: each flip with p = 0.5, scale about the lesion centre, shift
# of each axis as a fraction of the side.
FLIP_P = 0.5
SCALE_RANGE = (0.8, 1.2)
SHIFT_FRACTION = 0.1
MASK_AUG_TRIES = 8
NNUNET_LABELS = {"background": 0, "polyp": 1}
SAMPLE_RANK_WAIT = timedelta(days=2)  # the longest a rank waits for the others' batches
SAMPLER_KEYS = (
    "scheduler",
    "steps",
    "guidance",
    "control_scale",
    "eta",
    "mask_aug",
    "precision",
)
# What to change when a sampling batch does not fit in GPU memory (not a setting: see _batches).
MEMORY_ADVICE = "lower --batch-size; the pairs already written are kept and a rerun continues"
# Settings newer than some outputs on disk, with the value those outputs were made with.
LATER_SETTINGS = {"control_scale": 1.0}


def derived_seed(seed: int, source_id: str, sample_index: int, purpose: str) -> int:
    """A 63-bit seed from (global seed, source mask, sample index, purpose) via SHA-256."""
    key = f"{seed}/{source_id}/{sample_index}/{purpose}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") >> 1


def augment_mask(mask: Tensor, augmentations: Sequence[str], rng: np.random.Generator) -> Tensor:
    """A 1xSxS {0,1} mask flipped / scaled / shifted as ``augmentations`` ask, still binary.
    A (1+K)xSxS mask carries its K hint maps behind it: they move with it, values kept.

    Every draw is made whatever is enabled, so enabling one kind never changes another's.
    Flips (horizontal, vertical) with p = FLIP_P each; scale uniform in SCALE_RANGE about
    the lesion centre; shift uniform in +-SHIFT_FRACTION of the side, rounded to pixels.
    A draw that would push the whole lesion out of the frame (a polyp at the border) is
    drawn again, up to MASK_AUG_TRIES times, then the mask is kept as it is: a sample
    conditioned on an empty mask would be no lesion sample.
    """
    for _ in range(MASK_AUG_TRIES):
        augmented = _augment_once(mask, augmentations, rng)
        if augmented[0].any() or not (mask[0] > 0.5).any():
            return augmented
    return _augment_once(mask, (), rng)


def _augment_once(mask: Tensor, augmentations: Sequence[str], rng: np.random.Generator) -> Tensor:
    """One draw of :func:`augment_mask`."""
    flip_h, flip_v = rng.random(2) < FLIP_P
    scale = float(rng.uniform(*SCALE_RANGE))
    shift = [round(float(d)) for d in rng.uniform(-1, 1, 2) * SHIFT_FRACTION * mask.shape[-1]]
    if "flip" in augmentations:
        mask = mask.flip(-1) if flip_h else mask
        mask = mask.flip(-2) if flip_v else mask
    scale = scale if "scale" in augmentations else 1.0
    shift = shift if "shift" in augmentations else [0, 0]
    if scale != 1.0 or any(shift):
        row, col = lesion_centre(mask[0].numpy() > 0.5)
        mask = F.affine(
            mask,
            angle=0.0,
            translate=shift,
            scale=scale,
            shear=[0.0, 0.0],
            interpolation=InterpolationMode.NEAREST,
            center=[float(col), float(row)],
        )
    return torch.cat([(mask[:1] > 0.5).to(torch.float32), mask[1:]])


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from: an export directory, or a run's checkpoint."""

    export: Path | None
    run: Path | None
    checkpoint: str | None
    resolution: int
    identity: dict[str, Any]
    hints: tuple[str, ...] = ()
    crop: str = "crop"  # data.transforms.crop of its training: how its masks are framed
    weights: str | None = None  # SHA-256 of its model.safetensors (None: an older export)
    trained_on: dict[str, Any] | None = None  # export.trained_on (None: an older export)

    @property
    def label(self) -> str:
        if self.export is not None:
            return str(self.export)
        return str(self.run / "checkpoints" / self.checkpoint)

    def load(self, device: torch.device) -> LoadedModel:
        if self.export is not None:
            return load_export(self.export, device)
        with tempfile.TemporaryDirectory(prefix="siamdiff-sample-") as tmp:
            exported = export_run(
                self.run, Path(tmp) / "model", checkpoint=self.checkpoint, copy_autoencoder=False
            )
            return load_export(exported, device)


def resolve_model(path: str | Path) -> ModelSource:
    """An export directory (has siamdiff.json) or a training run (its newest checkpoint that
    passes its checksums)."""
    from siamdiff.config import RUN_CONFIG, load_config
    from siamdiff.train import checkpoints, last_valid_checkpoint  # the run layout's owner

    path = Path(path).resolve()
    meta_path = path / META_NAME
    if meta_path.is_file():
        # Checked whole now: what the samples' manifest records of it is read back by later
        # verbs, and a damaged field would otherwise surface only once the weights had loaded.
        meta = read_export_meta(path)
        identity = {k: meta.get(k) for k in ("source_run", "step", "autoencoder_identity")}
        hints = export_hints(meta, meta_path)
        resolution, crop = meta["resolution"], meta.get("crop", "crop")  # older: no crop
        weights, data = meta.get("weights_sha256"), meta.get("trained_on")
        return ModelSource(path, None, None, resolution, identity, hints, crop, weights, data)
    found = checkpoints(path) if path.is_dir() else []
    if not found:
        raise SiamdiffError(
            f"neither an export ({META_NAME}) nor a training run with checkpoints", path
        )
    cfg = load_config(path / RUN_CONFIG)
    chosen = last_valid_checkpoint(path)  # a damaged newest one is skipped, as on resume
    return ModelSource(
        None,
        path,
        chosen.name,
        int(cfg.data.transforms.size),
        {"checkpoint": chosen.name},
        tuple(cfg.data.hints),
        str(cfg.data.transforms.crop),
        weights_digest(chosen),
        trained_on(cfg, json.loads((chosen / "trainer_state.json").read_text())),
    )


def split_masks_argument(text: str) -> tuple[Path, str | None]:
    """The CLI's ``DATA[:split]`` -> (DATA, split): ``train`` without a suffix, ``None`` (every
    record) for ``:all``; a colon followed by anything else belongs to the path."""
    root, sep, split = text.rpartition(":")
    if sep and split in (*SPLITS, "all"):
        return Path(root), None if split == "all" else split
    if sep and not Path(text).exists() and (Path(root) / MANIFEST_NAME).is_file():
        raise SiamdiffError(  # a mistyped split, not a path with a colon
            f"unknown split {split!r} (choose {', '.join(SPLITS)} or all)", root
        )
    return Path(text), "train"


def pair_name(source_id: str, sample_index: int) -> str:
    """The file stem (and record id) of sample ``sample_index`` of mask ``source_id``."""
    return f"{source_id}-s{sample_index:02d}"


@dataclass
class SynthesisSummary:
    """What one ``synthesize`` call did; :meth:`format` is the CLI's report."""

    out: Path
    generated: int  # pairs written by this call
    reused: int  # pairs found finished (resume) and kept
    elapsed_s: float
    manifest_written: bool
    missing: int  # pairs of the whole job not yet finished (other ranks) when this call ended
    exports: dict[str, Path] = field(default_factory=dict)
    rank: int = 0
    world_size: int = 1

    def format(self) -> str:
        rate = self.generated / self.elapsed_s if self.elapsed_s > 0 else 0.0
        where = f" (rank {self.rank} of {self.world_size})" if self.world_size > 1 else ""
        lines = [
            f"wrote {self.generated} pairs to {self.out}{where}, kept {self.reused} finished "
            f"ones, in {self.elapsed_s:.1f} s ({rate:.2f} pairs/s)"
        ]
        if self.manifest_written:
            lines.append(f"manifest: {self.out / MANIFEST_NAME}; grid: {self.out / GRID_NAME}")
        elif self.rank == 0:
            lines.append(
                f"manifest not written yet: {self.missing} pairs are not finished "
                "(rerun the same command to complete them)"
            )
        lines += [f"export {name}: {path}" for name, path in self.exports.items()]
        return "\n".join(lines)


def _journal_line(record: Record) -> bytes:
    return json_line(asdict(record))


def _journal_from_manifest(out: Path) -> None:
    """A copy that lost its dotfiles still lists its pairs in its manifest: they become a
    journal again, to count as finished (the manifest goes once a rerun rewrites a pair)."""
    if any(out.glob(".journal-*.jsonl")) or _synthetic_manifest_settings(out) is None:
        return
    try:
        records = load_manifest(out).records
    except SiamdiffError:  # unreadable: its pairs are sampled again
        return
    atomic_write_bytes(out / MANIFEST_JOURNAL, b"".join(map(_journal_line, records)))


def _read_journals(out: Path) -> dict[str, list[Record]]:
    """Every parseable journal line of every rank, per pair (a pair rewritten by another rank
    or run has several); torn lines (killed runs) are skipped."""
    entries: dict[str, list[Record]] = defaultdict(list)
    for path in sorted(out.glob(".journal-*.jsonl")):
        for line in path.read_bytes().splitlines():  # decoded line by line: see below
            try:
                record = Record(**json.loads(line))
            except (json.JSONDecodeError, UnicodeDecodeError, TypeError):  # torn or garbled
                continue
            entries[record.id].append(record)
    return entries


def source_digest(source: Record, hints: Sequence[str]) -> dict[str, Any]:
    """What a synthetic pair was conditioned on: its source mask's and hint maps' hashes."""
    return {
        "mask": source.mask_sha256,
        "hints": {name: source.hints[name]["sha256"] for name in hints},
    }


def _source_key(source_id: str, digest: Mapping[str, Any]) -> str:
    """A source mask by id and content (:func:`source_digest`), comparable across runs."""
    return json.dumps([source_id, digest], sort_keys=True)


def _sampled_from(out: Path, manifest_settings: dict[str, Any] | None) -> set[str]:
    """The :func:`_source_key` of every pair ``out`` holds, finished (manifest) or journaled."""
    records = [r for entries in _read_journals(out).values() for r in entries]
    if manifest_settings is not None:
        records += load_manifest(out).records
    return {_source_key(r.extra.get("source_id", ""), _conditioned_on(r)) for r in records}


def _conditioned_on(record: Record) -> dict[str, Any]:
    return {"mask": record.source_sha256, "hints": record.extra.get("source_hints", {})}


def _finished(out: Path, expected: Mapping[str, dict[str, Any]]) -> dict[str, Record]:
    """The pairs among ``expected`` (pair id -> :func:`source_digest`) that a journal entry
    lists, conditioned on those very source files (a re-annotated mask is sampled anew), and
    whose files still match that entry."""
    entries = _read_journals(out)
    done = {}
    for pair_id, source in expected.items():
        for record in reversed(entries.get(pair_id, [])):
            if _conditioned_on(record) == source and all(
                (out / name).is_file() and sha256_file(out / name) == digest
                for name, digest in record.files()
            ):
                done[pair_id] = record
                break
    return done


def _synthetic_manifest_settings(out: Path) -> dict[str, Any] | None:
    """The sampling settings a synthetic manifest in ``out`` records, None without one."""
    try:
        manifest = json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8"))
        if manifest["kind"] == "synthetic":
            return dict(manifest["preprocessing"]["synthesis"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _check_out(
    out: Path, settings: dict[str, Any], overwrite: bool, selected: frozenset[str]
) -> None:
    """Refuse an ``out`` made by other settings (unless overwrite; a larger per_mask grows
    it). ``selected``: the :func:`_source_key` of the masks to sample. Paths may differ when
    content does not (a moved project). Reads only: every rank checks the same files before
    any writes, so they all fail or all go on together."""
    settings_path = out / SETTINGS_NAME
    if out.exists() and not out.is_dir():
        raise SiamdiffError("exists and is not a directory", out)
    recorded = _synthetic_manifest_settings(out) if out.is_dir() else None
    if out.exists() and any(out.iterdir()) and not (settings_path.is_file() or recorded):
        # A real dataset has a manifest too: never resumed into, never deleted by --overwrite.
        raise SiamdiffError(
            "exists and is not a siamdiff synthesis output; refusing to use it", out
        )
    if overwrite:
        if out.exists():
            check_replaceable(out)
        return
    # A copy that lost its dotfiles still names its settings in its manifest.
    previous: Any = recorded
    if settings_path.is_file():
        try:
            previous = json.loads(settings_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise SiamdiffError(f"cannot read ({exc})", settings_path) from exc
    journaled = any(path.stat().st_size for path in out.glob(".journal-*.jsonl"))
    if previous is not None and not (journaled or recorded):
        return  # settings of a run that failed before its first pair: nothing to keep
    if previous is not None:
        if not isinstance(previous, dict):
            raise SiamdiffError("is not a JSON object of sampling settings", settings_path)
        previous = LATER_SETTINGS | previous
        named_by_weights = "model_weights" in previous  # older sets: by its path alone
        for later in ("precision", "model_weights", "model_trained_on"):  # older lack them
            previous.setdefault(later, settings[later])
        if named_by_weights:  # the weights' SHA-256 is compared: the model's path may differ,
            # and what it learned from is recorded by path too (a run's data moved with it)
            previous["model"] = settings["model"]
            previous["model_trained_on"] = settings["model_trained_on"]
        # Masks elsewhere are the same masks if every pair here was sampled from one of them
        # (by id and hashes); at the same path a re-annotated mask is redone pair by pair.
        if previous.get("masks") != settings["masks"] and _sampled_from(out, recorded) <= selected:
            previous["masks"] = settings["masks"]
        if previous != settings:
            changed = sorted(
                k for k in settings.keys() | previous.keys() if previous.get(k) != settings.get(k)
            )
            if changed == ["per_mask"] and _grows(previous.get("per_mask"), settings["per_mask"]):
                return  # its pairs are the grown set's samples 0 .. previous - 1
            if changed == ["per_mask"]:
                raise SiamdiffError(
                    f"holds {previous.get('per_mask')} samples per mask: a set grows, never "
                    "shrinks; pass --overwrite to replace it or choose another output",
                    out,
                )
            verb = "differs" if len(changed) == 1 else "differ"
            raise SiamdiffError(
                f"was made with other settings ({', '.join(changed)} {verb}); "
                "pass --overwrite to replace it or choose another output",
                out,
            )


def _grows(previous: Any, per_mask: int) -> bool:
    return isinstance(previous, int) and 0 < previous < per_mask


def _create_out(out: Path, settings: dict[str, Any], overwrite: bool) -> None:
    clear_removed(out)
    if overwrite and out.exists():
        remove_tree(out)
    out.resolve().mkdir(parents=True, exist_ok=True)  # a symlink's target, gone if overwritten
    _journal_from_manifest(out)
    path = out / SETTINGS_NAME
    try:
        same = json.loads(path.read_text(encoding="utf-8")) == settings
    except (OSError, ValueError):
        same = False
    if not same:  # new, grown, or left by a run without a pair (all _check_out allows)
        atomic_write_json(path, settings)


def _wait_for_other_ranks(world_size: int) -> None:
    if world_size > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


def _batches(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _pair_fields(source: Record, source_root: Path, extra: dict) -> dict[str, Any]:
    """The manifest fields a synthetic pair inherits from its source mask's record, so that
    its split and group stay those of the source (group-disjointness survives)."""
    return {
        "dataset": source.dataset,
        "group": source.group,
        "frame": source.frame,
        "split": source.split,
        "source_mask": str(source_root / source.mask),
        "source_sha256": source.mask_sha256,
        "extra": extra,
    }


def _generate(
    loaded: LoadedModel,
    batches: list[list[tuple[int, int]]],
    done: set[str],
    masks: PairedDataset,
    out: Path,
    journal: JsonLinesJournal,
    settings: dict[str, Any],
    sampler: dict[str, Any],
    device: torch.device,
    progress: bool,
) -> int:
    """Sample each batch of (record index, sample index) with ``sampler``'s settings; write
    and journal the pairs not in ``done``. Returns the number of pairs written."""
    model = loaded.model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    # Under autocast like every other forward pass: with bf16_frozen weights outside it, CLIP
    # would run wholly in bf16.
    with torch.no_grad(), autocast:
        text, uncond = model.text([loaded.prompt]), model.text([""])
    todo = sum(pair_name(masks.records[i].id, k) not in done for b in batches for i, k in b)
    with tqdm(total=todo, desc="sample", unit="img", disable=not progress) as bar:
        for batch in batches:
            pairs, hints, generators = [], [], []
            for index, k in batch:
                source = masks.records[index]
                seed = derived_seed(settings["seed"], source.id, k, "noise")
                rng = np.random.default_rng(derived_seed(settings["seed"], source.id, k, "mask"))
                item = masks[index]
                channels = torch.cat([item["mask"], item["hints"]])
                channels = augment_mask(channels, sampler["mask_aug"], rng)
                extra = {
                    "source_id": source.id,
                    "seed": seed,
                    "sample_index": k,
                    "sampler": sampler,
                    "model": settings["model"],
                }
                if masks.hints:
                    extra["source_hints"] = source_digest(source, masks.hints)["hints"]
                pairs.append((pair_name(source.id, k), _pair_fields(source, masks.root, extra)))
                hints.append(mask_to_hint(channels[None, :1], channels[None, 1:])[0])
                # CPU generators: the same noise whatever the device samples on.
                generators.append(torch.Generator().manual_seed(seed))
            with autocast:
                latents = ddim_sample(
                    model,
                    torch.stack(hints).to(device),
                    text,
                    uncond,
                    steps=sampler["steps"],
                    guidance=sampler["guidance"],
                    control_scale=sampler["control_scale"],
                    eta=sampler["eta"],
                    generator=generators,
                    scheduler=sampler["scheduler"],
                )
                decoded = loaded.autoencoder.decode(latents)  # bf16 on CUDA, as the bench times it
            images = to_uint8_rgb(decoded).permute(0, 2, 3, 1).numpy()
            for (name, fields), image, hint in zip(pairs, images, hints, strict=True):
                if name in done:
                    continue
                mask = hint[0].numpy() > 0.5
                maps = (hint[BASE_HINT_CHANNELS:] * 255).round().to(torch.uint8).numpy()
                record = save_pair(
                    out,
                    name,
                    np.ascontiguousarray(image),
                    mask,
                    dict(zip(masks.hints, maps, strict=True)),
                    **fields,
                )
                journal.append(asdict(record))
                bar.update()
    return todo


def comparison_grid(
    path: str | Path,
    real_root: str | Path,
    synthetic_roots: Sequence[str | Path],
    *,
    split: str = "test",
    count: int = GRID_MASKS,
) -> None:
    """A PNG of mask | real | sample 0 of each synthetic dataset, for ``count`` masks of
    ``real_root``'s ``split`` spread over it: models or sampler settings side by side on the
    same masks (each synthetic dataset sampled from that split). A set sampled with mask
    augmentation has its own mask column before its samples: those are what they show."""
    roots = [Path(root) for root in synthetic_roots]
    manifests = [load_manifest(root) for root in roots]
    first = manifests[0]
    size = min(load_rgb(roots[0] / first.records[0].image).shape[:2])
    # The masks framed as the first set's model framed them (crop or pad) when sampling.
    framing = GeneratorView.of_synthesis(first.preprocessing.get("synthesis", {})).crop
    view = generator_views(real_root, split, size, view=GeneratorView(crop=framing))
    chosen = spread_subset(sorted(range(len(view)), key=lambda i: view.records[i].id), count)
    by_source = [
        {r.extra["source_id"]: r for r in manifest.records if r.extra["sample_index"] == 0}
        for manifest in manifests
    ]
    columns = [
        torch.stack([view[i]["mask"] for i in chosen]),
        torch.stack([view[i]["image"] for i in chosen]),
    ]
    for root, manifest, records in zip(roots, manifests, by_source, strict=True):
        missing = [view.records[i].id for i in chosen if view.records[i].id not in records]
        if missing:
            raise SiamdiffError(
                f"has no sample of mask {missing[0]} (sample the {split} split)", root
            )
        shown = [records[view.records[i].id] for i in chosen]
        if manifest.preprocessing.get("synthesis", {}).get("mask_aug"):
            columns.append(
                torch.stack(
                    [torch.from_numpy(load_mask(root / r.mask)).float()[None] for r in shown]
                )
            )
        images = [load_rgb(root / record.image) for record in shown]
        columns.append(
            torch.stack([torch.from_numpy(im.copy()).permute(2, 0, 1) for im in images]).float()
            / 127.5
            - 1
        )
    save_sample_grid(path, *columns)


def _write_grid(out: Path, masks: PairedDataset, indices: list[int]) -> None:
    """mask | real | synthetic of sample 0 of the first GRID_MASKS masks."""
    rows = []
    for index in indices[:GRID_MASKS]:
        name = pair_name(masks.records[index].id, 0)
        mask = torch.from_numpy(load_mask(out / f"{name}_mask.png")).float()[None]
        synthetic = torch.tensor(load_rgb(out / f"{name}.png")).permute(2, 0, 1)
        rows.append((mask, masks[index]["image"], synthetic.float() / 127.5 - 1))
    save_sample_grid(out / GRID_NAME, *(torch.stack(column) for column in zip(*rows, strict=True)))


def export_format(root: Path, records: Sequence[Record], fmt: str, dest: Path) -> Path:
    """Copy a synthetic set into another tool's layout at ``dest`` (replaced whole).

    ``pranet``: ``images/ID.png`` + ``masks/ID.png`` (0/255) (+ ``hint-H/ID.png``).
    ``folder``: ``ID.png`` + ``ID_mask.png`` (+ ``ID_hint-H.png``). Both are layouts
    ``siamdiff prepare`` reads back, extra hints included. ``nnunet``: an nnU-Net v2 raw
    dataset (``imagesTr/ID_0000.png`` RGB, ``labelsTr/ID.png`` with labels 0/1,
    ``dataset.json``) for segmentation, which the hints do not belong to; move it to
    ``nnUNet_raw/DatasetXXX_Name`` to use it.
    """
    with atomic_output_dir(dest, overwrite=True) as tmp:
        for record in records:
            image, mask = root / record.image, root / record.mask
            hints = {name: root / hint["file"] for name, hint in record.hints.items()}
            if fmt == "pranet":
                atomic_write_bytes(tmp / "images" / f"{record.id}.png", image.read_bytes())
                atomic_write_bytes(tmp / "masks" / f"{record.id}.png", mask.read_bytes())
                for name, path in hints.items():
                    destination = tmp / f"{HINT_DIR_PREFIX}{name}" / f"{record.id}.png"
                    atomic_write_bytes(destination, path.read_bytes())
            elif fmt == "folder":
                atomic_write_bytes(tmp / f"{record.id}.png", image.read_bytes())
                atomic_write_bytes(tmp / f"{record.id}_mask.png", mask.read_bytes())
                for name, path in hints.items():
                    destination = tmp / f"{record.id}{HINT_MARK}{name}.png"
                    atomic_write_bytes(destination, path.read_bytes())
            else:
                atomic_write_bytes(tmp / "imagesTr" / f"{record.id}_0000.png", image.read_bytes())
                label = load_mask(mask).astype(np.uint8)
                atomic_save_png(tmp / "labelsTr" / f"{record.id}.png", label)
        if fmt == "nnunet":
            atomic_write_json(
                tmp / "dataset.json",
                {
                    "channel_names": {"0": "R", "1": "G", "2": "B"},
                    "labels": NNUNET_LABELS,
                    "numTraining": len(records),
                    "file_ending": ".png",
                },
            )
    return dest


def _finalize(
    out: Path,
    masks: PairedDataset,
    indices: list[int],
    expected: Mapping[str, dict[str, Any]],
    settings: dict[str, Any],
    formats: Sequence[str],
) -> tuple[int, dict[str, Path]]:
    """Manifest, grid and exports once every pair is finished; (pairs missing, exports)."""
    ids = list(expected)
    done = _finished(out, expected)
    if len(done) < len(ids):
        return len(ids) - len(done), {}
    # Temporaries of writes killed mid-way (atomic_write_bytes names them ".NAME.*.tmp").
    for stale in out.glob(".*.tmp"):
        stale.unlink()
    records = [done[pair_id] for pair_id in ids]
    _write_grid(out, masks, indices)
    # Copies an earlier run made are rewritten too: a grown or re-sampled set beside a copy of
    # part of it would train another tool on that part. Before the manifest, which says the
    # set, copies included, is finished.
    formats = [f for f in FORMATS if f in formats or (out / f"export-{f}").is_dir()]
    exports = {fmt: export_format(out, records, fmt, out / f"export-{fmt}") for fmt in formats}
    write_manifest(
        out,
        Manifest(records=records, kind="synthetic", preprocessing={"synthesis": settings}),
    )
    return 0, exports


def _check_arguments(
    per_mask: int,
    steps: int,
    guidance: float,
    control_scale: float,
    eta: float,
    scheduler: str,
    mask_aug: Sequence[str],
    batch_size: int,
    formats: Sequence[str],
    rank: int,
    world_size: int,
    limit: int | None,
) -> None:
    lowest, highest = step_range(scheduler, TRAIN_TIMESTEPS)
    problems = [
        (per_mask < 1, f"--per-mask must be at least 1, got {per_mask}"),
        (
            not lowest <= steps <= highest,
            f"--steps must be {lowest}..{highest} for {scheduler}, got {steps}"
            + (
                f" (dpmsolver++ and unipc take 1..{TRAIN_TIMESTEPS - 1})"
                if scheduler == "ddim"
                else ""
            ),
        ),
        (
            not 0 <= guidance < float("inf"),
            f"--guidance must be a finite number >= 0, got {guidance}",
        ),
        (not 0 <= eta <= 1, f"--eta must be in [0, 1] (0: DDIM, 1: DDPM-like), got {eta}"),
        (
            not 0 <= control_scale < float("inf"),
            f"--control-scale must be a finite number >= 0, got {control_scale}",
        ),
        (batch_size < 1, f"--batch-size must be at least 1, got {batch_size}"),
        (limit is not None and limit < 1, f"--limit must be at least 1, got {limit}"),
        (scheduler not in SCHEDULERS, f"unknown scheduler {scheduler!r} ({', '.join(SCHEDULERS)})"),
        (bool(eta) and scheduler != "ddim", f"eta applies to ddim only, not {scheduler!r}"),
        (not 0 <= rank < world_size, f"rank {rank} is not in 0..{world_size - 1}"),
    ]
    problems += [
        (
            name not in MASK_AUGMENTATIONS,
            f"unknown mask augmentation {name!r} ({', '.join(MASK_AUGMENTATIONS)})",
        )
        for name in mask_aug
    ]
    problems += [
        (fmt not in FORMATS, f"unknown export format {fmt!r} ({', '.join(FORMATS)})")
        for fmt in formats
    ]
    for failed, message in problems:
        if failed:
            raise SiamdiffError(message)


def spread_subset(items: Sequence[int], limit: int | None) -> list[int]:
    """``limit`` items at evenly spaced positions of ``items`` (all of them when ``None``)."""
    if limit is None or limit >= len(items):
        return list(items)
    return [items[(k * len(items)) // limit] for k in range(limit)]


def synthesize(
    model_path: str | Path,
    masks_root: str | Path,
    out: str | Path,
    *,
    split: str | None = "train",
    per_mask: int = 1,
    steps: int = 50,
    guidance: float = 9.0,
    control_scale: float = 1.0,
    eta: float = 0.0,
    seed: int = 42,
    scheduler: str = "ddim",
    mask_aug: Sequence[str] = (),
    batch_size: int = 8,
    device: str | torch.device | None = None,
    formats: Sequence[str] = (),
    overwrite: bool = False,
    rank: int = 0,
    world_size: int = 1,
    limit: int | None = None,
    progress: bool = True,
    speed: Sequence[str] | str = (),
    verify: bool = True,
) -> SynthesisSummary:
    """Write ``per_mask`` synthetic pairs per mask of ``masks_root``'s ``split`` into ``out``.

    ``split=None`` takes every record; ``limit`` keeps ``limit`` masks spread evenly over the
    id-sorted split (ids group by source dataset, so a prefix would take one dataset). Reruns
    resume; other settings on an existing ``out`` are refused unless ``overwrite``. With
    ``world_size > 1`` this process does batches ``j % world_size == rank``; after a barrier
    (accelerate's, when launched distributed) rank 0 writes the manifest if every pair is
    finished; otherwise rerunning the command (any world size) finishes it. ``speed`` names
    levers of :mod:`siamdiff.models.speed` (``bf16_frozen``: CUDA only); like the batch size
    they may move a pixel by a rounding step, and each record names them. ``verify``: the
    masks dataset is refused up front when its files no longer match its manifest.
    """
    started = time.perf_counter()
    out = Path(out)
    _check_arguments(
        per_mask,
        steps,
        guidance,
        control_scale,
        eta,
        scheduler,
        mask_aug,
        batch_size,
        formats,
        rank,
        world_size,
        limit,
    )
    mask_aug = tuple(a for a in MASK_AUGMENTATIONS if a in mask_aug)  # canonical order
    levers = parse_levers(speed)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if "bf16_frozen" in levers and device.type != "cuda":
        raise SiamdiffError("speed lever bf16_frozen needs a CUDA device (bf16 autocast)")
    source = resolve_model(model_path)
    masks_root = Path(masks_root).resolve()
    check_apart(out, masks_root, "the masks dataset")
    check_apart(out, model_path, "the model")  # an export --overwrite would delete the pairs
    if verify:  # an unreadable file would stop the job half-way, an edited one go unnoticed
        require_intact(masks_root, "pass --no-verify")
    settings = {
        "model": source.label,
        "model_identity": source.identity,
        # A run trained again at the same path, or re-exported over: other weights, same names.
        "model_weights": source.weights,
        "model_trained_on": source.trained_on,
        "masks": str(masks_root),
        "split": split,
        "limit": limit,
        "per_mask": per_mask,
        "resolution": source.resolution,
        "steps": steps,
        "guidance": float(guidance),
        "control_scale": float(control_scale),
        "eta": float(eta),
        "seed": seed,
        "scheduler": scheduler,
        "mask_aug": list(mask_aug),
        # bf16 autocast on CUDA, fp32 elsewhere: a job resumed on the other must not mix them.
        "precision": "bf16" if device.type == "cuda" else "fp32",
    }
    if scheduler != "ddim":  # sets of older versions sampled exports "leading": not resumed
        settings["timestep_spacing"] = SOLVER_SPACING
    view = GeneratorView(crop=source.crop)
    if view.crop != DEFAULT_VIEW.crop:  # absent = crop: outputs made before stay resumable
        settings["crop"] = view.crop
    masks = generator_views(masks_root, split, source.resolution, source.hints, view)
    indices = spread_subset(
        sorted(range(len(masks.records)), key=lambda i: masks.records[i].id), limit
    )
    selected = frozenset(
        _source_key(masks.records[i].id, source_digest(masks.records[i], masks.hints))
        for i in indices
    )
    # Before --out is made: damaged weights must leave nothing behind.
    loaded = source.load(device)
    apply_levers(loaded.model, levers, loaded.autoencoder)
    with exclusive_writer(out, rank, "siamdiff sample"):
        _check_out(out, settings, overwrite, selected)
        _wait_for_other_ranks(world_size)
        if rank == 0:
            _create_out(out, settings, overwrite)
        _wait_for_other_ranks(world_size)

        every = [(i, k) for i in indices for k in range(per_mask)]
        names = {item: pair_name(masks.records[item[0]].id, item[1]) for item in every}
        # Batches are fixed slices of each sample index's masks, dealt to the ranks in turn: a
        # pair is always computed in the same batch, whatever the rank count, interruptions or
        # growth, so floating point gives the same bytes. (Another batch size may move a pixel
        # by one rounding step.)
        job = [b for k in range(per_mask) for b in _batches([(i, k) for i in indices], batch_size)]
        mine = job[rank::world_size]
        expected = {
            names[item]: source_digest(masks.records[item[0]], masks.hints) for item in every
        }
        done = set(_finished(out, {names[i]: expected[names[i]] for b in mine for i in b}))
        work = [batch for batch in mine if any(names[item] not in done for item in batch)]
        generated = 0
        if work:
            # A rerun rewriting pairs (an edited source mask, a damaged file) is unfinished
            # until its manifest is written again: an interrupted one must not look whole.
            (out / MANIFEST_NAME).unlink(missing_ok=True)
            with contextlib.closing(JsonLinesJournal(out / f".journal-{rank}.jsonl")) as journal:
                sampler = {key: settings[key] for key in SAMPLER_KEYS} | {
                    "batch_size": batch_size,
                    "speed": list(levers),
                }
                if device.type == "cpu":  # CPU kernels split work by thread: their rounding
                    sampler["cpu_threads"] = torch.get_num_threads()
                try:
                    generated = _generate(
                        loaded, work, done, masks, out, journal, settings, sampler, device, progress
                    )
                except torch.OutOfMemoryError as exc:
                    raise out_of_memory_error(exc, MEMORY_ADVICE, out) from exc

        _wait_for_other_ranks(world_size)
        missing, exports = 0, {}
        if rank == 0:
            missing, exports = _finalize(out, masks, indices, expected, settings, formats)
        return SynthesisSummary(
            out=out,
            generated=generated,
            reused=len(done),
            elapsed_s=time.perf_counter() - started,
            manifest_written=rank == 0 and missing == 0,
            missing=missing,
            exports=exports,
            rank=rank,
            world_size=world_size,
        )

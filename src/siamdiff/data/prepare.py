"""``siamdiff prepare``: raw public datasets -> one resized, hashed, split siamdiff dataset.

Output (``DATA``): ``{dataset}-{group}-{frame}.png`` (RGB) and ``..._mask.png`` (0/255 grey)
with the shorter side resized to ``size``, ``manifest-v1.json`` and ``prepare-summary.json``
(counts and every skipped file with its reason). DATA appears whole or not at all.
"""

from __future__ import annotations

import functools
import multiprocessing
import re
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from siamdiff.atomic import atomic_output_dir, atomic_write_json, check_apart
from siamdiff.data.manifest import (
    MANIFEST_NAME,
    POOLED_ROW,
    SPLITS,
    Manifest,
    Record,
    hint_names,
    load_manifest,
    next_dataset_version,
    save_pair,
    sha256_file,
    write_manifest,
)
from siamdiff.data.readers import (
    BINARY_HINT,
    LEVEL_ONE_HINT,
    MASK_THRESHOLD,
    SourcePair,
    UnreadableImageError,
    load_label_map,
    load_mask,
    load_rgb,
    read_hint,
    read_source,
    turned_by_exif,
)
from siamdiff.data.split import DEFAULT_FRACTIONS, split_of
from siamdiff.errors import SiamdiffError

SUMMARY_NAME = "prepare-summary.json"
MIN_SIZE, MAX_SIZE = 8, 4096  # the shorter side, pixels (SD v1.5 works at 512)
EMPTY_MASK = "empty mask (dropped by --drop-empty)"
SHOWN_REASONS = 4  # skip reasons on the summary line
PATH_IN_REASON = re.compile(r"'[^']*'|[^\s()']*/[^\s()']*")  # a quoted name, or a path


@dataclass
class PrepareSummary:
    """What ``prepare`` did: written to ``prepare-summary.json``, printed via :meth:`format`."""

    out: Path
    dataset_version: str
    counts: dict[str, dict[str, int]]  # dataset -> split -> pairs written
    skipped: list[tuple[str, str]]  # (file, reason)
    empty_masks: int  # kept with coverage 0, or dropped under drop_empty
    elapsed_s: float
    hints: list[str] = field(default_factory=list)  # extra hint maps of every pair
    records: int = field(init=False)

    def __post_init__(self) -> None:
        self.records = sum(sum(c.values()) for c in self.counts.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "dataset_version": self.dataset_version,
            "records": self.records,
            "counts": self.counts,
            "empty_masks": self.empty_masks,
            "hints": self.hints,
            "skipped": [{"file": f, "reason": r} for f, r in self.skipped],
            "elapsed_s": round(self.elapsed_s, 2),
        }

    def format(self) -> str:
        lines = [
            f"wrote {self.records} pairs to {self.out} "
            f"(dataset version {self.dataset_version}, {self.elapsed_s:.1f} s)"
        ]
        for dataset, counts in sorted(self.counts.items()):
            splits = ", ".join(f"{s} {n}" for s, n in counts.items())
            lines.append(f"  {dataset}: {splits}")
        lines.append(f"empty masks: {self.empty_masks}")
        if self.hints:
            lines.append(f"extra hints: {', '.join(self.hints)}")
        if self.skipped:
            # Reasons without the paths they name (900 duplicates were 900 reasons on one line
            # of 100 KB), the commonest few; every file and reason is in the summary file.
            reasons = Counter(PATH_IN_REASON.sub("…", reason) for _, reason in self.skipped)
            shown = reasons.most_common(SHOWN_REASONS)
            detail = "; ".join(f"{n} {r}" for r, n in shown)
            if len(reasons) > len(shown):
                detail += f"; {len(reasons) - len(shown)} other reasons"
            lines.append(f"skipped {len(self.skipped)} files ({detail}); see {SUMMARY_NAME}")
        return "\n".join(lines)


def _resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    scale = size / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def resize_pair(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Shorter side -> ``size``, aspect kept. Image: Lanczos. Mask: bilinear on 0/1 floats, >= 0.5.

    A mask pixel is lesion when at least half of what it covers is: its outline follows the
    lesion's area wherever the lesion lies, where nearest-neighbour keeps or drops a thin
    structure by where it falls on the sampling grid.
    """
    target = _resized_size(image.shape[1], image.shape[0], size)
    rgb = np.asarray(Image.fromarray(image).resize(target, Image.Resampling.LANCZOS))
    soft = Image.fromarray(mask.astype(np.float32)).resize(target, Image.Resampling.BILINEAR)
    return rgb, np.asarray(soft) >= 0.5


def resize_hint(hint: np.ndarray, size: int) -> np.ndarray:
    """Shorter side -> ``size``, bilinear: a hint may be grey-level (a distance or depth map)."""
    target = _resized_size(hint.shape[1], hint.shape[0], size)
    return np.asarray(Image.fromarray(hint).resize(target, Image.Resampling.BILINEAR))


class Prepared(NamedTuple):
    """A pair written, and how each of its hint maps was read (checked across pairs)."""

    record: Record
    hint_readings: dict[str, str]


def _process_pair(
    pair: SourcePair, out: Path, size: int, threshold: int, drop_empty: bool, image_bits: int
) -> Prepared | tuple[str, str]:
    """Write one resized pair into ``out``; a (file, reason) tuple when it has to be skipped."""
    try:
        image = load_rgb(pair.image, image_bits)
        if pair.labels is None:
            mask = load_mask(pair.mask, threshold)
        else:
            mask = load_label_map(pair.mask, *pair.labels)
        read = {name: read_hint(path) for name, path in pair.hints}
        hints = {name: hint for name, (hint, _) in read.items()}
    except UnreadableImageError as exc:
        return str(exc.path), exc.reason
    h, w = image.shape[:2]
    if mask.shape != (h, w):
        reason = f"image {w}x{h} but mask {mask.shape[1]}x{mask.shape[0]}"
        if turned_by_exif(pair.image) != turned_by_exif(pair.mask):
            reason += " (one is turned by its EXIF orientation, the other is not)"
        return str(pair.image), reason
    for name, path in pair.hints:
        hint_h, hint_w = hints[name].shape
        if (hint_h, hint_w) != (h, w):
            return str(path), f"image {w}x{h} but hint {hint_w}x{hint_h}"
    image, mask = resize_pair(image, mask, size)
    if drop_empty and not mask.any():
        return str(pair.mask), EMPTY_MASK
    record = save_pair(
        out,
        pair.id,
        image,
        mask,
        {name: resize_hint(hint, size) for name, hint in hints.items()},
        dataset=pair.dataset,
        group=pair.group,
        frame=pair.frame,
        split=split_of(pair.dataset, pair.group, DEFAULT_FRACTIONS),
        source_image=str(pair.image),
        source_mask=str(pair.mask),
        source_sha256=sha256_file(pair.image),
        extra={
            "source_mask_sha256": sha256_file(pair.mask),
            "source_hints_sha256": {name: sha256_file(path) for name, path in pair.hints},
        },
    )
    return Prepared(record, {name: how for name, (_, how) in read.items() if how})


def _run(
    job: Callable[[SourcePair], Prepared | tuple[str, str]],
    pairs: list[SourcePair],
    workers: int,
    progress: bool,
) -> list[Prepared | tuple[str, str]]:
    """``job`` over ``pairs`` in order: in this process when ``workers <= 1``, else a pool."""
    bar = tqdm(total=len(pairs), desc="prepare", unit="pair", disable=not progress)
    with bar:
        if workers <= 1:
            return [_tick(bar, job(pair)) for pair in pairs]
        # spawn, not fork: the parent may hold threads (torch, tqdm) that fork would copy.
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        try:
            return [_tick(bar, r) for r in pool.map(job, pairs, chunksize=8)]
        except BrokenProcessPool as exc:
            raise SiamdiffError(
                "a worker process died (out of memory?); try again with one worker"
            ) from exc
        finally:
            pool.shutdown(cancel_futures=True)


def _tick(bar: tqdm, result: Any) -> Any:
    bar.update()
    return result


def _strict_error(reason: str, path: str | Path, problems: int = 1) -> SiamdiffError:
    """The first problem --strict met, and where to see them all."""
    first = f"the first of {problems} in this source" if problems > 1 else "--strict stops here"
    return SiamdiffError(
        f"{reason} ({first}; without --strict each problem is skipped and listed in "
        f"{SUMMARY_NAME})",
        path,
    )


def _collect_pairs(
    sources: list[tuple[str, Path]], strict: bool
) -> tuple[list[SourcePair], list[tuple[str, str]]]:
    pairs: dict[str, SourcePair] = {}
    skipped: list[tuple[str, str]] = []
    for kind, root in sources:
        result = read_source(kind, Path(root))
        if strict and result.skipped:
            path, reason = result.skipped[0]
            raise _strict_error(reason, path, len(result.skipped))
        skipped += [(str(path), reason) for path, reason in result.skipped]
        for pair in result.pairs:
            if pair.dataset == POOLED_ROW:
                raise SiamdiffError(
                    f"dataset name {POOLED_ROW!r} is reserved (the stats tables' pooled row); "
                    "rename the folder or file",
                    pair.image,
                )
            if pair.id in pairs:
                raise SiamdiffError(
                    f"output name {pair.id!r} also comes from {pairs[pair.id].image}", pair.image
                )
            pairs[pair.id] = pair
    _check_same_hints(list(pairs.values()))
    return list(pairs.values()), skipped


def _check_same_hints(pairs: list[SourcePair]) -> None:
    """The model conditions every image on the same hint channels: refuse a mix."""
    if not pairs:
        return
    first = [name for name, _ in pairs[0].hints]
    for pair in pairs[1:]:
        names = [name for name, _ in pair.hints]
        if names != first:
            raise SiamdiffError(
                f"has hints {names} but {pairs[0].image} has {first}: every pair of a dataset "
                "needs the same hints",
                pair.image,
            )


def _check_hint_levels(prepared: list[Prepared]) -> None:
    """Refuse a hint whose level 1 means 255 in some maps (0/1 class maps) and 1 in others
    (maps of more levels)."""
    for name in hint_names([record for record, _ in prepared]):
        binary = [r for r, read in prepared if read.get(name) == BINARY_HINT]
        graded = [r for r, read in prepared if read.get(name) == LEVEL_ONE_HINT]
        if binary and graded:
            raise SiamdiffError(
                f"hint {name!r} holds only 0 and 1 in the map of {binary[0].source_image} "
                f"(read as a 0/255 class map) but more levels, 1 among them, in the map of "
                f"{graded[0].source_image}: level 1 would mean 255 in one and 1 in the other; "
                "give the maps one scale (a class map of several classes: class x 80, say)",
            )


def _without_duplicates(
    records: list[Record],
    root: Path,
    skipped: list[tuple[str, str]],
    strict: bool,
    previous: Manifest | None = None,
) -> list[Record]:
    """Each image once, and every group that shares an image in one split.

    A frame in two sources (PraNet's training set holds Kvasir-SEG and CVC-ClinicDB frames)
    would count twice and could land in train and test, a leak. The copy with the first id
    is kept, whatever the source order; and since its group may differ from the other
    copy's (PraNet's per-image group, CVC-ClinicDB's video sequence), the groups joined by
    shared images take one split together: no sequence is spread over two splits.
    Identical pixels give identical prepared bytes.

    Against the ``previous`` manifest of the output, a copy it already held is the one kept
    and joined groups that held a training frame stay in train (else they keep the split
    most of their frames had): adding a source moves no training frame into the validation
    or test split of a model trained on the previous version.
    """
    before = {} if previous is None else {r.id: r for r in previous.records}
    was_in = {(r.dataset, r.group): r.split for r in before.values()}
    # A frame renamed since (a new file sanitising to its name gave it a hash suffix) is
    # found by its bytes, or it would be split anew and a training frame could go to test.
    image_was_in = {r.image_sha256: r.split for r in before.values()}
    parent: dict[tuple[str, str], tuple[str, str]] = {}

    def root_of(key: tuple[str, str]) -> tuple[str, str]:
        while parent.setdefault(key, key) != key:
            key = parent[key]
        return key

    first: dict[str, Record] = {}
    for record in sorted(records, key=lambda r: (r.id not in before, r.id)):
        kept = first.setdefault(record.image_sha256, record)
        a, b = root_of((kept.dataset, kept.group)), root_of((record.dataset, record.group))
        parent[max(a, b)] = min(a, b)
    earlier: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    for record in records:
        key = (record.dataset, record.group)
        previous_split = was_in.get(key) or image_was_in.get(record.image_sha256)
        if previous_split:
            earlier[root_of(key)][previous_split] += 1

    def split(dataset: str, group: str) -> str:
        counts = earlier.get((dataset, group))
        if counts and counts["train"]:
            return "train"
        if counts:  # the most frames' previous split; ties by SPLITS order
            return max(SPLITS, key=lambda s: (counts[s], -SPLITS.index(s)))
        return split_of(dataset, group, DEFAULT_FRACTIONS)

    kept_records = []
    for record in records:
        original = first[record.image_sha256]
        if original is not record:
            reason = f"same image as {original.source_image} (kept once: no frame in two splits)"
            if strict:
                raise _strict_error(reason, record.source_image)
            for name, _ in record.files():
                (root / name).unlink()
            skipped.append((record.source_image, reason))
            continue
        kept_records.append(replace(record, split=split(*root_of((record.dataset, record.group)))))
    return kept_records


def _previous_manifest(out: Path, overwrite: bool) -> Manifest | None:
    """The manifest that ``overwrite`` replaces; never replace something that is not a dataset."""
    if not (overwrite and out.exists()):
        return None
    if (out / MANIFEST_NAME).is_file():
        try:
            return load_manifest(out)
        except SiamdiffError as exc:  # its version cannot be bumped from an unreadable one
            raise SiamdiffError(
                f"{exc} (the dataset to replace: delete it to prepare anew)", out
            ) from exc
    if out.is_dir() and not any(out.iterdir()):
        return None
    raise SiamdiffError(f"exists and has no {MANIFEST_NAME}; refusing to replace it", out)


def _counts(records: list[Record]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for record in records:
        counts.setdefault(record.dataset, dict.fromkeys(SPLITS, 0))[record.split] += 1
    return dict(sorted(counts.items()))


def prepare(
    sources: list[tuple[str, Path]],
    out: Path,
    size: int = 384,
    *,
    mask_threshold: int = MASK_THRESHOLD,
    image_bits: int = 16,
    overwrite: bool = False,
    strict: bool = False,
    drop_empty: bool = False,
    workers: int = 2,
    progress: bool = True,
) -> PrepareSummary:
    """Read every ``(kind, directory)`` source and write one siamdiff dataset to ``out``.

    Unpaired, unreadable or size-mismatched files, and images already given by an earlier
    pair or source, are skipped and listed in ``prepare-summary.json`` (``strict=True``:
    the first one is a SiamdiffError instead).
    Images stored in more than 8 bits are scaled from ``0..2**image_bits - 1`` (12: 12-bit
    data in 16-bit files); masks are read by their own rules. Masks that are empty after
    resizing are kept with coverage 0, or dropped with
    ``drop_empty``. Replacing a dataset (``overwrite``) bumps its version: major when the
    raw images changed, minor when only the preprocessing did. ``workers <= 1`` runs in
    this process.
    """
    started = time.perf_counter()
    out = Path(out)
    if not MIN_SIZE <= size <= MAX_SIZE:
        # Above it, frames of a few hundred pixels would be blown up to gigabytes each.
        raise SiamdiffError(f"size must be {MIN_SIZE}..{MAX_SIZE} pixels, got {size}")
    if not 1 <= mask_threshold <= 255:
        raise SiamdiffError(f"mask threshold must be in 1..255, got {mask_threshold}")
    if not 8 <= image_bits <= 16:
        raise SiamdiffError(f"image bits must be in 8..16, got {image_bits}")
    if not sources:
        raise SiamdiffError("no source given")
    for kind, root in sources:  # --overwrite would delete a source inside --out
        check_apart(out, root, f"the {kind} source")
    previous = _previous_manifest(out, overwrite)
    preprocessing = {
        "size": size,
        "resize": "shorter-side",
        "image_filter": "lanczos",
        "mask_threshold": mask_threshold,
        "mask_resize": "bilinear>=0.5",
        "drop_empty": drop_empty,
        "split": {"method": "sha256(dataset/group)", "fractions": list(DEFAULT_FRACTIONS)},
    }
    if image_bits != 16:  # recorded when set: a dataset re-prepared as before keeps its version
        preprocessing["image_bits"] = image_bits
    try:
        with atomic_output_dir(out, overwrite=overwrite) as tmp:
            pairs, skipped = _collect_pairs(sources, strict)
            job = functools.partial(
                _process_pair,
                out=tmp,
                size=size,
                threshold=mask_threshold,
                drop_empty=drop_empty,
                image_bits=image_bits,
            )
            prepared: list[Prepared] = []
            for result in _run(job, pairs, workers, progress):
                if isinstance(result, Prepared):
                    prepared.append(result)
                elif strict and result[1] != EMPTY_MASK:
                    raise _strict_error(result[1], result[0])
                else:
                    skipped.append(result)
            _check_hint_levels(prepared)
            records = [record for record, _ in prepared]
            records = _without_duplicates(records, tmp, skipped, strict, previous)
            if not records:
                why = ""
                if skipped:
                    why = f": {len(skipped)} skipped, first {skipped[0][0]}: {skipped[0][1]}"
                raise SiamdiffError(
                    f"no usable image-mask pairs in the sources{why}", sources[0][1]
                )
            manifest = Manifest(records=records, preprocessing=preprocessing)
            manifest.dataset_version = next_dataset_version(previous, manifest)
            write_manifest(tmp, manifest)
            dropped = sum(reason == EMPTY_MASK for _, reason in skipped)
            summary = PrepareSummary(
                out=out,
                dataset_version=manifest.dataset_version,
                counts=_counts(records),
                skipped=skipped,
                empty_masks=dropped + sum(r.coverage == 0 for r in records),
                elapsed_s=time.perf_counter() - started,
                hints=hint_names(records),
            )
            atomic_write_json(tmp / SUMMARY_NAME, summary.to_json())
    except OSError as exc:  # a full disk or a read-only parent, met while writing
        raise SiamdiffError(f"cannot write the dataset ({exc.strerror or exc})", out) from exc
    summary.elapsed_s = time.perf_counter() - started
    return summary

"""``manifest-v1.json``: the one place that knows the dataset manifest format.

Every dataset siamdiff writes (prepared real data, synthetic sets) carries this
manifest, so every verb can read every other verb's output.

Layout::

    {
      "format": "siamdiff-manifest", "format_version": 1,
      "dataset_version": "1.0",      # major: raw data added/removed; minor: preprocessing changed
      "kind": "real" | "synthetic",
      "created_by": "siamdiff 0.1.0",
      "preprocessing": {...},        # everything that determines the bytes of the files
      "records": [Record, ...]       # sorted by id
    }
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from siamdiff import __version__
from siamdiff.atomic import atomic_save_png, atomic_write_json, read_json
from siamdiff.data.readers import HINT_MARK
from siamdiff.errors import SiamdiffError

MANIFEST_NAME = "manifest-v1.json"
FORMAT = "siamdiff-manifest"
FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
POOLED_ROW = "all"  # reserved: no dataset may take the name of the stats tables' pooled row
# Files siamdiff itself may keep beside the data; verify does not report them as extra.
ANCILLARY_FILES = frozenset({"stats.json", "stats.png", "prepare-summary.json", "samples.png"})
# Folders of re-exported copies (`siamdiff sample --format`), not part of the dataset itself.
EXPORT_PREFIX = "export-"


def _in_export_folder(relative: str) -> bool:
    """Whether a file lies in a top-level ``export-*`` folder (a file so named does not)."""
    parts = Path(relative).parts
    return len(parts) > 1 and parts[0].startswith(EXPORT_PREFIX)


@dataclass(frozen=True)
class Record:
    """One image-mask pair, as written to disk. Paths are relative to the dataset root."""

    id: str
    image: str
    mask: str
    image_sha256: str
    mask_sha256: str
    dataset: str
    group: str
    frame: str
    split: str
    coverage: float
    width: int
    height: int
    source_image: str = ""
    source_mask: str = ""
    source_sha256: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def hints(self) -> dict[str, dict[str, str]]:
        """Extra hint maps: name -> ``{"file", "sha256"}`` (``extra["hints"]``, docs/hints.md)."""
        return self.extra.get("hints", {})

    def files(self) -> list[tuple[str, str]]:
        """(file, sha256) of every file of this record: image, mask, then each hint."""
        return [
            (self.image, self.image_sha256),
            (self.mask, self.mask_sha256),
            *((h["file"], h["sha256"]) for _, h in sorted(self.hints.items())),
        ]


@dataclass
class Manifest:
    records: list[Record]
    preprocessing: dict[str, Any]
    kind: str = "real"
    dataset_version: str = "1.0"
    created_by: str = f"siamdiff {__version__}"

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "dataset_version": self.dataset_version,
            "kind": self.kind,
            "created_by": self.created_by,
            "preprocessing": self.preprocessing,
            "records": [asdict(r) for r in sorted(self.records, key=lambda r: r.id)],
        }

    def split(self, name: str | None) -> list[Record]:
        """The records of split ``name``; every record for None."""
        return list(self.records) if name is None else [r for r in self.records if r.split == name]

    def images_fingerprint(self, split: str | None) -> str:
        """SHA-256 over the sorted image hashes of ``split``: names the exact images a model
        learned from, under any folder name (a renamed or copied dataset)."""
        digests = sorted(record.image_sha256 for record in self.split(split))
        return sha256_bytes("\n".join(digests).encode())


def save_pair(
    root: str | Path,
    record_id: str,
    image: np.ndarray,
    mask: np.ndarray,
    hints: Mapping[str, np.ndarray] | None = None,
    **fields: Any,
) -> Record:
    """Write ``{id}.png`` (uint8 HxWx3), ``{id}_mask.png`` (0/255) and ``{id}_hint-NAME.png``
    (uint8 HxW) per hint atomically and return their Record; ``fields`` are the remaining
    Record fields (dataset, group, frame, split...)."""
    foreground = np.asarray(mask).astype(bool)
    image_bytes = atomic_save_png(Path(root) / f"{record_id}.png", image)
    mask_bytes = atomic_save_png(
        Path(root) / f"{record_id}_mask.png", foreground.astype(np.uint8) * 255
    )
    if hints:
        files = {name: f"{record_id}{HINT_MARK}{name}.png" for name in sorted(hints)}
        digests = {
            name: sha256_bytes(atomic_save_png(Path(root) / files[name], hints[name]))
            for name in files
        }
        extra = dict(fields.pop("extra", {}))
        extra["hints"] = {n: {"file": files[n], "sha256": digests[n]} for n in files}
        fields["extra"] = extra
    return Record(
        id=record_id,
        image=f"{record_id}.png",
        mask=f"{record_id}_mask.png",
        image_sha256=sha256_bytes(image_bytes),
        mask_sha256=sha256_bytes(mask_bytes),
        coverage=round(float(foreground.mean()), 6),
        width=image.shape[1],
        height=image.shape[0],
        **fields,
    )


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _safe_relative(name: object, manifest_path: Path) -> str:
    """Reject names that could point outside the dataset root (absolute, '..', backslashes)."""
    if not isinstance(name, str) or not name:
        raise SiamdiffError(f"record has an invalid file name {name!r}", manifest_path)
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts or "\\" in name or ":" in name:
        raise SiamdiffError(f"file name {name!r} points outside the dataset", manifest_path)
    return name


def _check_hints(raw: dict[str, Any], manifest_path: Path) -> None:
    extra = raw.get("extra", {})
    hints = extra.get("hints", {}) if isinstance(extra, dict) else None
    if not isinstance(hints, dict) or not all(
        isinstance(h, dict) and isinstance(h.get("sha256"), str) for h in hints.values()
    ):
        raise SiamdiffError(
            f"record {raw['id']!r} has malformed hints (want name -> {{file, sha256}})",
            manifest_path,
        )
    for hint in hints.values():
        _safe_relative(hint.get("file"), manifest_path)


def hint_names(records: list[Record]) -> list[str]:
    """The hints every one of ``records`` has, sorted."""
    common = set(records[0].hints) if records else set()
    for record in records[1:]:
        common &= record.hints.keys()
    return sorted(common)


# The JSON type of every record field: a hand-edited manifest with a wrong one would fail
# later, deep inside numpy or a file name (stats, export).
_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    **dict.fromkeys(
        ("id", "image", "mask", "image_sha256", "mask_sha256", "dataset", "group", "frame"), str
    ),
    **dict.fromkeys(("split", "source_image", "source_mask", "source_sha256"), str),
    "coverage": (int, float),
    "width": int,
    "height": int,
    "extra": dict,
}
# The keys of ``extra`` that siamdiff reads (prepare and sample write them), when present.
_EXTRA_TYPES: dict[str, type] = {
    **dict.fromkeys(("source_id", "source_mask_sha256"), str),
    **dict.fromkeys(("seed", "sample_index"), int),
    **dict.fromkeys(("source_hints", "source_hints_sha256"), dict),
}
# Ids name files (export, folder copies): no separators, no leading dot.
_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


def _a(type_name: str) -> str:
    return f"an {type_name}" if type_name == "int" else f"a {type_name}"


def _check_fields(raw: dict[str, Any], manifest_path: Path) -> None:
    for name, kind in _FIELD_TYPES.items():
        if name not in raw:
            continue  # missing: Record() names it
        value = raw[name]
        if not isinstance(value, kind) or isinstance(value, bool):
            expected = getattr(kind, "__name__", "number")
            raise SiamdiffError(
                f"record {raw['id']!r}: {name} is {value!r}, not {_a(expected)}", manifest_path
            )
    for name, kind in _EXTRA_TYPES.items():
        value = raw.get("extra", {}).get(name, kind())
        if not isinstance(value, kind) or isinstance(value, bool):
            raise SiamdiffError(
                f"record {raw['id']!r}: extra.{name} is {value!r}, not {_a(kind.__name__)}",
                manifest_path,
            )
    if not _ID.fullmatch(raw["id"]):
        raise SiamdiffError(f"record id {raw['id']!r} is not a plain file name", manifest_path)
    if not 0 <= raw.get("coverage", 0) <= 1:
        raise SiamdiffError(
            f"record {raw['id']!r}: coverage {raw['coverage']} is not in 0..1", manifest_path
        )


TRAINED_ON = "null or an object {data: path, split: name or null[, images: fingerprint]}"


def is_trained_on(value: Any) -> bool:
    """Whether ``value`` has the shape of ``export.trained_on`` (None: a model exported by an
    older siamdiff): the images a generator learned from, which train-segmenter and the
    utility metric read before they trust its samples."""
    return value is None or (
        isinstance(value, dict)
        and isinstance(value.get("data"), str)
        and value["data"] != ""
        and "split" in value
        and (value["split"] is None or isinstance(value["split"], str))
        and isinstance(value.get("images", ""), str)
    )


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_synthesis(preprocessing: dict[str, Any], manifest_path: Path) -> None:
    """The sampling settings of a synthetic set (``siamdiff sample`` writes them) that
    evaluate, train-segmenter and sample read: a hand-edited one would otherwise fail inside
    them with a traceback, or name no file."""
    if "synthesis" not in preprocessing:
        return
    # Imported here: transforms needs torch, which `siamdiff verify` of real data goes without.
    from siamdiff.data.transforms import CROP_MODES

    synthesis = preprocessing["synthesis"]
    if not isinstance(synthesis, dict):
        raise SiamdiffError(
            f"preprocessing.synthesis is {synthesis!r}, not an object", manifest_path
        )
    crop, resolution = synthesis.get("crop", "crop"), synthesis.get("resolution")
    trained_on, mask_aug = synthesis.get("model_trained_on"), synthesis.get("mask_aug", [])
    problems = {
        f"crop must be one of {', '.join(CROP_MODES)}, got {crop!r}": crop not in CROP_MODES,
        # None: a set siamdiff did not sample, of no known generator size.
        f"resolution must be an integer > 0, got {resolution!r}": resolution is not None
        and not _positive_int(resolution),
        f"model_trained_on must be {TRAINED_ON}, got {trained_on!r}": not is_trained_on(trained_on),
        f"mask_aug must be a list of names, got {mask_aug!r}": not isinstance(mask_aug, list)
        or not all(isinstance(name, str) for name in mask_aug),
    }
    for problem, found in problems.items():
        if found:
            raise SiamdiffError(f"preprocessing.synthesis.{problem}", manifest_path)


def manifest_from_json(obj: Any, manifest_path: Path) -> Manifest:
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise SiamdiffError("not a siamdiff manifest", manifest_path)
    if obj.get("format_version") != FORMAT_VERSION:
        raise SiamdiffError(
            f"manifest format {obj.get('format_version')!r} is not supported "
            f"(this siamdiff reads format {FORMAT_VERSION})",
            manifest_path,
        )
    version = obj.get("dataset_version", "1.0")
    if not isinstance(version, str) or not re.fullmatch(r"\d+\.\d+", version):
        raise SiamdiffError(f"dataset_version {version!r} is not MAJOR.MINOR", manifest_path)
    for key, kind in (("records", list), ("preprocessing", dict)):
        if not isinstance(obj.get(key, kind()), kind):
            raise SiamdiffError(f"{key} is not a {kind.__name__}", manifest_path)
    _check_synthesis(obj.get("preprocessing", {}), manifest_path)
    names = {f for f in Record.__dataclass_fields__}
    records = []
    ids: set[str] = set()
    for raw in obj.get("records", []):
        if not isinstance(raw, dict) or not {"id", "image", "mask"} <= raw.keys():
            raise SiamdiffError("a record lacks id/image/mask", manifest_path)
        unknown = set(raw) - names
        if unknown:
            raise SiamdiffError(
                f"record {raw['id']!r} has unknown keys {sorted(unknown)}", manifest_path
            )
        _check_fields(raw, manifest_path)
        _safe_relative(raw["image"], manifest_path)
        _safe_relative(raw["mask"], manifest_path)
        _check_hints(raw, manifest_path)
        try:
            records.append(Record(**raw))
        except TypeError as exc:
            raise SiamdiffError(
                f"record {raw['id']!r} is incomplete ({exc})", manifest_path
            ) from exc
        if records[-1].split not in SPLITS:
            raise SiamdiffError(f"record {raw['id']!r} has split {raw['split']!r}", manifest_path)
        if records[-1].id in ids:
            raise SiamdiffError(f"record id {raw['id']!r} appears twice", manifest_path)
        ids.add(records[-1].id)
    return Manifest(
        records=records,
        preprocessing=dict(obj.get("preprocessing", {})),
        kind=str(obj.get("kind", "real")),
        dataset_version=version,
        created_by=str(obj.get("created_by", "")),
    )


def load_manifest(root: str | Path) -> Manifest:
    """Load and validate ``root/manifest-v1.json``; one-line SiamdiffError on any problem."""
    path = Path(root) / MANIFEST_NAME
    if not Path(root).is_dir():
        raise SiamdiffError("is not a directory", root)
    obj = read_json(path, "manifest", "is this a siamdiff dataset?")
    return manifest_from_json(obj, path)


def write_manifest(root: str | Path, manifest: Manifest) -> Path:
    path = Path(root) / MANIFEST_NAME
    atomic_write_json(path, manifest.to_json())
    return path


def next_dataset_version(previous: Manifest | None, new: Manifest) -> str:
    """Major bump when raw data changed (images added, removed or replaced; masks corrected)
    or a frame changed split, minor when only preprocessing (or the code doing it) changed."""
    if previous is None:
        return "1.0"
    major, minor = (int(x) for x in previous.dataset_version.split("."))
    # Raw masks and hints too, where both manifests name them (older ones hold the images'
    # hashes only).
    with_masks = all("source_mask_sha256" in r.extra for r in (*previous.records, *new.records))

    def raw(record: Record) -> tuple[str, str, str]:
        if not with_masks:
            return record.source_sha256 or record.id, "", ""
        hints = json.dumps(record.extra.get("source_hints_sha256", {}), sort_keys=True)
        return record.source_sha256 or record.id, record.extra["source_mask_sha256"], hints

    def sources(manifest: Manifest) -> set[tuple[str, str, str]]:
        return {raw(r) for r in manifest.records}

    if sources(previous) != sources(new):
        return f"{major + 1}.0"
    if {r.id: r.split for r in previous.records} != {r.id: r.split for r in new.records}:
        return f"{major + 1}.0"  # what a split holds changed: results are not comparable
    if previous.preprocessing != new.preprocessing:
        return f"{major}.{minor + 1}"

    def outputs(manifest: Manifest) -> dict[str, list[tuple[str, str]]]:
        return {r.id: r.files() for r in manifest.records}

    # Same sources, same preprocessing, other bytes: with the raw masks' and hints' hashes
    # compared above, only the code (siamdiff, Pillow) can have changed; without them, a raw
    # mask (or hint) may have been edited.
    if outputs(previous) != outputs(new):
        return f"{major}.{minor + 1}" if with_masks else f"{major + 1}.0"
    return previous.dataset_version


@dataclass
class VerifyReport:
    checked: int
    changed: list[str]
    missing: list[str]
    extra: list[str]
    unreadable: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.changed or self.missing or self.extra or self.unreadable)


def verify(root: str | Path) -> VerifyReport:
    """Re-hash every listed file; report changed, missing, unreadable and unlisted files."""
    root = Path(root)
    manifest = load_manifest(root)
    changed: list[str] = []
    missing: list[str] = []
    unreadable: list[str] = []
    listed = {MANIFEST_NAME, *ANCILLARY_FILES}
    checked = 0
    for record in manifest.records:
        for name, expected in record.files():
            listed.add(name)
            path = root / name
            if not path.is_file():
                missing.append(name)
                continue
            checked += 1
            try:
                actual = sha256_file(path)
            except OSError:
                unreadable.append(name)
                continue
            if actual != expected:
                changed.append(name)
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    extra = sorted(
        n for n in present - listed if not Path(n).name.startswith(".") and not _in_export_folder(n)
    )
    return VerifyReport(
        checked=checked,
        changed=sorted(changed),
        missing=sorted(missing),
        extra=extra,
        unreadable=sorted(unreadable),
    )


def require_intact(root: str | Path, override: str, *, allow_extra: bool = True) -> None:
    """Refuse, in one line, a dataset whose listed files no longer match its manifest: a job
    would otherwise fail on the first unreadable file half-way through, or train on edited
    data. ``override`` says how to go on regardless (a flag or a setting)."""
    report = verify(root)
    extra = [] if allow_extra else report.extra
    problems = report.changed + report.missing + report.unreadable + extra
    if problems:
        counts = {
            "changed": report.changed,
            "missing": report.missing,
            "unreadable": report.unreadable,
            "extra": extra,
        }
        summary = ", ".join(f"{len(names)} {label}" for label, names in counts.items() if names)
        raise SiamdiffError(
            f"dataset does not verify ({summary}, e.g. {problems[0]}): fix it (`siamdiff "
            f"verify` lists them) or {override}",
            root,
        )


def format_verify(report: VerifyReport) -> str:
    """One line per problem file ("changed: NAME"), then a one-line verdict."""
    lines = [
        f"{label}: {name}"
        for label, names in (
            ("changed", report.changed),
            ("missing", report.missing),
            ("unreadable", report.unreadable),
            ("extra", report.extra),
        )
        for name in names
    ]
    if report.ok:
        lines.append(f"OK: {report.checked} files match the manifest")
    else:
        problems = (
            len(report.changed) + len(report.missing) + len(report.unreadable) + len(report.extra)
        )
        noun = "problem" if problems == 1 else "problems"
        lines.append(f"FAILED: {problems} {noun} ({report.checked} files checked)")
    return "\n".join(lines)

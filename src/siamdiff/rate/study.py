"""A rating study: a seeded, balanced, shuffled sequence of real and synthetic images.

Layout of a study directory::

    study.json     format, version, settings, items (source + record per item) and the
                   sequence (each rater sees its items in an order of their own)
    secret.key     random key for opaque image names and per-position answer tokens
    images/        copies in one view, named by HMAC(secret, item index): nothing in a
                   name, URL, PNG chunk, shape or size tells a rater where an image came from
    ratings.db     the answers (created by the server, see storage.py)
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from siamdiff import __version__
from siamdiff.atomic import (
    atomic_output_dir,
    atomic_save_png,
    atomic_write_bytes,
    atomic_write_json,
)
from siamdiff.data.dataset import GeneratorView, PairedDataset, generator_views
from siamdiff.data.manifest import Manifest, Record, load_manifest
from siamdiff.errors import SiamdiffError
from siamdiff.report import to_uint8_rgb

STUDY_FORMAT = "siamdiff-rating-study"
STUDY_VERSION = 1
STUDY_FILE = "study.json"
SECRET_FILE = "secret.key"
IMAGES_DIR = "images"
SOURCES = ("real", "synthetic")
DEFAULT_REPEATS = 3
OVERLAY_COLOUR = np.array([0, 255, 0], dtype=np.uint8)


@dataclass(frozen=True)
class Item:
    """One distinct image of the study; ``name`` is its opaque file stem."""

    name: str
    source: str
    record_id: str
    dataset: str
    overlay: bool


@dataclass(frozen=True)
class Study:
    root: Path
    items: list[Item]
    sequence: list[int]  # item indices in presentation order; repeated items appear twice
    secret: bytes
    info: dict[str, Any]

    @cached_property
    def by_name(self) -> dict[str, Item]:
        return {item.name: item for item in self.items}

    def order(self, rater_id: int) -> list[int]:
        """The sequence as rater ``rater_id`` sees it: a shuffle of their own, so that order
        effects (fatigue, anchoring on the first images, where the repeats fall) land on
        different images for each rater and raters cannot compare notes by number. Drawn from
        the study's seed and the rater's number: the same on every visit. Studies made before
        per-rater orders keep their single one. The server stores it when a rater joins."""
        settings = self.info.get("settings", {})
        if not settings.get("order_per_rater"):
            return self.sequence
        rng = np.random.default_rng((settings["seed"], rater_id))
        return _sequence(len(self.items), len(self.sequence) - len(self.items), rng)

    def image_path(self, name: str, overlay: bool = False) -> Path:
        suffix = "-overlay" if overlay else ""
        return self.root / IMAGES_DIR / f"{name}{suffix}.png"

    def position_token(self, rater_id: int, position: int, item: int) -> str:
        """HMAC binding an answer to one rater, one position and the item shown there."""
        message = f"{rater_id}:{position}:{item}".encode()
        return hmac.new(self.secret, message, hashlib.sha256).hexdigest()


def _opaque_name(secret: bytes, index: int) -> str:
    return hmac.new(secret, f"item:{index}".encode(), hashlib.sha256).hexdigest()[:32]


def mask_overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image with the mask's outline drawn in green (the lesion itself stays visible)."""
    outline = mask & ~ndimage.binary_erosion(mask, iterations=2)
    out = image.copy()
    out[outline] = OVERLAY_COLOUR
    return out


def _view(dataset: PairedDataset, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Sample ``index``'s image (HxWx3 uint8) and mask (HxW bool) in ``dataset``'s view."""
    sample = dataset[index]
    image = to_uint8_rgb(sample["image"][None])[0].permute(1, 2, 0).numpy()
    return image, sample["mask"][0].numpy() > 0.5


def _pick(manifest: Manifest, count: int, rng: np.random.Generator) -> list[Record]:
    records = sorted(manifest.records, key=lambda r: r.id)
    chosen = rng.choice(len(records), size=count, replace=False)
    return [records[i] for i in sorted(chosen)]


def _sequence(n_items: int, repeats: int, rng: np.random.Generator) -> list[int]:
    """Shuffled items, then ``repeats`` of them re-inserted at least two places after their
    first showing, so a repeat is never seen back to back."""
    order = [int(i) for i in rng.permutation(n_items)]
    # Never the last-shown item: it has no later slot two places on.
    for item in (int(i) for i in rng.choice(order[:-1], size=repeats, replace=False)):
        first = order.index(item)
        order.insert(int(rng.integers(first + 2, len(order) + 1)), item)
    return order


def _empty_dir(path: str | Path) -> bool:
    return Path(path).is_dir() and not any(Path(path).iterdir())


def build_study(
    synthetic: str | Path,
    real: str | Path,
    out: str | Path,
    per_source: int | None = None,
    repeats: int | None = None,
    seed: int = 0,
    overlay: bool = False,
) -> Study:
    """Create the study directory ``out`` (atomically) and return the loaded study.

    ``per_source`` images are drawn from each set (default: as many as the smaller set has);
    ``repeats`` of them (default 3, fewer in a study too small) are shown a second time to
    measure intra-rater consistency. Every
    image is shown in the generator's view (the lesion-centred square crop) at the synthetic
    images' size: real frames keep their aspect ratio when prepared, synthetic images are
    square, and a shape or pixel size would tell the rater the answer.
    """
    if Path(synthetic).resolve() == Path(real).resolve():
        raise SiamdiffError("is given as both SYN and REAL: rate two different sets", synthetic)
    manifests = {"synthetic": load_manifest(synthetic), "real": load_manifest(real)}
    for source, root in (("synthetic", synthetic), ("real", real)):
        if not manifests[source].records:
            raise SiamdiffError("dataset has no records to rate", root)
        # Swapped (evaluate takes REAL SYN, rate SYN REAL): every answer would read inverted.
        if (manifests[source].kind == "synthetic") != (source == "synthetic"):
            given = "SYN" if source == "synthetic" else "REAL"
            raise SiamdiffError(
                f"is given as {given} but is a {manifests[source].kind} dataset "
                "(rate takes SYN then REAL)",
                root,
            )
    available = min(len(m.records) for m in manifests.values())
    count = available if per_source is None else per_source
    if not 1 <= count <= available:
        raise SiamdiffError(
            f"--per-source must be between 1 and {available} (the smaller set's size), got {count}"
        )
    repeats = min(DEFAULT_REPEATS, 2 * count - 1) if repeats is None else repeats
    if not 0 <= repeats <= 2 * count - 1:
        raise SiamdiffError(f"--repeats must be between 0 and {2 * count - 1}, got {repeats}")
    if not 0 <= seed < 2**63:
        raise SiamdiffError(f"--seed must be an integer in [0, 2**63), got {seed}")
    rng = np.random.default_rng(seed)
    secret = secrets.token_bytes(32)
    roots = {"synthetic": Path(synthetic), "real": Path(real)}
    size = min(min(r.width, r.height) for r in manifests["synthetic"].records)
    # Framed as the generator frames them (a pad-trained model's samples keep the borders).
    synthesis = manifests["synthetic"].preprocessing.get("synthesis", {})
    view = GeneratorView(crop=GeneratorView.of_synthesis(synthesis).crop)
    views = {s: generator_views(roots[s], None, size, view=view) for s in SOURCES}
    position = {s: {r.id: i for i, r in enumerate(views[s].records)} for s in SOURCES}
    picked = [(s, r) for s in SOURCES for r in _pick(manifests[s], count, rng)]
    shuffled = [picked[i] for i in rng.permutation(len(picked))]
    # An empty folder was made ahead for the study (mkdir): build it there.
    with atomic_output_dir(out, overwrite=_empty_dir(out)) as tmp:
        items = []
        for index, (source, record) in enumerate(shuffled):
            name = _opaque_name(secret, index)
            image, mask = _view(views[source], position[source][record.id])
            atomic_save_png(tmp / IMAGES_DIR / f"{name}.png", image)
            if overlay:
                atomic_save_png(tmp / IMAGES_DIR / f"{name}-overlay.png", mask_overlay(image, mask))
            items.append(Item(name, source, record.id, record.dataset, overlay))
        atomic_write_bytes(tmp / SECRET_FILE, secret.hex().encode())
        atomic_write_json(
            tmp / STUDY_FILE,
            {
                "format": STUDY_FORMAT,
                "format_version": STUDY_VERSION,
                "created_by": f"siamdiff {__version__}",
                "sources": {s: str(Path(roots[s]).resolve()) for s in SOURCES},
                "settings": {
                    "per_source": count,
                    "repeats": repeats,
                    "seed": seed,
                    "overlay": overlay,
                    "size": size,
                    "order_per_rater": True,
                },
                "items": [asdict(item) for item in items],
                "sequence": _sequence(len(items), repeats, rng),
            },
        )
        # The key unblinds every image name and the study maps names to sources: the raters
        # (on this machine, by default) must not read them.
        for private in (SECRET_FILE, STUDY_FILE):
            os.chmod(tmp / private, 0o600)
    return load_study(out)


def load_study(root: str | Path) -> Study:
    """Load and validate a study directory; one-line SiamdiffError on any problem."""
    root = Path(root).resolve()  # the server serves its images from any working directory
    path = root / STUDY_FILE
    if not path.is_file():
        raise SiamdiffError(f"no {STUDY_FILE} here (is this a siamdiff rating study?)", root)
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        secret = bytes.fromhex((root / SECRET_FILE).read_text(encoding="ascii").strip())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SiamdiffError(f"cannot read the study ({exc})", path) from exc
    if not isinstance(info, dict) or info.get("format") != STUDY_FORMAT:
        raise SiamdiffError("not a siamdiff rating study", path)
    if info.get("format_version") != STUDY_VERSION:
        raise SiamdiffError(
            f"study format {info.get('format_version')!r} is not supported "
            f"(this siamdiff reads format {STUDY_VERSION}; it was made by "
            f"{info.get('created_by', 'an unknown version')})",
            path,
        )
    try:
        items = [Item(**raw) for raw in info["items"]]
        sequence = [int(i) for i in info["sequence"]]
        settings, sources = info.get("settings", {}), info.get("sources", {})
        if not (isinstance(settings, dict) and isinstance(sources, dict)):
            raise TypeError("settings and sources must be objects")
        if settings.get("order_per_rater") and not isinstance(settings.get("seed"), int):
            raise TypeError("settings.seed must be an integer")
    except (KeyError, TypeError, ValueError) as exc:
        raise SiamdiffError(f"study is malformed ({exc})", path) from exc
    if any(not 0 <= i < len(items) for i in sequence) or any(
        item.source not in SOURCES for item in items
    ):
        raise SiamdiffError("study is malformed (bad item index or source)", path)
    return Study(root=root, items=items, sequence=sequence, secret=secret, info=info)


def check_images(study: Study) -> None:
    """Before serving (exporting results needs none): every image the raters will be shown."""
    for item in study.items:
        for overlay in (False, True) if item.overlay else (False,):
            if not study.image_path(item.name, overlay).is_file():
                raise SiamdiffError(
                    "image of the study is missing (copied without images/?)",
                    study.image_path(item.name, overlay),
                )


def open_study(
    synthetic: str | Path | None,
    real: str | Path | None,
    out: str | Path,
    **settings: Any,
) -> Study:
    """Resume the study at ``out`` if it exists, else build it (``settings`` as build_study;
    None = not given, the default).

    A study is resumed only with what it was built from: other datasets or settings would be
    ignored without a word (their images never shown, an overlay never offered). Its images
    are copied into it, so the datasets need not be given again, nor be there any more."""
    given = {key: value for key, value in settings.items() if value is not None}
    if Path(out).exists() and not _empty_dir(out):
        study = load_study(out)
        datasets = {"synthetic": synthetic, "real": real}
        for source in SOURCES:
            built_from = study.info.get("sources", {}).get(source)
            if datasets[source] is not None and built_from != str(Path(datasets[source]).resolve()):
                raise SiamdiffError(
                    f"this study was built from {source} images in {built_from}, not "
                    f"{datasets[source]}; resume it with those, or start a new --study",
                    out,
                )
        saved = study.info.get("settings", {})
        for key, value in given.items():
            if saved.get(key) != value:
                flag = "--" + key.replace("_", "-")
                raise SiamdiffError(
                    f"this study was built with {flag} {saved.get(key)}, not {value}; resume "
                    "it without that option, or start a new --study",
                    out,
                )
        return study
    if synthetic is None or real is None:
        raise SiamdiffError("is not a study yet: give SYN REAL to build it", out)
    return build_study(synthetic, real, out, **given)

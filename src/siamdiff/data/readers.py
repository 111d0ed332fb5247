"""Readers for the public polyp layouts: each turns a directory into image-mask pairs.

Five layouts (the ``kind`` of a source):

- ``kvasir-seg``: ``images/`` + ``masks/`` (JPEG masks), ``kavsir_bboxes.json`` used only
  to cross-check image sizes; no patient ids, so every image is its own group.
- ``cvc-clinicdb``: ``Original/`` + ``Ground Truth/`` (PNG or the release TIFFs); the group
  is the video sequence from the frame table in ``README.txt`` (built-in copy as fallback).
- ``pranet``: ``images/`` + ``masks/`` matched by stem.
- ``folder``: ``NAME.ext`` + ``NAME_mask.ext``.
- ``nnunet``: an nnU-Net v2 raw dataset, ``imagesTr/CASE_0000.EXT`` + ``labelsTr/CASE.EXT``
  with ``dataset.json``; every label but background and ``ignore`` is lesion.

In the last three, each image (case) is its own group, except that a synthetic pair's name
``{dataset}-{group}-{frame}-sNN`` (siamdiff's exports) keeps its source's group, and in
``folder`` any ``{dataset}-{group}-{frame}`` does (the phantom demo data is named so).

Extra hints (several conditioning maps per image, docs/hints.md): ``folder`` reads
``NAME_hint-HINT.ext`` beside ``NAME.ext``, ``pranet`` (and ``kvasir-seg``) a ``hint-HINT/``
folder matched by stem. A hint given for some pairs but not all is an error.

Dataset, group and frame are sanitised to ``[A-Za-z0-9._]`` so that
``{dataset}-{group}-{frame}`` is a safe, parseable output name; stems of one folder that
sanitise alike (``ポリープ`` and ``結腸`` both to ``_``) keep apart by a hash of the stem.

Masks: foreground = 8-bit value >= 128 for grey masks (after 16-bit input is scaled to 8
bits and colour masks are reduced by their maximum channel); label-style masks (two values
including 0 in a lossless file, palette indices, float, alpha-only) take nonzero as lesion.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from PIL import Image, ImageOps

from siamdiff.errors import SiamdiffError, first_line

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})
TIFF_SUFFIXES = frozenset({".tif", ".tiff"})
JPEG_SUFFIXES = frozenset({".jpg", ".jpeg"})
MASK_THRESHOLD = 128
EXIF_ORIENTATION = 0x0112
MASK_SUFFIX = "_mask"
HINT_MARK = "_hint-"  # folder layout: NAME_hint-HINT.ext
HINT_DIR_PREFIX = "hint-"  # pranet layout: hint-HINT/STEM.ext

# CVC-ClinicDB README.txt: frames (first, last) of video sequences 1..29.
CVC_SEQUENCES: tuple[tuple[int, int], ...] = (
    (1, 25), (26, 50), (51, 67), (68, 78), (79, 103), (104, 126), (127, 151), (152, 177),
    (178, 199), (200, 205), (206, 227), (228, 252), (253, 277), (278, 297), (298, 317),
    (318, 342), (343, 363), (364, 383), (384, 408), (409, 428), (429, 447), (448, 466),
    (467, 478), (479, 503), (504, 528), (529, 546), (547, 571), (572, 591), (592, 612),
)  # fmt: skip
# One table row, whatever mix of tabs and spaces the README uses: "|  1 to  25  |\t 1\t|".
_CVC_ROW = re.compile(r"(\d+)\s+to\s+(\d+)\s*\|\s*(\d+)")
# {dataset}-{group}-{frame}, and siamdiff's synthetic {dataset}-{group}-{frame}-s{k}.
_OUTPUT_NAME = re.compile(r"^([A-Za-z0-9._]+)-([A-Za-z0-9._]+)-([A-Za-z0-9._]+(?:-s\d+)?)$")
# A synthetic pair's name alone ({dataset}-{group}-{frame}-sNN): in layouts whose own names
# carry no groups, an ordinary dashed name (a date, a source prefix) stays an image's own.
_SYNTHETIC_NAME = re.compile(r"^([A-Za-z0-9._]+)-([A-Za-z0-9._]+)-([A-Za-z0-9._]+-s\d+)$")


@dataclass(frozen=True)
class SourcePair:
    """One raw image and its mask, with the (sanitised) parts of its output name."""

    image: Path
    mask: Path
    dataset: str
    group: str
    frame: str
    hints: tuple[tuple[str, Path], ...] = ()  # (hint name, file), sorted by name
    # A mask that is a label map of class ids (nnU-Net): the ids that are lesion, and every id
    # the map may hold. None: a drawn mask, thresholded (load_mask).
    labels: tuple[tuple[int, ...], tuple[int, ...]] | None = None

    @property
    def id(self) -> str:
        return f"{self.dataset}-{self.group}-{self.frame}"


@dataclass
class ReadResult:
    pairs: list[SourcePair] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


class UnreadableImageError(SiamdiffError):
    """An image file that cannot be decoded; keeps path and reason apart for skip lists.

    ``path`` may be left out because torch re-raises a DataLoader worker's exception as
    ``type(exc)(worker_traceback_text)``; a class that refuses one argument becomes a
    RuntimeError there, and the user a traceback.
    """

    def __init__(self, reason: str, path: str | Path | None = None) -> None:
        super().__init__(reason, path)
        self.path = Path(path) if path is not None else None
        self.reason = reason


def sanitize_name(name: str) -> str:
    """``name`` with every run of characters outside ``[A-Za-z0-9._]`` replaced by ``_``.

    Leading dots are dropped so that no output file is hidden.
    """
    return re.sub(r"[^A-Za-z0-9._]+", "_", name).lstrip(".") or "_"


def sanitized_apart(stems: list[str]) -> dict[str, str]:
    """Each stem's :func:`sanitize_name`; where several stems sanitise alike, those it changed
    get a hash of the stem as suffix, so none of them stops prepare as a duplicate name (one
    the sanitising left as it was keeps it: its id does not move when others join it)."""
    names = {stem: sanitize_name(stem) for stem in stems}
    taken = Counter(names.values())
    return {
        stem: name
        if taken[name] == 1 or name == stem
        else f"{name}_{hashlib.sha256(stem.encode()).hexdigest()[:8]}"
        for stem, name in names.items()
    }


# --- pixels -------------------------------------------------------------------------------


def _is_tiff(path: Path) -> bool:
    return path.suffix.lower() in TIFF_SUFFIXES


def _upright(image: Image.Image) -> Image.Image:
    """The picture as a viewer shows it (EXIF orientation applied): what the mask was drawn on,
    whether or not the mask file carries the same tag."""
    return ImageOps.exif_transpose(image)


# The array operation of each EXIF / TIFF orientation (what ImageOps.exif_transpose does).
ORIENTED: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
    8: lambda a: np.rot90(a, 1),
}


def _orientation(path: Path) -> int:
    if _is_tiff(path):
        with tifffile.TiffFile(path) as tif:
            tag = tif.pages[0].tags.get(EXIF_ORIENTATION)
            return int(tag.value) if tag is not None else 1
    with Image.open(path) as image:
        return image.getexif().get(EXIF_ORIENTATION, 1)


def turned_by_exif(path: str | Path) -> bool:
    """Whether the file's EXIF (TIFF) orientation turns it a quarter (width and height swap)."""
    try:
        return _orientation(Path(path)) in (5, 6, 7, 8)
    except Exception:  # unreadable: its reader says why, not this hint
        return False


def _decode_pil(path: Path) -> np.ndarray:
    with Image.open(path) as opened:
        image = _upright(opened)
        if image.mode in ("1", "L", "RGB") or image.mode.startswith("I") or image.mode == "F":
            return np.asarray(image)
        if image.mode in ("LA", "La"):
            return np.asarray(image.getchannel("L"))
        # P, PA, RGBA, CMYK, YCbCr, ...: RGB drops any alpha; a palette maps to its colours,
        # so a red-on-black palette mask stays foreground under the max-channel rule.
        return np.asarray(image.convert("RGB"))


def _to_uint8(array: np.ndarray, path: Path, bits: int = 16) -> np.ndarray:
    """8-bit data as stored; wider integers scaled from ``0..2**bits - 1`` (16: the whole
    16-bit range; 12 for 12-bit data in 16-bit files, which would otherwise read dark)."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer) and array.min() >= 0 and array.max() <= 65535:
        # Pillow's I;16 / I modes, uint16 TIFFs: 0..top -> 0..255, rounded.
        top = (1 << bits) - 1
        if array.max() > top:
            raise UnreadableImageError(
                f"holds the value {array.max()}, above the {bits}-bit maximum {top} "
                "(give the bit depth of its data: --image-bits)",
                path,
            )
        return ((array.astype(np.uint32) * 255 + top // 2) // top).astype(np.uint8)
    raise UnreadableImageError(f"unsupported pixel type {array.dtype}", path)


def _to_hw_or_hwc(array: np.ndarray, path: Path) -> np.ndarray:
    """HxW or HxWx3: drop alpha, squeeze single channels, move planar TIFF channels last."""
    if array.ndim == 3 and array.shape[0] in (1, 2, 3, 4) and array.shape[-1] > 4:
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 3 and array.shape[-1] in (1, 2):
        array = array[..., 0]
    elif array.ndim == 3 and array.shape[-1] == 4:
        array = array[..., :3]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] == 3)):
        raise UnreadableImageError(f"unsupported image shape {array.shape}", path)
    return np.ascontiguousarray(array)


def _decode_tiff(path: Path, as_shown: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """A TIFF's samples, and its palette's colours (HxWx3 uint8) when it has one.

    ``as_shown``: min-is-white samples inverted, as a viewer shows them (images). Masks keep
    their stored values: ImageJ saves a binary mask under an inverting lookup table as
    min-is-white with the lesion stored as 255, shown black.
    """
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        pixels, limit = page.imagewidth * page.imagelength, Image.MAX_IMAGE_PIXELS
        if limit is not None and pixels > 2 * limit:  # Pillow's decompression-bomb limit
            raise ValueError(f"{pixels} pixels, over the {2 * limit} limit")
        array = tif.asarray()
        white_is_zero = page.photometric == tifffile.PHOTOMETRIC.MINISWHITE
        if as_shown and white_is_zero and array.dtype.kind in "bu":
            array = ~array if array.dtype == np.bool_ else (1 << page.bitspersample) - 1 - array
        colours = None
        if page.photometric == tifffile.PHOTOMETRIC.PALETTE and page.colormap is not None:
            colormap = np.asarray(page.colormap).T  # N x 3, 8- or 16-bit
            colormap = colormap // 257 if colormap.max() > 255 else colormap
            colours = colormap.astype(np.uint8)[array]
        tag = page.tags.get(EXIF_ORIENTATION)  # as a viewer shows it, like other formats
        turn = ORIENTED.get(int(tag.value) if tag is not None else 1)
        if turn is not None:
            if array.ndim == 3 and page.planarconfig == tifffile.PLANARCONFIG.SEPARATE:
                array = np.moveaxis(array, 0, -1)  # rows and columns first, as turn expects
            array = np.ascontiguousarray(turn(array))
            colours = None if colours is None else np.ascontiguousarray(turn(colours))
    return array, colours


def _decode_tiff_pixels(path: Path) -> np.ndarray:
    array, colours = _decode_tiff(path)
    return array if colours is None else colours


def _palette_mask(indices: np.ndarray, colours: np.ndarray) -> tuple[np.ndarray, bool]:
    """A palette mask by its colours (index 0 may be white): of two colours the brighter is
    the lesion, however dark (a label colour); one colour over several indices leaves the
    indices (nonzero = lesion); more colours are grey levels (thresholded)."""
    grey = colours.max(axis=-1)
    values = np.unique(grey)
    if len(values) == 2:
        return grey == values[1], True
    if len(values) == 1 and len(np.unique(indices)) > 1:
        return indices, True
    return grey, False


def _decode_mask(path: Path) -> tuple[np.ndarray, bool]:
    """A mask's pixels as drawn: (array, whether its values are labels).

    Palette masks are read by :func:`_palette_mask`; a mask drawn only in its alpha
    channel (one colour everywhere, a varying alpha) gives that alpha, and elsewhere a fully
    transparent pixel is background whatever colour it stores (an alpha-drawn mask of a
    frame without a lesion is transparent white, not all lesion).
    """
    if _is_tiff(path):
        array, colours = _decode_tiff(path, as_shown=False)
        return (array, False) if colours is None else _palette_mask(array, colours)
    with Image.open(path) as opened:
        image = _upright(opened)
        if image.mode in ("P", "PA"):
            indices = np.asarray(image.getchannel(0))
            return _palette_mask(indices, np.asarray(image.convert("RGB")))
        if image.mode in ("RGBA", "LA", "La", "RGBa"):
            colour = np.asarray(image.convert("RGB"))
            alpha = np.asarray(image.getchannel("A"))
            if (colour == colour[:1, :1]).all() and alpha.min() != alpha.max():
                return alpha, False
            drawn = _decode_pil(path)
            clear = alpha == 0
            return np.where(clear if drawn.ndim == 2 else clear[..., None], 0, drawn), False
    return _decode_pil(path), False


def _read(path: Path, decode: Callable[[Path], Any]) -> Any:
    """``decode(path)``, any decoder failure turned into an :class:`UnreadableImageError`."""
    try:
        return decode(path)
    # Decoders raise almost anything on malformed files (struct.error, zlib.error, KeyError,
    # DecompressionBombError, ...); every one of them means "this file cannot be read".
    except Exception as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise UnreadableImageError(f"cannot read image ({reason})", path) from exc


def _pixels(array: Any, path: Path) -> np.ndarray:
    array = np.asarray(array)
    if array.size == 0:  # tifffile returns an empty array for a truncated TIFF
        raise UnreadableImageError("cannot read image (no pixel data: truncated file?)", path)
    return array


def _decoded(path: Path) -> np.ndarray:
    """The pixels of ``path`` as stored, any dtype. TIFF via tifffile (Pillow refuses the CVC
    TIFFs)."""
    return _pixels(_read(path, _decode_tiff_pixels if _is_tiff(path) else _decode_pil), path)


def _read_uint8(path: Path, bits: int = 16) -> np.ndarray:
    """Decode ``path`` to uint8 HxW or HxWx3."""
    path = Path(path)
    return _to_hw_or_hwc(_to_uint8(_decoded(path), path, bits), path)


def load_rgb(path: str | Path, bits: int = 16) -> np.ndarray:
    """The image at ``path`` as uint8 HxWx3 RGB.

    Alpha is dropped, palettes are expanded, grey is repeated to three channels and data
    wider than 8 bits is scaled to 8 bits from ``0..2**bits - 1`` (a value above it is an
    error). A corrupt or truncated file raises a one-line :class:`UnreadableImageError`
    naming it.
    """
    array = _read_uint8(Path(path), bits)
    return np.repeat(array[..., None], 3, axis=-1) if array.ndim == 2 else array


def _zero_and_one_value(array: np.ndarray) -> bool:
    values = np.unique(array)
    return len(values) == 2 and values[0] == 0


def load_mask(path: str | Path, threshold: int = MASK_THRESHOLD) -> np.ndarray:
    """The mask at ``path`` as bool HxW: foreground = 8-bit value >= ``threshold`` (128).

    Colour masks (JPEG masks are RGB with compression noise) use the maximum over their
    channels; 16-bit masks are first scaled to 8 bits, unless no value exceeds 255 (8-bit
    values stored in 16 bits). Label masks are read as labels, foreground = nonzero: masks
    of two values, one of them 0 (0/1 at any bit depth, the nnU-Net convention, or 0/255
    stored in 16 bits; JPEG excepted), and float masks (> 0.5). Palette masks of two
    colours take the brighter as the lesion. A mask drawn only in its alpha channel uses
    that alpha; TIFF masks keep their stored values (min-is-white ones too: ImageJ's).
    """
    path = Path(path)
    array, labels = _read(path, _decode_mask)
    array = _to_hw_or_hwc(_pixels(array, path), path)
    if array.ndim == 3:
        array = array.max(axis=-1)
    if array.dtype == np.bool_:
        return array
    if array.dtype.kind == "f":
        return array > 0.5
    # Two values, one of them 0 (0/1, or 0/255 stored in 16 bits): a label mask. Not for
    # JPEG, whose compression noise is no second label.
    if labels or (path.suffix.lower() not in JPEG_SUFFIXES and _zero_and_one_value(array)):
        return array > 0
    if array.dtype.kind in "iu" and array.min() >= 0 and array.max() <= 255:
        return array >= threshold  # 8-bit values, whatever the storage (OpenCV's uint16 writes)
    return _to_uint8(array, path) >= threshold


def load_label_map(path: str | Path, lesion: Sequence[int], known: Sequence[int]) -> np.ndarray:
    """The label map at ``path`` (class ids, as nnU-Net stores them) as bool HxW: True where
    the id is one of ``lesion``. An id outside ``known``, a colour or a float map is an
    :class:`UnreadableImageError`: class ids are one integer channel."""
    path = Path(path)
    array = _to_hw_or_hwc(_decoded(path), path)
    if array.ndim == 3 or array.dtype.kind not in "biu":
        raise UnreadableImageError(
            f"not a label map (class ids are one integer channel; this is {array.dtype} "
            f"{'colour' if array.ndim == 3 else 'grey'})",
            path,
        )
    unknown = np.setdiff1d(np.unique(array), np.asarray(known))
    if unknown.size:
        raise UnreadableImageError(f"label {int(unknown[0])} is not in dataset.json", path)
    return np.isin(array, np.asarray(lesion))


# How a hint map was read, where it matters for the maps of the same hint beside it.
BINARY_HINT = "binary"  # only 0 and 1: a class map, read 0/255
LEVEL_ONE_HINT = "level one"  # grey levels including 1, read as drawn


def read_hint(path: str | Path) -> tuple[np.ndarray, str | None]:
    """The source hint map at ``path`` as uint8 HxW: grey levels kept, colour reduced by the
    maximum channel (as masks are), 16-bit scaled to 8 bits unless no value exceeds 255; and
    :data:`BINARY_HINT`, :data:`LEVEL_ONE_HINT` or None.

    A map of the values 0 and 1 only (one class of a label map, as nnU-Net writes them) reads
    0/255, not near-black 0/1 (JPEG excepted, as for masks); every other map reads as drawn.
    Level 1 then means 255 in one map and 1 in another where a map of the same hint has more
    levels: the caller refuses that mix (prepare). Prepared hint maps are read as stored
    (:func:`load_prepared_hint`).
    """
    path = Path(path)
    array = _to_hw_or_hwc(_decoded(path), path)
    if array.ndim == 3:
        array = array.max(axis=-1)
    if array.dtype.kind == "f":
        raise UnreadableImageError(f"unsupported pixel type {array.dtype}", path)
    binary = np.isin(array, (0, 1)).all() and array.any()
    if binary and path.suffix.lower() not in JPEG_SUFFIXES:
        return (array.astype(bool) * 255).astype(np.uint8), BINARY_HINT
    if array.dtype.kind in "iu" and array.min() >= 0 and array.max() <= 255:
        array = array.astype(np.uint8)  # 8-bit values, whatever the storage
    else:
        array = _to_uint8(array, path)
    return array, LEVEL_ONE_HINT if (array == 1).any() else None


def load_hint(path: str | Path) -> np.ndarray:
    """The hint map at ``path`` as :func:`read_hint` reads it."""
    return read_hint(path)[0]


def load_prepared_hint(path: str | Path) -> np.ndarray:
    """A hint map ``siamdiff prepare`` wrote (8-bit grey), as stored: a dataset prepared
    before binary maps were read 0/255 keeps the 0/1 its models were trained on."""
    array = _read_uint8(Path(path))
    return array.max(axis=-1) if array.ndim == 3 else array


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) read from the file header, without decoding the pixels."""
    path = Path(path)
    try:
        if _is_tiff(path):
            with tifffile.TiffFile(path) as tif:
                return tif.pages[0].imagewidth, tif.pages[0].imagelength
        with Image.open(path) as image:
            return image.size
    except Exception as exc:  # as in _read_uint8: any decoder error means an unreadable file
        raise UnreadableImageError(f"cannot read image header ({exc})", path) from exc


# --- directory listing --------------------------------------------------------------------


def _list_dir(directory: Path) -> list[Path]:
    """Sorted non-hidden entries of ``directory``; one-line SiamdiffError if it cannot be read."""
    if not directory.is_dir():
        raise SiamdiffError("is not a directory" if directory.exists() else "not found", directory)
    try:
        with os.scandir(directory) as entries:
            return sorted(Path(e.path) for e in entries if not e.name.startswith("."))
    except OSError as exc:
        raise SiamdiffError(f"cannot list directory ({exc.strerror})", directory) from exc


def _subdir(root: Path, *names: str) -> Path:
    """The child of ``root`` called one of ``names`` (case-insensitive), else a SiamdiffError."""
    wanted = {n.lower() for n in names}
    for child in _list_dir(root):
        if child.name.lower() in wanted and child.is_dir():
            return child
    raise SiamdiffError(f"missing subfolder {names[0]!r}", root)


def _by_stem(
    paths: list[Path], skipped: list[tuple[Path, str]], strip: str = ""
) -> dict[str, Path]:
    """Image files keyed by stem minus the suffix ``strip``; other files are skipped.

    Two images with one stem (``a.png``, ``a.jpg``) are ambiguous: a SiamdiffError.
    Subfolders are no pairs' business; an image name that is no file (a broken link, a
    folder) is skipped with its reason, so that ``--strict`` sees it.
    """
    found: dict[str, Path] = {}
    for path in paths:
        if not path.is_file():
            if path.is_symlink() or path.suffix.lower() in IMAGE_SUFFIXES:
                skipped.append((path, "not a readable file (a broken link or a folder)"))
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            skipped.append((path, "not an image file"))
            continue
        stem = path.stem.removesuffix(strip)
        if stem in found:
            raise SiamdiffError(f"duplicate name: also {found[stem].name}", path)
        found[stem] = path
    return found


def _match(
    images: dict[str, Path], masks: dict[str, Path], skipped: list[tuple[Path, str]]
) -> list[tuple[str, Path, Path]]:
    """Pairs by stem; an image and a mask left over whose stems differ only in case (a
    dataset made on Windows or macOS, ``C.png`` and ``c.PNG``) pair when that is unique."""
    mask_of = {stem: stem for stem in images.keys() & masks.keys()}
    folded: dict[str, list[str]] = {}
    for stem in masks.keys() - images.keys():
        folded.setdefault(stem.casefold(), []).append(stem)
    lone = [stem for stem in images if stem not in masks]
    counts = Counter(stem.casefold() for stem in lone)
    for stem in lone:
        candidates = folded.get(stem.casefold(), [])
        if len(candidates) == 1 and counts[stem.casefold()] == 1:
            mask_of[stem] = candidates[0]
    paired = set(mask_of.values())
    skipped.extend((path, "image without mask") for s, path in images.items() if s not in mask_of)
    skipped.extend((path, "mask without image") for s, path in masks.items() if s not in paired)
    return [(stem, images[stem], masks[mask_of[stem]]) for stem in sorted(mask_of)]


def _match_subdirs(
    root: Path, image_dir: tuple[str, ...], mask_dir: tuple[str, ...], result: ReadResult
) -> list[tuple[str, Path, Path]]:
    images = _by_stem(_list_dir(_subdir(root, *image_dir)), result.skipped)
    masks = _by_stem(_list_dir(_subdir(root, *mask_dir)), result.skipped)
    return _match(images, masks, result.skipped)


# --- layouts ------------------------------------------------------------------------------


def _attach_hints(
    pairs: list[tuple[SourcePair, str]],
    hints: dict[str, dict[str, Path]],
    skipped: list[tuple[Path, str]],
) -> list[SourcePair]:
    """Each (pair, stem) with its file of every hint in ``hints`` (hint -> stem -> file).

    A hint given for some pairs only is an error: skipping the others could silently cost
    most of the data (one stray file), and a model needs every hint for every pair.
    """
    for name, files in sorted(hints.items()):
        lacking = [pair for pair, stem in pairs if stem not in files]
        if lacking and len(lacking) < len(pairs):
            raise SiamdiffError(
                f"hint {name!r} is given for {len(pairs) - len(lacking)} of {len(pairs)} pairs, "
                "not for this one: give it for every pair or remove it",
                lacking[0].image,
            )
    stems = {stem for _, stem in pairs}
    for files in hints.values():
        skipped.extend(
            (p, "hint without image-mask pair") for s, p in files.items() if s not in stems
        )
    covered = {name: files for name, files in sorted(hints.items()) if stems & files.keys()}
    return [
        replace(pair, hints=tuple((name, files[stem]) for name, files in covered.items()))
        for pair, stem in pairs
    ]


def _hint_name(raw: str, path: Path, skipped: list[tuple[Path, str]]) -> str | None:
    """``raw`` if it is a valid hint name, else None with ``path`` skipped and why."""
    if raw and sanitize_name(raw) == raw:
        return raw
    skipped.append((path, f"hint name {raw!r} is not letters, digits, '.' and '_'"))
    return None


def _named_pairs(
    matched: list[tuple[str, Path, Path]],
    default: str,
    dataset: str | None,
    own_name: re.Pattern[str] | None,
) -> list[tuple[SourcePair, str]]:
    """(pair, stem) of each matched stem: a stem ``own_name`` matches (``{dataset}-{group}-
    {frame}``) keeps those parts, so that a synthetic set read back keeps every sample of a
    mask in one split; any other stem is its own group of dataset ``dataset`` (else
    ``default``)."""
    own = {stem: own_name.match(stem) if own_name else None for stem, _, _ in matched}
    groups = sanitized_apart([stem for stem, parts in own.items() if parts is None])
    pairs = []
    for stem, image, mask in matched:
        parts = own[stem]
        if parts:
            pair = SourcePair(image, mask, dataset or parts[1], parts[2], parts[3])
        else:
            pair = SourcePair(image, mask, dataset or default, groups[stem], "0")
        pairs.append((pair, stem))
    return pairs


def _read_images_masks(
    root: Path, default: str, dataset: str | None, own_name: re.Pattern[str] | None
) -> ReadResult:
    """``images/`` + ``masks/`` (+ ``hint-HINT/``) matched by stem; every image is its own
    group (see :func:`_named_pairs`)."""
    result = ReadResult()
    matched = _match_subdirs(root, ("images",), ("masks",), result)
    pairs = _named_pairs(matched, default, dataset, own_name)
    hints = {}
    for child in _list_dir(root):
        if child.is_dir() and child.name.startswith(HINT_DIR_PREFIX):
            name = _hint_name(child.name[len(HINT_DIR_PREFIX) :], child, result.skipped)
            if name is not None:
                hints[name] = _by_stem(_list_dir(child), result.skipped)
    result.pairs = _attach_hints(pairs, hints, result.skipped)
    return result


def _kvasir_sizes(root: Path) -> dict[str, tuple[int, int]]:
    path = root / "kavsir_bboxes.json"
    if not path.is_file():
        return {}
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
        return {stem: (int(e["width"]), int(e["height"])) for stem, e in table.items()}
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise SiamdiffError(f"cannot read the bounding-box table ({exc})", path) from exc


def read_kvasir_seg(root: Path, dataset: str = "kvasir_seg") -> ReadResult:
    result = _read_images_masks(root, dataset, dataset, own_name=None)
    expected = _kvasir_sizes(root)
    kept = []
    for pair in result.pairs:
        size = expected.get(pair.image.stem)
        if size is None:
            kept.append(pair)
            continue
        try:
            actual = image_size(pair.image)
        except UnreadableImageError as exc:
            result.skipped.append((pair.image, exc.reason))
            continue
        if actual == size:
            kept.append(pair)
        else:
            result.skipped.append(
                (
                    pair.image,
                    f"size {actual[0]}x{actual[1]} but {size[0]}x{size[1]} in kavsir_bboxes.json",
                )
            )
    result.pairs = kept
    return result


def parse_cvc_sequences(readme: str) -> dict[int, tuple[int, int]]:
    """Sequence number -> (first, last) frame, from the README's table. A row that does not
    parse is left out; the others keep their own numbers (not their positions)."""
    return {int(seq): (int(a), int(b)) for a, b, seq in _CVC_ROW.findall(readme)}


def _cvc_table(root: Path) -> dict[int, tuple[int, int]]:
    readme = root / "README.txt"
    builtin = dict(enumerate(CVC_SEQUENCES, 1))
    if not readme.is_file():
        return builtin
    try:
        table = parse_cvc_sequences(readme.read_text(encoding="utf-8", errors="replace"))
    except OSError as exc:
        raise SiamdiffError(f"cannot read ({exc.strerror})", readme) from exc
    return table or builtin


def read_cvc_clinicdb(root: Path, dataset: str = "cvc_clinicdb") -> ReadResult:
    result = ReadResult()
    table = _cvc_table(root)
    matched = _match_subdirs(root, ("Original",), ("Ground Truth", "GroundTruth"), result)
    for stem, image, mask in matched:
        if not stem.isdigit():
            result.skipped.append((image, "frame name is not a number"))
            continue
        frame = int(stem)
        sequence = next((s for s, (a, b) in sorted(table.items()) if a <= frame <= b), None)
        if sequence is None:
            result.skipped.append((image, f"frame {frame} is not in the sequence table"))
            continue
        result.pairs.append(SourcePair(image, mask, dataset, f"seq{sequence:02d}", f"{frame:04d}"))
    return result


def read_pranet(root: Path, dataset: str | None = None) -> ReadResult:
    default = sanitize_name(root.resolve().name)
    return _read_images_masks(root, default, dataset, own_name=_SYNTHETIC_NAME)


def read_folder(root: Path, dataset: str | None = None) -> ReadResult:
    from siamdiff.data.manifest import ANCILLARY_FILES, MANIFEST_NAME  # imports this module

    result = ReadResult()
    # A siamdiff dataset read as a folder: its manifest and reports are no pairs.
    own = {MANIFEST_NAME, *ANCILLARY_FILES}
    entries = [p for p in _list_dir(root) if p.name not in own]
    image_stems = {p.stem for p in entries if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()}
    images: list[Path] = []
    masks: list[Path] = []
    hint_files: dict[str, list[Path]] = {}
    for path in entries:
        stem, mark, hint = path.stem.rpartition(HINT_MARK)
        # A hint only beside an image of its stem: other names keep their old meaning.
        if mark and stem in image_stems and path.suffix.lower() in IMAGE_SUFFIXES:
            name = _hint_name(hint, path, result.skipped)
            if name is not None:
                hint_files.setdefault(name, []).append(path)
        else:
            (masks if path.stem.endswith(MASK_SUFFIX) else images).append(path)
    matched = _match(
        _by_stem(images, result.skipped),
        _by_stem(masks, result.skipped, MASK_SUFFIX),
        result.skipped,
    )
    pairs = _named_pairs(matched, sanitize_name(root.resolve().name), dataset, _OUTPUT_NAME)
    hints = {
        name: _by_stem(files, result.skipped, HINT_MARK + name)
        for name, files in hint_files.items()
    }
    result.pairs = _attach_hints(pairs, hints, result.skipped)
    return result


# nnU-Net's 2D image reader (NaturalImage2DIO) reads these: lossless, as class ids must be.
NNUNET_ENDINGS = (".png", ".bmp", ".tif", ".tiff")


def _nnunet_settings(root: Path) -> tuple[str, tuple[int, ...], tuple[int, ...]]:
    """(file ending, lesion ids, every id) from an nnU-Net v2 raw dataset's dataset.json:
    every label but background (0) and ``ignore`` is lesion (a region label lists its ids)."""
    path = root / "dataset.json"
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise SiamdiffError("no dataset.json: not an nnU-Net v2 raw dataset", root) from exc
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SiamdiffError(f"cannot read ({first_line(exc)})", path) from exc
    ending = settings.get("file_ending") if isinstance(settings, dict) else None
    labels = settings.get("labels") if isinstance(settings, dict) else None
    if not isinstance(ending, str):
        raise SiamdiffError(f"file_ending must be a string such as '.png', got {ending!r}", path)
    if ending.lower() not in NNUNET_ENDINGS:
        raise SiamdiffError(
            f"file_ending {ending!r}: siamdiff reads 2D images in a lossless format, as "
            f"nnU-Net does ({', '.join(NNUNET_ENDINGS)}), not volumes or JPEG",
            path,
        )

    def class_ids(value: Any) -> list[int] | None:
        values = value if isinstance(value, list) else [value]
        return values if all(type(v) is int and v >= 0 for v in values) else None

    ids = {n: class_ids(v) for n, v in labels.items()} if isinstance(labels, dict) else None
    if ids is None or any(v is None for v in ids.values()):
        raise SiamdiffError(
            "labels must map each class name to its integer id (or a region's list of ids), "
            f"as {{'background': 0, 'polyp': 1}}; got {labels!r}",
            path,
        )
    known = {i for values in ids.values() for i in values} | {0}
    lesion = known - {0, *ids.get("ignore", [])}
    if not lesion:
        raise SiamdiffError("labels name no class besides background and ignore", path)
    return ending, tuple(sorted(lesion)), tuple(sorted(known))


def read_nnunet(root: Path, dataset: str | None = None) -> ReadResult:
    """An nnU-Net v2 raw dataset: ``imagesTr/CASE_0000.EXT`` (grey or RGB) and
    ``labelsTr/CASE.EXT``; every case is its own group (siamdiff's own names keep theirs),
    every label but background and ignore is lesion. A case with more channel files
    (``CASE_0001``) is refused: its image is not one file. ``imagesTs``/``labelsTs`` are not
    read (README): siamdiff draws its own group-disjoint split."""
    ending, lesion, known = _nnunet_settings(root)
    result = ReadResult()
    images: dict[str, Path] = {}
    for path in _list_dir(_subdir(root, "imagesTr")):
        case, _, channel = path.name.removesuffix(ending).rpartition("_")
        if not path.name.endswith(ending) or not (case and re.fullmatch(r"\d{4}", channel)):
            result.skipped.append((path, f"not CASE_0000{ending}"))
        elif channel != "0000":
            raise SiamdiffError(
                f"channel file {channel} of case {case!r}: siamdiff reads one image file per "
                "case (_0000, grey or RGB)",
                path,
            )
        else:
            images[case] = path
    labels = {}
    for path in _list_dir(_subdir(root, "labelsTr")):
        if path.name.endswith(ending):
            labels[path.name.removesuffix(ending)] = path
        else:
            result.skipped.append((path, f"not CASE{ending}"))
    matched = _match(images, labels, result.skipped)
    default = sanitize_name(re.sub(r"^Dataset\d+_", "", root.resolve().name))
    result.pairs = [
        replace(pair, labels=(lesion, known))
        for pair, _ in _named_pairs(matched, default, dataset, _SYNTHETIC_NAME)
    ]
    return result


READERS: dict[str, Callable[..., ReadResult]] = {
    "kvasir-seg": read_kvasir_seg,
    "cvc-clinicdb": read_cvc_clinicdb,
    "pranet": read_pranet,
    "folder": read_folder,
    "nnunet": read_nnunet,
}


def read_source(kind: str, root: str | Path, dataset: str | None = None) -> ReadResult:
    """All image-mask pairs of the ``kind`` layout under ``root``, plus what was skipped and why.

    ``dataset`` overrides the dataset name (sanitised). Unknown kinds, a missing ``root`` or
    missing required subfolders raise a one-line :class:`SiamdiffError` naming the directory.
    """
    reader = READERS.get(kind)
    if reader is None:
        raise SiamdiffError(
            f"unknown source kind {kind!r} (choose from {', '.join(READERS)})", root
        )
    root = Path(root)
    _list_dir(root)
    return reader(root, sanitize_name(dataset)) if dataset else reader(root)

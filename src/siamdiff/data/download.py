"""Download Kvasir-SEG from its official site, for users with internet access.

The archive streams into a temporary folder beside the destination, is checked
(zip, optional SHA-256, safe entry names, images/ and masks/ present), and is
extracted there; the folder is renamed into place only when all of it succeeded:
a failed download leaves nothing behind, a killed one is cleared by the next run.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import IO

from tqdm.auto import tqdm

from siamdiff.atomic import atomic_output_dir
from siamdiff.errors import SiamdiffError

KVASIR_URL = "https://datasets.simula.no/downloads/kvasir-seg.zip"
KVASIR_FOLDER = "Kvasir-SEG"
REQUIRED_FOLDERS = ("images", "masks")
_CHUNK = 1 << 20

CVC_CLINICDB_HELP = (
    "CVC-ClinicDB has no direct public download: request it from the dataset page "
    "https://polyp.grand-challenge.org/CVCClinicDB/ (registration required), unpack it, and "
    "point siamdiff at the folder holding 'Original' and 'Ground Truth'."
)


def _fetch(url: str, target: Path, progress: bool, timeout: float) -> str:
    """Stream ``url`` into ``target``; returns the SHA-256 of the bytes received."""
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(target, "wb") as out:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            with tqdm(
                total=total, unit="B", unit_scale=True, desc=KVASIR_FOLDER, disable=not progress
            ) as bar:
                received = 0
                for chunk in iter(lambda: response.read(_CHUNK), b""):
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as exc:
        raise SiamdiffError(f"download failed: HTTP {exc.code} {exc.reason}", url) from exc
    except urllib.error.URLError as exc:
        raise SiamdiffError(f"download failed: {exc.reason}", url) from exc
    except ValueError as exc:  # urllib's "unknown url type"
        raise SiamdiffError(f"not a URL urllib can open ({exc})", url) from exc
    except (http.client.HTTPException, OSError) as exc:
        raise SiamdiffError(f"download failed: {type(exc).__name__}: {exc}", url) from exc
    if total is not None and received != total:
        raise SiamdiffError(f"download truncated: got {received} of {total} bytes", url)
    return digest.hexdigest()


def _root_prefix(names: list[str], url: str) -> str:
    """The folder inside the archive holding images/ and masks/ (any depth, any case)."""
    folders: dict[str, set[str]] = {}
    for name in names:
        parts = PurePosixPath(name).parts
        for depth in range(len(parts) - 1):
            prefix = "".join(f"{part}/" for part in parts[:depth])
            folders.setdefault(prefix, set()).add(parts[depth].lower())
    roots = sorted(p for p, held in folders.items() if held >= set(REQUIRED_FOLDERS))
    if not roots:
        raise SiamdiffError("archive has no images/ and masks/ folders (not Kvasir-SEG?)", url)
    if len(roots) > 1:
        listed = ", ".join(root or "(top)" for root in roots)
        raise SiamdiffError(f"archive holds several images/ + masks/ folders: {listed}", url)
    return roots[0]


def _check_name(name: str, url: str) -> None:
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts or "\\" in name or ":" in name:
        raise SiamdiffError(f"archive entry {name!r} points outside its folder; refused", url)


# What reading a damaged, encrypted or exotic archive raises: zipfile's own errors, a
# password (RuntimeError), an unsupported compression method (NotImplementedError), a bad
# member offset or a broken bzip2/lzma stream (OSError).
_ARCHIVE_ERRORS = (
    zipfile.BadZipFile,
    zlib.error,
    EOFError,
    RuntimeError,
    NotImplementedError,
    OSError,
)


class _ArchiveReadError(Exception):
    """A read of the archive failed inside a write block (kept apart from write errors)."""


def _read_member(src: IO[bytes]) -> bytes:
    try:
        return src.read(_CHUNK)
    except _ARCHIVE_ERRORS as exc:
        raise _ArchiveReadError(exc) from exc


def _unpack_member(src: IO[bytes], target: Path, name: str, shown: Path) -> None:
    """Copy the archive member ``name`` to ``target``, fsync'd; a failed write (a full disk, a
    file-size limit, an entry clashing with another) names it and ``shown``, where it was
    going (``target`` lies in a temporary folder, gone by then); a failed read propagates."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as dst:
            while chunk := _read_member(src):
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
    except OSError as exc:
        raise SiamdiffError(
            f"cannot write archive entry {name!r} ({exc.strerror or exc})", shown
        ) from exc


def _extract(archive: Path, out: Path, url: str, final: Path) -> None:
    """Unpack ``archive`` (from ``url``) into ``out``, the temporary folder of ``final``."""
    try:
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.infolist() if not m.filename.startswith("__MACOSX/")]
            for member in members:
                _check_name(member.filename, url)
            prefix = _root_prefix([m.filename for m in members if not m.is_dir()], url)
            for member in members:
                if member.is_dir() or not member.filename.startswith(prefix):
                    continue
                relative = member.filename[len(prefix) :]
                with zf.open(member) as src:
                    _unpack_member(src, out / relative, member.filename, final / relative)
    except _ArchiveReadError as exc:
        reason = exc.__cause__
        raise SiamdiffError(f"cannot unpack the archive ({reason})", url) from reason
    except _ARCHIVE_ERRORS as exc:
        raise SiamdiffError(f"is not a valid zip archive ({exc})", url) from exc


def checked_sha256(text: str) -> str:
    """A SHA-256 as typed or pasted (surrounding spaces, upper case, ``sha256sum``'s
    ``HASH  FILE`` line) in lower-case hex; a one-line error otherwise."""
    words = text.split()
    digest = words[0].lower() if words else ""
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise SiamdiffError(f"--sha256 {text!r} is not a SHA-256 (64 hexadecimal digits)")
    return digest


def download_kvasir(
    dest: str | Path,
    url: str = KVASIR_URL,
    expected_sha256: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
    timeout: float = 60.0,
) -> Path:
    """Download and unpack Kvasir-SEG; returns ``dest/Kvasir-SEG`` (images/, masks/, bboxes).

    Works with the official archive (top folder ``Kvasir-SEG/``) and with one
    without a top folder. Any failure raises a one-line SiamdiffError naming the
    URL and leaves nothing new inside ``dest`` (nor ``dest`` itself, if it made it).
    """
    expected = None if expected_sha256 is None else checked_sha256(expected_sha256)
    source = url  # what errors name: the URL, or the archive's path
    if "://" not in url:  # an archive already on disk (a browser download, a lab mirror)
        if not Path(url).is_file():
            raise SiamdiffError("is neither a URL nor an existing file", url)
        source = str(Path(url).resolve())
        url = Path(url).resolve().as_uri()
    target = Path(dest) / KVASIR_FOLDER
    # The archive lies inside the output's temporary folder: a killed download is cleared
    # with it by the next run (atomic_output_dir clears abandoned temporary folders).
    with atomic_output_dir(target, overwrite=overwrite) as out:
        archive = out / ".kvasir-seg.zip"
        sha256 = _fetch(url, archive, progress, timeout)
        if expected is not None and sha256 != expected:
            raise SiamdiffError(f"SHA-256 mismatch: got {sha256}, expected {expected}", source)
        _extract(archive, out, source, target)
        archive.unlink()
    return target

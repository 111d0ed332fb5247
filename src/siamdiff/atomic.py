"""Atomic file and directory writes (a reader never sees a half-written output), and the
matching read of the JSON files siamdiff writes."""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from siamdiff.errors import SiamdiffError


def _process_umask() -> int:
    mask = os.umask(0)  # umask can only be read by setting it: set it straight back
    os.umask(mask)
    return mask


# mkstemp / mkdtemp create owner-only (0600 / 0700) entries; outputs get the modes a plain
# open() / mkdir() would give them, so a lab's shared dataset or model stays readable.
_UMASK = _process_umask()
FILE_MODE = 0o666 & ~_UMASK
DIR_MODE = 0o777 & ~_UMASK


def fsync_dir(directory: Path) -> None:
    # The rename itself must reach the disk, not only the file's bytes.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file under ``root`` and every directory entry to disk (files written by
    other libraries, such as a training checkpoint, before it is renamed into place)."""
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    for directory in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        fsync_dir(directory)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary sibling, fsync, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            with contextlib.suppress(OSError):  # some network filesystems refuse chmod
                os.fchmod(handle.fileno(), FILE_MODE)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename is None:
            # A full disk fails in write/fsync, whose errors name no file: name it for the user.
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path, what: str, missing_hint: str) -> Any:
    """Parse ``path``, a JSON file siamdiff wrote; a one-line SiamdiffError names the file
    when it is absent (``"no NAME here (missing_hint)"``) or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise SiamdiffError(f"no {path.name} here ({missing_hint})", path.parent)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SiamdiffError(f"cannot read {what} ({exc})", path) from exc


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of a uint8 HxW (grey) or HxWx3 (RGB) array, deterministic for equal input."""
    if array.dtype != np.uint8:
        raise ValueError(f"encode_png expects uint8, got {array.dtype}")
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def atomic_save_png(path: str | Path, array: np.ndarray) -> bytes:
    """Save ``array`` as PNG atomically; returns the bytes written (to hash them)."""
    data = encode_png(array)
    atomic_write_bytes(path, data)
    return data


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``out`` only if the block succeeds.

    On any exception the temporary directory is removed and ``out`` (new or
    previous) is left exactly as it was.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise SiamdiffError("already exists (pass --overwrite to replace it)", out)
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=parent))
        with contextlib.suppress(OSError):
            tmp.chmod(DIR_MODE)
    except OSError as exc:
        raise SiamdiffError(f"cannot create output directory ({exc.strerror})", parent) from exc
    trash: Path | None = None
    try:
        yield tmp
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=parent))
            os.replace(out, trash / out.name)
        os.replace(tmp, out)
        fsync_dir(parent)
    except BaseException:
        if trash is not None and (trash / out.name).exists() and not out.exists():
            os.replace(trash / out.name, out)  # the swap failed half-way: put the old one back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if trash is not None and out.exists():  # else the old output is still in there
            shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def exclusive_writer(out: Path, rank: int, job: str) -> Iterator[None]:
    """Hold ``.{out}.lock-{rank}`` beside ``out`` for the whole job.

    A second job on the same output (same rank) fails at once instead of interleaving its
    files with the first's. The lock lives beside ``out`` so that ``--overwrite`` cannot
    delete it, and the OS drops it when the holder dies.
    """
    lock_path = out.parent / f".{out.name}.lock-{rank}"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise SiamdiffError(
                f"another `{job}` is writing here (rank {rank}); wait for it", out
            ) from exc
        yield

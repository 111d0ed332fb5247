"""Atomic file and directory writes (a reader never sees a half-written output), and the
matching read of the JSON files siamdiff writes."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import glob
import io
import json
import os
import re
import secrets
import shutil
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from siamdiff.errors import SiamdiffError


def _create_file(directory: Path, prefix: str, suffix: str) -> tuple[int, Path]:
    """A new file with a random name, its mode left to the process's umask as a plain open()
    would (mkstemp's 0600 would hide a lab's shared dataset from its members)."""
    while True:
        path = directory / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), path
        except FileExistsError:
            continue


def _create_dir(directory: Path, prefix: str, suffix: str) -> Path:
    """A new directory with a random name and the umask's mode (see _create_file)."""
    while True:
        path = directory / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            path.mkdir(0o777)
            return path
        except FileExistsError:
            continue


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
    """Write ``data`` to ``path`` via a temporary sibling, fsync, then rename. A symlinked
    ``path`` is written where it points (as atomic_output_dir does), not replaced."""
    path = Path(path)
    if path.is_symlink():
        path = path.resolve()
    if path.exists() and not path.is_file():  # as root, a device (/dev/null) would be replaced
        raise SiamdiffError(
            "exists and is not a file (a folder, device or pipe): name a file", path
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_file(path.parent, f".{path.name}.", ".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename in (None, str(tmp)):
            # A full disk fails in write/fsync, whose errors name no file, and a failed rename
            # names the temporary file, gone by now: name the output for the user.
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise
    fsync_dir(path.parent)


def json_line(entry: Mapping[str, Any]) -> bytes:
    """``entry`` as one line of JSON (keys sorted: the same entry, the same bytes)."""
    return json.dumps(entry, sort_keys=True).encode("utf-8") + b"\n"


class JsonLinesJournal:
    """An append-only log of JSON lines, each fsync'd as it is written: what a long job has
    finished survives a crash or Ctrl-C, and a rerun skips it."""

    def __init__(self, path: Path) -> None:
        self.handle = open(path, "a+b")  # noqa: SIM115 (held across entries; see close())
        # A crash mid-line leaves a torn last line; start on a fresh one so it stays alone.
        if self.handle.seek(0, os.SEEK_END) > 0:
            self.handle.seek(-1, os.SEEK_END)
            if self.handle.read(1) != b"\n":
                self.handle.write(b"\n")

    def append(self, entry: Mapping[str, Any]) -> None:
        self.handle.write(json_line(entry))
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def close(self) -> None:
        self.handle.close()


def check_writable_file(
    path: str | Path, inputs: Mapping[str, str | Path | None] | None = None
) -> None:
    """Refuse, before a long job, an output file that names a folder, lies inside one of the
    job's ``inputs`` (what -> folder; see :func:`check_apart`) or where nothing can be
    written. Nothing is created: a job refused later on leaves no folder behind (its folders
    are made when it writes)."""
    path = Path(path)
    if path.is_dir():
        raise SiamdiffError("is a folder: name a file for the output", path)
    for what, source in (inputs or {}).items():
        if source is not None:
            check_apart(path, source, what)
    existing = path.parent.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise SiamdiffError("is not a folder: the output cannot be written below it", existing)
    try:
        handle, probe = _create_file(existing, f".{path.name}.", ".probe")
        os.close(handle)
        probe.unlink()
    except OSError as exc:
        raise SiamdiffError(f"cannot write there ({exc.strerror or exc})", existing) from exc


def check_apart(out: str | Path, source: str | Path, what: str) -> None:
    """Refuse an output folder that is ``source``, lies inside it or holds it: writing it would
    change the input it is made from, and replacing it (--overwrite) delete that input."""
    target, source = Path(out).resolve(), Path(source).resolve()
    if target == source or source in target.parents or target in source.parents:
        raise SiamdiffError(f"is, holds or lies inside {what} {source}: write elsewhere", out)


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


def _pid_namespace() -> int:
    """This process's PID namespace (0 where /proc has none): two containers sharing a host
    name and a volume do not see each other's processes."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _boot() -> str:
    """This boot of this kernel (8 hex digits; 0 where unknown). The host's own PID namespace
    has the same number on every Linux machine, so two machines with one host name (cluster
    nodes, cloned containers) sharing a volume are told apart by their boot ids."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().replace("-", "")[:8]
    except OSError:
        return "0"


def _owner() -> str:
    """Who made a temporary entry: the host, boot, PID namespace and process, so that a later
    job can tell an abandoned one (its process is gone) from one still being written."""
    return f"{socket.gethostname()}-{_boot()}-{_pid_namespace()}-{os.getpid()}"


def _abandoned(entry: Path, name: str) -> bool:
    found = re.fullmatch(
        rf"\.{re.escape(name)}\.(?P<host>.+)-(?P<boot>[0-9a-f]+)-(?P<ns>\d+)-(?P<pid>\d+)"
        r"\.[0-9a-f]{8}\.(partial|old)",
        entry.name,
    )
    here = (socket.gethostname(), _boot(), str(_pid_namespace()))
    if found is None or (found["host"], found["boot"], found["ns"]) != here or "0" in here[1:]:
        return False  # another machine's or container's (a shared volume): it may be alive
    try:
        os.kill(int(found["pid"]), 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        return False
    return False


def _clear_abandoned(out: Path) -> None:
    """Remove what a killed job left beside ``out``: its half-written output, or, when it
    died between the two renames of a swap, put the previous output back in place."""
    for entry in sorted(out.parent.glob(f".{glob.escape(out.name)}.*")):
        if not entry.is_dir() or not _abandoned(entry, out.name):
            continue
        if entry.suffix == ".old" and not out.exists():
            with contextlib.suppress(FileNotFoundError):  # another job put it back first
                os.replace(entry, out)
        shutil.rmtree(entry, ignore_errors=True)


RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


def _renameat2(first: Path, second: Path, flags: int) -> bool:
    """Linux renameat2: EXCHANGE swaps two entries in one step (no moment without an output),
    NOREPLACE renames only if ``second`` is absent (EEXIST otherwise). False where the system
    or filesystem cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_cwd = -100
    if renameat2(at_cwd, os.fsencode(first), at_cwd, os.fsencode(second), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(first), None, str(second))


def _exchange(first: Path, second: Path) -> bool:
    return _renameat2(first, second, RENAME_EXCHANGE)


def _aside_name(out: Path) -> Path:
    """A free sibling name for the previous output during a two-rename swap: a sibling, not a
    subfolder, because moving a folder to another parent needs write access to the folder."""
    while True:
        old = out.parent / f".{out.name}.{_owner()}.{secrets.token_hex(4)}.old"
        if not os.path.lexists(old):
            return old


def _swap_in(new: Path, out: Path) -> Path:
    """Put ``new`` in the place of the existing ``out``; returns where the previous output is
    now, to delete."""
    if _exchange(new, out):
        return new
    old = _aside_name(out)
    os.rename(out, old)
    try:
        os.replace(new, out)
    except BaseException:
        os.rename(old, out)
        raise
    return old


def _appeared(given: Path) -> SiamdiffError:
    return SiamdiffError(
        "appeared while this job ran (another job writing here?); it is left as it is and "
        "this job's output is discarded",
        given,
    )


def _move_in(new: Path, out: Path, given: Path) -> None:
    """Rename ``new`` to the absent ``out``; an ``out`` made meanwhile by another job stays."""
    try:
        if not _renameat2(new, out, RENAME_NOREPLACE):
            os.rename(new, out)  # replaces an empty folder: the best a plain rename can do
    except OSError as exc:
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
        raise _appeared(given) from exc


def check_replaceable(out: Path) -> None:
    """Refuse, before any work, an output folder that cannot be renamed away: the one this
    process works in (or one above it), or a mount point."""
    if Path.cwd().resolve().is_relative_to(out.resolve()):
        raise SiamdiffError("holds the current directory: name a new folder for the output", out)
    if os.path.ismount(out.resolve()):  # a symlink to one is no mount point by itself
        raise SiamdiffError(
            "is a mount point, which cannot be replaced: name a folder inside it", out
        )


def remove_tree(out: Path) -> None:
    """Delete the folder ``out`` (a symlink: where it points), moved out of the way first: a
    deletion interrupted in place would leave under its name part of its files, its manifest
    maybe among those left, and look finished. A kill mid-way leaves a hidden sibling that
    :func:`clear_removed` deletes."""
    out = out.resolve()
    doomed = out.with_name(f".{out.name}.deleting-{os.getpid()}")
    out.rename(doomed)
    shutil.rmtree(doomed)


def clear_removed(out: Path) -> None:
    """Delete what an interrupted :func:`remove_tree` of ``out`` left beside it."""
    out = out.resolve()
    for leftover in out.parent.glob(f".{glob.escape(out.name)}.deleting-*"):
        shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``out`` only if the block succeeds.

    On any exception the temporary directory is removed and ``out`` (new or previous) is left
    exactly as it was, the folders made to hold it removed again. A symlinked ``out`` is
    written where it points.
    """
    given = Path(out)
    out = given.resolve()
    check_replaceable(given)
    try:
        if out.parent.is_dir():  # first: a swap killed half-way left the previous output aside
            _clear_abandoned(out)
    except OSError as exc:
        raise SiamdiffError(f"cannot clear leftovers ({exc.strerror})", out.parent) from exc
    if out.exists() and not overwrite:
        raise SiamdiffError("already exists (pass --overwrite to replace it)", given)
    if out.exists() and not out.is_dir():
        raise SiamdiffError("is a file; the output is a folder: name another", given)
    new_parents = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = _create_dir(out.parent, f".{out.name}.{_owner()}.", ".partial")
        try:  # held open to the end: the folder's inode cannot be reused by one made again
            handle = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            tmp.rmdir()
            raise
    except OSError as exc:
        raise SiamdiffError(f"cannot create output directory ({exc.strerror})", out.parent) from exc
    succeeded = False
    try:
        yield tmp
        made = os.fstat(handle)
        now = os.stat(tmp, follow_symlinks=False) if os.path.lexists(tmp) else None
        if now is None or (now.st_dev, now.st_ino) != (made.st_dev, made.st_ino):
            # Removed by another job (a writer inside the block may have made it again,
            # holding only the files written since): what it holds is not this job's output.
            raise SiamdiffError(
                f"this job's temporary folder {tmp.name} was removed while it ran (another "
                "job clearing it?); run it again",
                given,
            )
        fsync_tree(tmp)  # the files themselves must be on disk before they replace the old ones
        if not out.exists():
            _move_in(tmp, out, given)
        elif not overwrite:  # another job wrote it while this one ran: theirs stays
            raise _appeared(given)
        else:
            tmp = _swap_in(tmp, out)
        fsync_dir(out.parent)
        succeeded = True
    finally:
        os.close(handle)
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in new_parents if not succeeded else ():  # innermost first, if empty
            with contextlib.suppress(OSError):
                folder.rmdir()


@contextlib.contextmanager
def exclusive_writer(out: Path, rank: int, job: str) -> Iterator[None]:
    """Hold ``.{out}.lock-{rank}`` beside ``out`` for the whole job.

    A second job on the same output (same rank) fails at once instead of interleaving its
    files with the first's. The lock lives beside ``out`` so that ``--overwrite`` cannot
    delete it, and the OS drops it when the holder dies. The holder removes the file when
    it is done, still holding it: a job that opened it before then finds it gone and
    takes a fresh one.
    """
    out = out.resolve()  # `--out .` has no name of its own: the lock goes beside the folder
    lock_path = out.parent / f".{out.name}.lock-{rank}"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        handle = open(lock_path, "a")  # noqa: SIM115 (held across the yield below)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            handle.close()
            raise SiamdiffError(
                f"another `{job}` is writing here (rank {rank}); wait for it", out
            ) from exc
        try:
            current = os.stat(lock_path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        handle.close()  # removed by its last holder after this job opened it
    try:
        yield
    finally:
        lock_path.unlink(missing_ok=True)
        handle.close()

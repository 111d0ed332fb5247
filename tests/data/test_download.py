"""Kvasir-SEG download against a local HTTP server: success and every failure leaves no trace."""

from __future__ import annotations

import errno
import hashlib
import io
import struct
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import siamdiff.data.download as download_module
from siamdiff.data.download import KVASIR_FOLDER, download_kvasir
from siamdiff.errors import SiamdiffError


def _jpeg(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _kvasir_entries(top: str = "Kvasir-SEG/") -> dict[str, bytes]:
    entries = {"__MACOSX/._junk": b"resource fork"}
    for name, value in (("a", 40), ("b", 200)):
        entries[f"{top}images/{name}.jpg"] = _jpeg(value)
        entries[f"{top}masks/{name}.jpg"] = _jpeg(255 - value)
    entries[f"{top}kavsir_bboxes.json"] = b"{}"
    return entries


def _write_zip(path: Path, entries: dict[str, bytes]) -> bytes:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path.read_bytes()


class _Handler(SimpleHTTPRequestHandler):
    """Serves the folder; ``/short.zip`` promises more bytes than it sends."""

    def do_GET(self) -> None:
        if self.path == "/short.zip":
            self.send_response(200)
            self.send_header("Content-Length", "4096")
            self.end_headers()
            self.wfile.write(b"PK\x03\x04 only the start")
            return
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep pytest output clean


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(base URL, folder it serves) of an HTTP server on 127.0.0.1."""
    root = tmp_path / "www"
    root.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


def _fails(dest: Path, url: str, match: str, **kwargs: object) -> None:
    """The download raises a one-line error naming ``url`` and leaves ``dest`` empty."""
    with pytest.raises(SiamdiffError, match=match) as info:
        download_kvasir(dest, url=url, progress=False, **kwargs)
    assert url in str(info.value) and "\n" not in str(info.value)
    assert list(dest.iterdir()) == []


@pytest.mark.parametrize("top", ["Kvasir-SEG/", "", "kvasir-seg/Kvasir-SEG/"])
def test_download_with_or_without_top_folder(served, dest: Path, top: str):
    base, root = served
    entries = _kvasir_entries(top)
    sha = hashlib.sha256(_write_zip(root / "kvasir-seg.zip", entries)).hexdigest()
    out = download_kvasir(dest, url=f"{base}/kvasir-seg.zip", expected_sha256=sha, progress=False)
    assert out == dest / KVASIR_FOLDER
    assert [p.name for p in dest.iterdir()] == [KVASIR_FOLDER]  # no temporary leftovers
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == [
        "images/a.jpg",
        "images/b.jpg",
        "kavsir_bboxes.json",
        "masks/a.jpg",
        "masks/b.jpg",
    ]
    assert (out / "masks" / "b.jpg").read_bytes() == entries[f"{top}masks/b.jpg"]


def test_a_local_archive_path_works_and_a_wrong_one_is_one_line(dest: Path, tmp_path: Path):
    archive = tmp_path / "downloads" / "kvasir-seg.zip"
    archive.parent.mkdir()
    _write_zip(archive, _kvasir_entries())
    out = download_kvasir(dest, url=str(archive), progress=False)
    assert (out / "masks" / "b.jpg").is_file()
    other = tmp_path / "other"
    other.mkdir()
    _fails(other, str(tmp_path / "missing.zip"), "is neither a URL nor an existing file")
    _fails(other, "gopher://example.org/kvasir-seg.zip", "download failed")
    _fails(other, "://kvasir-seg.zip", "not a URL urllib can open")
    page = tmp_path / "downloads" / "kvasir-seg.html"  # a browser saved the page, not the zip
    page.write_text("<html>")
    _fails(other, str(page), f"^{page}: is not a valid zip archive")


def test_an_entry_clashing_with_another_names_it(dest: Path, tmp_path: Path):
    """A file `masks` beside `masks/b.jpg`: the error named a temporary file, gone since."""
    archive = tmp_path / "kvasir-seg.zip"
    _write_zip(archive, {"Kvasir-SEG/masks": b"x", **_kvasir_entries()})
    final = dest / KVASIR_FOLDER / "masks"
    match = rf"^{final}/a\.jpg: cannot write archive entry 'Kvasir-SEG/masks/a\.jpg' \("
    with pytest.raises(SiamdiffError, match=match):
        download_kvasir(dest, url=str(archive), progress=False)
    assert list(dest.iterdir()) == []


def test_existing_destination_needs_overwrite(served, dest: Path):
    base, root = served
    _write_zip(root / "kvasir-seg.zip", _kvasir_entries())
    url = f"{base}/kvasir-seg.zip"
    (dest / KVASIR_FOLDER).mkdir()
    (dest / KVASIR_FOLDER / "mine.txt").write_text("keep")
    with pytest.raises(SiamdiffError, match="already exists"):
        download_kvasir(dest, url=url, progress=False)
    assert (dest / KVASIR_FOLDER / "mine.txt").read_text() == "keep"
    out = download_kvasir(dest, url=url, progress=False, overwrite=True)
    assert not (out / "mine.txt").exists() and (out / "images" / "a.jpg").is_file()
    assert [p.name for p in dest.iterdir()] == [KVASIR_FOLDER]


def test_sha256_mismatch(served, dest: Path):
    base, root = served
    _write_zip(root / "kvasir-seg.zip", _kvasir_entries())
    _fails(dest, f"{base}/kvasir-seg.zip", "SHA-256 mismatch", expected_sha256="0" * 64)


def test_a_pasted_sha256_is_accepted_and_a_malformed_one_refused_before_fetching(
    served, dest: Path
):
    base, root = served
    sha = hashlib.sha256(_write_zip(root / "kvasir-seg.zip", _kvasir_entries())).hexdigest()
    pasted = f" {sha.upper()}  kvasir-seg.zip\n"  # sha256sum's line, in upper case
    download_kvasir(dest, url=f"{base}/kvasir-seg.zip", expected_sha256=pasted, progress=False)
    with pytest.raises(SiamdiffError, match="is not a SHA-256"):
        download_kvasir(dest, url=f"{base}/absent.zip", expected_sha256=sha[:-1], progress=False)


def test_archive_folders_in_another_case_are_found(served, dest: Path):
    base, root = served
    entries = {k.replace("images/", "Images/"): v for k, v in _kvasir_entries().items()}
    _write_zip(root / "kvasir-seg.zip", entries)
    out = download_kvasir(dest, url=f"{base}/kvasir-seg.zip", progress=False)
    assert (out / "Images" / "a.jpg").is_file() and (out / "masks" / "a.jpg").is_file()


def test_an_archive_with_two_datasets_is_refused(served, dest: Path):
    base, root = served
    _write_zip(root / "two.zip", {**_kvasir_entries("A/"), **_kvasir_entries("B/")})
    _fails(dest, f"{base}/two.zip", r"several images/ \+ masks/ folders: A/, B/")


def test_http_404(served, dest: Path):
    base, _ = served
    _fails(dest, f"{base}/missing.zip", "HTTP 404")


def test_unreachable_server(dest: Path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    port = server.server_address[1]
    server.server_close()  # nothing listens on this port any more
    _fails(dest, f"http://127.0.0.1:{port}/kvasir-seg.zip", "download failed")


def test_a_failed_download_removes_the_folders_it_made(served, tmp_path: Path):
    base, _ = served
    with pytest.raises(SiamdiffError, match="HTTP 404"):
        download_kvasir(tmp_path / "new" / "raw", url=f"{base}/missing.zip", progress=False)
    assert not (tmp_path / "new").exists()


def test_truncated_transfer(served, dest: Path):
    base, _ = served
    _fails(dest, f"{base}/short.zip", "download truncated")


@pytest.mark.parametrize("damage", ["not a zip", "cut short"])
def test_corrupt_archive(served, dest: Path, damage: str):
    base, root = served
    data = _write_zip(root / "kvasir-seg.zip", _kvasir_entries())
    body = b"<html>login</html>" if damage == "not a zip" else data[: len(data) // 2]
    (root / "kvasir-seg.zip").write_bytes(body)
    _fails(dest, f"{base}/kvasir-seg.zip", "not a valid zip archive")


def test_zip_slip_entry_is_refused(served, dest: Path, tmp_path: Path):
    base, root = served
    _write_zip(root / "kvasir-seg.zip", {**_kvasir_entries(), "Kvasir-SEG/../../evil.txt": b"x"})
    _fails(dest, f"{base}/kvasir-seg.zip", "points outside")
    assert not list(tmp_path.rglob("evil.txt"))


def test_archive_without_masks(served, dest: Path):
    base, root = served
    entries = {k: v for k, v in _kvasir_entries().items() if "/masks/" not in k}
    _write_zip(root / "kvasir-seg.zip", entries)
    _fails(dest, f"{base}/kvasir-seg.zip", "no images/ and masks/")


def _patch_headers(data: bytes, offset: int, value: int, width: str = "<H") -> bytes:
    """Set a field of every local and central header of a zip (encryption flag, method)."""
    patched = bytearray(data)
    for signature, field in ((b"PK\x03\x04", offset), (b"PK\x01\x02", offset + 2)):
        start = patched.find(signature)
        while start != -1:
            struct.pack_into(width, patched, start + field, value)
            start = patched.find(signature, start + 4)
    return bytes(patched)


@pytest.mark.parametrize(
    ("offset", "value", "message"),
    [(6, 1, "password required"), (8, 99, "compression method")],
    ids=["encrypted", "unknown method"],
)
def test_encrypted_or_exotic_archives_are_one_line(
    served, dest: Path, offset: int, value: int, message: str
):
    base, root = served
    data = _write_zip(root / "kvasir-seg.zip", _kvasir_entries())
    (root / "kvasir-seg.zip").write_bytes(_patch_headers(data, offset, value))
    _fails(dest, f"{base}/kvasir-seg.zip", message)


def test_a_failed_write_names_the_file(served, dest: Path, monkeypatch: pytest.MonkeyPatch):
    base, root = served
    _write_zip(root / "kvasir-seg.zip", _kvasir_entries())

    def disk_full(descriptor: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(download_module.os, "fsync", disk_full)
    with pytest.raises(
        SiamdiffError, match=r"\.jpg: cannot write archive entry '[^']+\.jpg' \(No space"
    ):
        download_kvasir(dest, url=f"{base}/kvasir-seg.zip", progress=False)
    assert list(dest.iterdir()) == []


def test_a_killed_download_is_cleared_by_the_next(served, dest: Path):
    """SIGKILL mid-transfer (an OOM kill, a job scheduler): its half archive lies in the
    output's temporary folder, which the next download clears."""
    base, root = served
    _write_zip(root / "kvasir-seg.zip", _kvasir_entries())
    killed = (
        "import os, signal\n"
        "import siamdiff.data.download as d\n"
        "def fetch(url, target, progress, timeout):\n"
        "    target.write_bytes(b'PK half an archive')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "d._fetch = fetch\n"
        f"d.download_kvasir({str(dest)!r}, url={base + '/kvasir-seg.zip'!r}, progress=False)\n"
    )
    assert subprocess.run([sys.executable, "-c", killed], timeout=120).returncode == -9
    assert [p.name for p in dest.iterdir()] != []  # the killed job's temporary folder
    download_kvasir(dest, url=f"{base}/kvasir-seg.zip", progress=False)
    assert [p.name for p in dest.iterdir()] == [KVASIR_FOLDER]

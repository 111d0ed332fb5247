"""Fault injection: kill a real subprocess at a chosen moment, or fail a chosen fsync."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from tests.helpers import PHANTOM_SIZE

SRC = Path(__file__).resolve().parents[2] / "src"
# One thread, as in the in-process runs, so floating point (and thus the bytes) match them.
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])),
}
TINY_OVERRIDES = (
    f"data.transforms.size={PHANTOM_SIZE}",
    "train.batch_size=2",
    "train.sample_count=2",
    "train.sample_steps=2",
    "train.log_every=1",
)


def train_command(data: Path, run_dir: Path, *overrides: str) -> list[str]:
    """`siamdiff train tiny` with the same settings as tests.helpers.tiny_config."""
    return [
        sys.executable,
        "-m",
        "siamdiff",
        "train",
        "tiny",
        f"data.root={data}",
        f"run_dir={run_dir}",
        *TINY_OVERRIDES,
        *overrides,
    ]


def run_ok(command: Sequence[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]


def kill_when(command: Sequence[str], ready: Callable[[], bool], timeout: float = 300) -> None:
    """Start ``command`` and SIGKILL it as soon as ``ready()`` holds (polled every 10 ms).

    Fails the test if the command ends first: the kill must land mid-run to test anything.
    """
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            if process.poll() is not None:
                pytest.fail(
                    f"ended (rc {process.returncode}) before the kill point: "
                    f"{process.stderr.read().decode()[-2000:]}"
                )
            if time.monotonic() > deadline:
                pytest.fail("kill point not reached in time")
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL


def fail_fsync(
    monkeypatch: pytest.MonkeyPatch, where: str, after: int = 0, code: int = errno.ENOSPC
) -> None:
    """Make every fsync of a file whose path contains ``where``, after the first ``after``
    ones, fail with ``code``: a disk that fills up (or turns read-only) mid-way. The error
    names no file, as the kernel's does not."""
    real = os.fsync
    seen = [0]

    def fsync(fd: int) -> None:
        if where in os.readlink(f"/proc/self/fd/{fd}"):
            seen[0] += 1
            if seen[0] > after:
                raise OSError(code, os.strerror(code))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def error_line(stderr: str) -> str:
    """The CLI's one error line; fails unless it is the only one and ends stderr (progress
    bars may precede it)."""
    lines = stderr.splitlines()
    errors = [line for line in lines if line.startswith("siamdiff: error: ")]
    assert errors == lines[-1:], stderr[-2000:]
    return errors[0]

"""`siamdiff prepare` on a disk that fills up or turns read-only: the old output survives."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from siamdiff import cli
from siamdiff.data.phantom import make_phantom_dataset
from tests.fault.helpers import error_line, fail_fsync, snapshot


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS], ids=["disk-full", "read-only"])
def test_prepare_write_failure_is_one_line_and_keeps_the_old_output(
    tmp_path: Path, capsys, monkeypatch, code
):
    raw = make_phantom_dataset(tmp_path / "raw", n=8, size=32, groups=2, seed=3)
    out = tmp_path / "data"
    command = ["prepare", "--source", f"folder={raw}", "--out", str(out), "--size", "32"]
    command += ["--workers", "1"]
    assert cli.main(command) == 0
    before = snapshot(out)

    fail_fsync(monkeypatch, str(tmp_path / ".data."), after=5, code=code)
    assert cli.main([*command, "--overwrite"]) == 2
    err = error_line(capsys.readouterr().err)
    assert str(out) in err and os.strerror(code) in err
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "raw"]  # no temporaries left

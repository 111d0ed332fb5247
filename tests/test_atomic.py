"""atomic_output_dir: the output is the old one or the new one, whatever fails."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from siamdiff import atomic
from siamdiff.atomic import atomic_output_dir, atomic_write_text
from siamdiff.errors import SiamdiffError


def test_a_failed_swap_puts_the_previous_output_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the one-step exchange is unavailable the swap is two renames; the second failing
    leaves the previous output in place."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    real_replace = os.replace
    monkeypatch.setattr(atomic, "_exchange", lambda first, second: False)

    def fail_the_second_rename(source, target):
        if Path(source).name.endswith(".partial"):  # the new output moving into place
            raise OSError(28, "No space left on device")
        real_replace(source, target)

    monkeypatch.setattr(atomic.os, "replace", fail_the_second_rename)
    with pytest.raises(OSError), atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    monkeypatch.undo()
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no .partial, no .old left


def test_a_finished_block_replaces_the_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_an_output_that_appears_during_the_block_is_kept_without_overwrite(tmp_path: Path):
    """Two jobs with the same output: the second to finish must not delete the first's."""
    out = tmp_path / "out"
    with (
        pytest.raises(SiamdiffError, match="appeared while this job ran"),
        atomic_output_dir(out) as tmp,
    ):
        (tmp / "mine.txt").write_text("mine")
        out.mkdir()
        (out / "theirs.txt").write_text("theirs")
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_symlinked_output_is_written_where_it_points(tmp_path: Path) -> None:
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "real").mkdir()
    (tmp_path / "big" / "real" / "old.txt").write_text("old")
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "big" / "real")
    with atomic_output_dir(link, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert link.is_symlink()
    assert [p.name for p in (tmp_path / "big" / "real").iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big", "out"]
    assert [p.name for p in (tmp_path / "big").iterdir()] == ["real"]


def test_the_current_directory_is_refused_as_an_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    for out in (Path("."), tmp_path):
        with (
            pytest.raises(SiamdiffError, match="holds the current directory"),
            atomic_output_dir(out, overwrite=True),
        ):
            pass
    assert [p.name for p in tmp_path.iterdir()] == ["work"]


def test_outputs_get_the_modes_of_the_umask_in_force_when_written(tmp_path: Path) -> None:
    previous = os.umask(0o077)
    try:
        atomic_write_text(tmp_path / "private.json", "{}")
        with atomic_output_dir(tmp_path / "private") as tmp:
            (tmp / "x.txt").write_text("x")
    finally:
        os.umask(previous)
    assert (tmp_path / "private.json").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "private").stat().st_mode & 0o777 == 0o700


def test_a_killed_jobs_leftovers_are_cleared_by_the_next_job(tmp_path: Path) -> None:
    """A killed job leaves a hidden half-written output (removed by the next job on that
    output) or, killed between the two renames of a swap, the previous output aside (put back);
    a live process's or another machine's entries are left alone."""
    finished = subprocess.Popen(["true"])
    finished.wait()
    dead = finished.pid
    host = f"{socket.gethostname()}-{os.stat('/proc/self/ns/pid').st_ino}"
    out = tmp_path / "out"
    abandoned = tmp_path / f".out.{host}-{dead}.0123abcd.partial"
    abandoned.mkdir()
    (abandoned / "half.bin").write_bytes(b"x" * 10)
    aside = tmp_path / f".out.{host}-{dead}.4567cdef.old"
    (aside / "out").mkdir(parents=True)
    (aside / "out" / "old.txt").write_text("old")
    live = tmp_path / f".out.{host}-{os.getpid()}.89abcdef.partial"
    live.mkdir()
    elsewhere = tmp_path / f".out.other-machine-4026531836-{dead}.0123abcd.partial"
    elsewhere.mkdir()
    # Same host name, another PID namespace: a container sharing the volume; its process
    # cannot be seen from here, so it may be alive.
    container = tmp_path / f".out.{socket.gethostname()}-1-{dead}.0123abcd.partial"
    container.mkdir()
    with atomic_output_dir(out, overwrite=True) as tmp:
        assert [p.name for p in out.iterdir()] == ["old.txt"]  # put back before the job
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["out", live.name, elsewhere.name, container.name]
    )


def test_a_file_in_the_way_of_a_folder_output_is_refused(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("notes")
    with (
        pytest.raises(SiamdiffError, match="is a file; the output is a folder"),
        atomic_output_dir(tmp_path / "out", overwrite=True),
    ):
        pass
    assert (tmp_path / "out").read_text() == "notes"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_failed_write_names_the_output_not_its_temporary_file(tmp_path: Path) -> None:
    (tmp_path / "report.html").mkdir()
    with pytest.raises(OSError) as failure:
        atomic_write_text(tmp_path / "report.html", "<html>")
    assert failure.value.filename == str(tmp_path / "report.html")
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]

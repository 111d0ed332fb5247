"""atomic_output_dir: the output is the old one or the new one, whatever fails."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from siamdiff import atomic
from siamdiff.atomic import (
    atomic_output_dir,
    atomic_write_text,
    check_writable_file,
    exclusive_writer,
)
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


def dead_pid() -> int:
    finished = subprocess.Popen(["true"])
    finished.wait()
    return finished.pid


def here() -> str:
    """The host-boot-namespace part of this machine's temporary names."""
    return f"{socket.gethostname()}-{atomic._boot()}-{os.stat('/proc/self/ns/pid').st_ino}"


def test_a_killed_jobs_leftovers_are_cleared_by_the_next_job(tmp_path: Path) -> None:
    """A killed job leaves a hidden half-written output (removed by the next job on that
    output) or, killed between the two renames of a swap, the previous output aside (put back);
    a live process's or another machine's entries are left alone."""
    dead, host = dead_pid(), here()
    out = tmp_path / "out"
    abandoned = tmp_path / f".out.{host}-{dead}.0123abcd.partial"
    abandoned.mkdir()
    (abandoned / "half.bin").write_bytes(b"x" * 10)
    aside = tmp_path / f".out.{host}-{dead}.4567cdef.old"
    aside.mkdir()
    (aside / "old.txt").write_text("old")
    live = tmp_path / f".out.{host}-{os.getpid()}.89abcdef.partial"
    live.mkdir()
    elsewhere = tmp_path / f".out.other-machine-{atomic._boot()}-4026531836-{dead}.0123abcd.partial"
    elsewhere.mkdir()
    # Same host name and namespace number, another boot: a cluster node sharing the volume.
    other_boot = "0" * 7 + ("1" if atomic._boot() != "00000001" else "2")
    namespace = host.rsplit("-", 1)[1]
    node = tmp_path / f".out.{socket.gethostname()}-{other_boot}-{namespace}-{dead}.01234567.old"
    node.mkdir()
    # Same host name and boot, another PID namespace: a container sharing the volume; its
    # process cannot be seen from here, so it may be alive.
    container = tmp_path / f".out.{socket.gethostname()}-{atomic._boot()}-1-{dead}.0123abcd.partial"
    container.mkdir()
    with atomic_output_dir(out, overwrite=True) as tmp:
        assert [p.name for p in out.iterdir()] == ["old.txt"]  # put back before the job
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["out", live.name, elsewhere.name, node.name, container.name]
    )


def test_an_output_put_back_from_a_killed_swap_is_refused_before_the_work(tmp_path: Path):
    """Without --overwrite, a job must learn that the output exists before it runs for hours,
    not be told at the end that it "appeared"."""
    aside = tmp_path / f".out.{here()}-{dead_pid()}.4567cdef.old"
    aside.mkdir()
    (aside / "old.txt").write_text("old")
    with (
        pytest.raises(SiamdiffError, match="already exists"),
        atomic_output_dir(tmp_path / "out"),
    ):
        pytest.fail("the block ran")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["old.txt"]


def test_a_temporary_folder_removed_while_the_job_runs_is_not_swapped_in(tmp_path: Path):
    """A writer inside the block makes its parent folders: a removed temporary folder would
    come back holding only the files written after, and be taken for the whole output."""
    out = tmp_path / "out"
    with (
        pytest.raises(SiamdiffError, match=r"temporary folder .* was removed while it ran"),
        atomic_output_dir(out) as tmp,
    ):
        atomic_write_text(tmp / "0.txt", "0")
        shutil.rmtree(tmp)  # another job's mistaken clean-up
        atomic_write_text(tmp / "1.txt", "1")
    assert [p.name for p in tmp_path.iterdir()] == []


def test_a_mount_point_is_refused_before_the_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mount point cannot be renamed (EBUSY): refused up front, not after hours of work."""
    out = tmp_path / "volume"
    out.mkdir()
    monkeypatch.setattr(atomic.os.path, "ismount", lambda path: Path(path) == out)
    with (
        pytest.raises(SiamdiffError, match="is a mount point"),
        atomic_output_dir(out, overwrite=True),
    ):
        pytest.fail("the block ran")


def test_the_two_rename_swap_leaves_the_previous_output_beside_not_inside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Moving a folder into another parent needs write access to the folder itself (its ..
    entry changes); a sibling rename does not. The previous output is set aside as a sibling."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    monkeypatch.setattr(atomic, "_exchange", lambda first, second: False)
    renames: list[tuple[Path, Path]] = []
    real_rename = os.rename

    def recording_rename(source, target):
        renames.append((Path(source), Path(target)))
        real_rename(source, target)

    monkeypatch.setattr(atomic.os, "rename", recording_rename)
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert renames[0][0] == out and renames[0][1].parent == tmp_path
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_symlinked_file_is_written_where_it_points(tmp_path: Path) -> None:
    (tmp_path / "shared.json").write_text("{}")
    (tmp_path / "link.json").symlink_to(tmp_path / "shared.json")
    atomic_write_text(tmp_path / "link.json", "[1]")
    assert (tmp_path / "link.json").is_symlink()
    assert (tmp_path / "shared.json").read_text() == "[1]"


def test_a_file_in_the_way_of_a_folder_output_is_refused(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("notes")
    with (
        pytest.raises(SiamdiffError, match="is a file; the output is a folder"),
        atomic_output_dir(tmp_path / "out", overwrite=True),
    ):
        pass
    assert (tmp_path / "out").read_text() == "notes"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_failed_write_names_the_output_not_its_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(descriptor: int) -> None:
        raise OSError(28, "No space left on device")  # fsync's error names no file

    monkeypatch.setattr(atomic.os, "fsync", disk_full)
    with pytest.raises(OSError) as failure:
        atomic_write_text(tmp_path / "report.html", "<html>")
    assert failure.value.filename == str(tmp_path / "report.html")
    assert list(tmp_path.iterdir()) == []


def test_what_is_not_a_file_is_never_replaced_by_one(tmp_path: Path) -> None:
    """Renamed over, a device (`--png /dev/null` as root) or a folder was replaced."""
    (tmp_path / "report.html").mkdir()
    os.mkfifo(tmp_path / "pipe")
    for path in (tmp_path / "report.html", tmp_path / "pipe"):
        with pytest.raises(SiamdiffError, match=f"^{path}: exists and is not a file"):
            atomic_write_text(path, "<html>")
    assert (tmp_path / "report.html").is_dir() and (tmp_path / "pipe").is_fifo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe", "report.html"]


def test_the_writers_lock_refuses_a_second_job_and_leaves_nothing_behind(tmp_path: Path):
    """A failed command left `.OUT.lock-0` beside every output it was pointed at."""
    out, lock = tmp_path / "run", tmp_path / ".run.lock-0"
    with exclusive_writer(out, 0, "siamdiff train"):
        assert lock.is_file()
        refused = pytest.raises(SiamdiffError, match="another `siamdiff train` is writing here")
        with refused, exclusive_writer(out, 0, "siamdiff train"):
            pytest.fail("a second writer ran")
        assert lock.is_file()  # the refused one removed nothing
    assert not lock.exists()
    with pytest.raises(RuntimeError), exclusive_writer(out, 0, "siamdiff train"):
        raise RuntimeError("the job failed")
    assert list(tmp_path.iterdir()) == []


def test_checking_where_an_output_goes_creates_nothing(tmp_path: Path) -> None:
    """A job refused after the check (a missing input, say) must leave no folder behind."""
    out = tmp_path / "new" / "deeper" / "metrics.json"
    check_writable_file(out)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("in the way")
    with pytest.raises(SiamdiffError, match="file: is not a folder"):
        check_writable_file(tmp_path / "file" / "below" / "metrics.json")
    with pytest.raises(SiamdiffError, match="is a folder: name a file"):
        check_writable_file(tmp_path)


def test_a_failed_block_removes_the_folders_made_to_hold_its_output(tmp_path: Path) -> None:
    (tmp_path / "kept").mkdir()
    with pytest.raises(RuntimeError), atomic_output_dir(tmp_path / "kept" / "new" / "out"):
        raise RuntimeError("the job failed")
    assert [p.name for p in tmp_path.iterdir()] == ["kept"]
    assert list((tmp_path / "kept").iterdir()) == []

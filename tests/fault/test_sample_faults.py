"""Sampling under faults: SIGKILL mid-way, a full disk. Reruns must finish the same bytes."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import pytest

from siamdiff.atomic import exclusive_writer
from siamdiff.data.manifest import MANIFEST_NAME, load_manifest, verify
from siamdiff.errors import SiamdiffError
from siamdiff.export import export_run
from siamdiff.synthesize import _finished, source_digest, synthesize
from siamdiff.train import train
from tests.fault.helpers import fail_fsync, kill_when, run_ok
from tests.helpers import tiny_config

# 16 pairs in batches of 2: long enough for a kill to land between pairs.
OPTIONS = {"steps": 2, "per_mask": 4, "limit": 4, "batch_size": 2}


@pytest.fixture(scope="module")
def exported(phantom_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("fault-sample") / "run"
    train(tiny_config(phantom_data, run, "train.max_steps=2", "train.sample_every=100"))
    return export_run(run, run.parent / "export")


@pytest.fixture(scope="module")
def reference(exported: Path, phantom_data: Path) -> Path:
    out = exported.parent / "reference"
    synthesize(exported, phantom_data, out, progress=False, **OPTIONS)
    return out


def visible(root: Path) -> dict[str, bytes]:
    """Every file a user sees (the journal, settings and temporaries are bookkeeping)."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


def sample_command(model: Path, data: Path, out: Path) -> list[str]:
    """The `siamdiff sample` command line with the same settings as OPTIONS."""
    return [
        sys.executable,
        "-m",
        "siamdiff",
        "sample",
        str(model),
        "--masks",
        f"{data}:train",
        "--out",
        str(out),
        "--steps",
        str(OPTIONS["steps"]),
        "--per-mask",
        str(OPTIONS["per_mask"]),
        "--limit",
        str(OPTIONS["limit"]),
        "--batch-size",
        str(OPTIONS["batch_size"]),
    ]


def test_sigkill_mid_sampling_then_rerun_gives_the_same_files(
    exported: Path, phantom_data: Path, reference: Path, tmp_path: Path
):
    out = tmp_path / "syn"
    command = sample_command(exported, phantom_data, out)
    kill_when(command, lambda: len(list(out.glob("*-s??.png"))) >= 3)
    # Killed: no manifest yet, and every journalled pair is whole.
    assert not (out / MANIFEST_NAME).exists()
    sources = {r.id: r for r in load_manifest(phantom_data).records}
    written = {p.stem: sources[p.stem.rsplit("-s", 1)[0]] for p in out.glob("*-s??.png")}
    journalled = _finished(out, {i: source_digest(r, ()) for i, r in written.items()})
    assert 0 < len(journalled) < 16

    run_ok(command)
    assert visible(out) == visible(reference)
    assert verify(out).ok
    assert not list(out.glob(".*.tmp"))


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS], ids=["disk-full", "read-only"])
def test_sampling_write_failure_names_the_file_and_a_rerun_completes(
    exported: Path, phantom_data: Path, reference: Path, tmp_path: Path, monkeypatch, code
):
    out = tmp_path / "syn"
    fail_fsync(monkeypatch, str(out / "."), after=9, code=code)
    with pytest.raises(OSError) as caught:
        synthesize(exported, phantom_data, out, progress=False, **OPTIONS)
    # cli.main prints "FILENAME: STRERROR"; both must say what and where.
    assert Path(caught.value.filename).parent == out
    assert caught.value.strerror == os.strerror(code)
    assert not (out / MANIFEST_NAME).exists()
    kept = visible(out)
    assert kept and all(visible(reference)[name] == data for name, data in kept.items())

    monkeypatch.undo()
    synthesize(exported, phantom_data, out, progress=False, **OPTIONS)
    assert visible(out) == visible(reference) and verify(out).ok


def test_a_second_sampler_on_the_same_output_fails_fast(
    exported: Path, phantom_data: Path, tmp_path: Path
):
    out = tmp_path / "syn"
    with exclusive_writer(
        out, 0, "siamdiff sample"
    ):  # as a first `siamdiff sample` still running would
        with pytest.raises(SiamdiffError, match="another `siamdiff sample`"):
            synthesize(exported, phantom_data, out, progress=False, **OPTIONS)
        # --overwrite must not wipe the running job's output either.
        with pytest.raises(SiamdiffError, match="another `siamdiff sample`"):
            synthesize(exported, phantom_data, out, progress=False, overwrite=True, **OPTIONS)
    synthesize(exported, phantom_data, out, progress=False, **OPTIONS)  # released: runs
    assert verify(out).ok

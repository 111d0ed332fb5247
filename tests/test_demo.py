"""The README's first command: the whole pipeline on phantom data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from siamdiff.cli import main
from siamdiff.data.manifest import load_manifest, verify
from siamdiff.train import checkpoints


@pytest.mark.slow
def test_demo_runs_every_stage(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--train-steps", "3"]) == 0
    printed = capsys.readouterr().out
    assert "8/8 evaluate" in printed and "report:" in printed
    assert verify(out / "data").ok and verify(out / "synthetic").ok
    assert [c.name for c in checkpoints(out / "run")][-1] == "step-00000003"  # --train-steps
    synthetic = load_manifest(out / "synthetic")
    assert synthetic.kind == "synthetic"
    assert len(synthetic.records) == len(load_manifest(out / "data").split("train"))
    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())
    assert "mask_fidelity" in json.dumps(metrics)
    for picture in (
        "run/loss_curve.png",
        "synthetic/samples.png",
        "evaluation/metrics.html",
        "data/stats.png",
    ):
        assert (out / picture).stat().st_size > 1000, picture
    report = (out / "evaluation" / "metrics.html").read_text()
    assert "Synthetic samples" in report and "Training losses" in report
    # A second run refuses to overwrite unless asked.
    assert main(["demo", "--out", str(out), "--train-steps", "3"]) == 2


def test_demo_overwrite_replaces_only_a_demo_folder(tmp_path: Path, capsys, monkeypatch) -> None:
    """`--out . --overwrite` used to delete whatever the folder held, before any stage ran."""
    import siamdiff.demo as demo

    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "chapter1.tex").write_text("a year of work")
    assert main(["demo", "--out", str(thesis), "--overwrite"]) == 2
    assert "holds files the demo did not write" in capsys.readouterr().err
    assert (thesis / "chapter1.tex").read_text() == "a year of work"
    with pytest.raises(SystemExit):
        main(["demo", "--out", str(tmp_path / "d"), "--train-steps", "0"])
    assert "must be an integer >= 1, got '0'" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()

    def stop_after_the_marker(*args, **kwargs):
        raise demo.SiamdiffError("stopped")

    monkeypatch.setattr(demo, "make_phantom_dataset", stop_after_the_marker)
    assert main(["demo", "--out", str(tmp_path / "d")]) == 2
    (tmp_path / "d" / "partial.png").write_text("an earlier demo's file")
    assert main(["demo", "--out", str(tmp_path / "d"), "--overwrite"]) == 2  # ran, replaced it
    assert not (tmp_path / "d" / "partial.png").exists()


def test_an_interrupted_overwrite_can_be_overwritten_again(tmp_path: Path, monkeypatch) -> None:
    """Deleting in place, stopped once the marker was gone, left a folder --overwrite refused."""
    import siamdiff.demo as demo

    def stop_after_the_marker(*args, **kwargs):
        raise demo.SiamdiffError("stopped")

    monkeypatch.setattr(demo, "make_phantom_dataset", stop_after_the_marker)
    out = tmp_path / "d"
    threads = torch.get_num_threads()
    with pytest.raises(demo.SiamdiffError, match="stopped"):
        demo.run_demo(out)
    assert torch.get_num_threads() == threads  # the caller's setting comes back
    (out / "a.png").write_text("an earlier demo's file")
    real_rmtree = shutil.rmtree

    def ctrl_c_after_the_marker(path, *args, **kwargs):
        (Path(path) / demo.MARKER).unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", ctrl_c_after_the_marker)
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(out, overwrite=True)
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    with pytest.raises(demo.SiamdiffError, match="stopped"):
        demo.run_demo(out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # the aside copy cleared
    assert not (out / "a.png").exists()
    (tmp_path / "link").symlink_to(out)
    with pytest.raises(demo.SiamdiffError, match="link: is a symbolic link"):
        demo.run_demo(tmp_path / "link", overwrite=True)
    monkeypatch.chdir(out)  # `--out .`: a ValueError traceback, or the cwd deleted under it
    with pytest.raises(demo.SiamdiffError, match="holds the current directory"):
        demo.run_demo(Path("."), overwrite=True)
    assert (out / demo.MARKER).is_file()

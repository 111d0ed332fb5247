"""`siamdiff train-segmenter` and `siamdiff evaluate` as a user runs them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from siamdiff.cli import main
from siamdiff.data.manifest import verify
from tests.evaluate.conftest import SIZE


def test_train_segmenter_then_evaluate(
    real_root: Path, synthetic_root: Path, tmp_path: Path, capsys
) -> None:
    seg = tmp_path / "seg"
    assert (
        main(
            [
                "train-segmenter",
                str(real_root),
                "--out",
                str(seg),
                "--size",
                str(SIZE),
                "--epochs",
                "1",
                "--batch-size",
                "4",
            ]
        )
        == 0
    )
    assert (seg / "model.safetensors").is_file()
    val = json.loads((seg / "segmenter.json").read_text())["val"]
    captured = capsys.readouterr()
    assert f"validation mDice {val['mdice']:.3f}" in captured.out
    # In a log, progress is a line every 30 s: the loss shown each step forced one per step.
    steps = json.loads((seg / "segmenter.json").read_text())["steps"]
    bar_lines = [line for line in captured.err.splitlines() if "loss=" in line]
    assert steps >= 4 and len(bar_lines) <= 2, captured.err
    out = tmp_path / "eval" / "metrics.json"
    assert (
        main(
            [
                "evaluate",
                str(real_root),
                str(synthetic_root),
                "--out",
                str(out),
                "--segmenter",
                str(seg),
            ]
        )
        == 0
    )
    metrics = json.loads(out.read_text())
    assert metrics["format"] and "mask fidelity" in capsys.readouterr().out.lower()
    assert (out.parent / f"{out.stem}.html").is_file()
    # Run again: the earlier evaluation is kept unless --overwrite says otherwise.
    again = ["evaluate", str(real_root), str(synthetic_root), "--out", str(out)]
    again += ["--segmenter", str(seg)]
    out.write_text("earlier")
    assert main(again) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"siamdiff: error: {out}: exists: pass --overwrite to replace this evaluation"]
    assert out.read_text() == "earlier"
    assert main([*again, "--overwrite"]) == 0
    assert json.loads(out.read_text()) == metrics
    # Another evaluation whose report would land on this one's: refused, not overwritten.
    report = out.parent / f"{out.stem}.html"
    html = report.read_bytes()
    capsys.readouterr()
    other = ["evaluate", str(real_root), str(synthetic_root), "--out", str(tmp_path / out.name)]
    assert main([*other, "--segmenter", str(seg), "--report", str(out.parent)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"siamdiff: error: {report}: exists: name --out or --report otherwise, or pass "
        "--overwrite to replace it"
    ]
    assert report.read_bytes() == html and not (tmp_path / out.name).exists()


def test_evaluate_with_swapped_sets_is_a_one_line_error(
    real_root: Path, synthetic_root: Path, segmenter_dir: Path, tmp_path: Path, capsys
) -> None:
    assert (
        main(
            [
                "evaluate",
                str(synthetic_root),
                str(real_root),
                "--out",
                str(tmp_path / "m.json"),
                "--segmenter",
                str(segmenter_dir),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("siamdiff: error:")


def test_a_run_directory_without_a_run_in_it_is_refused_before_evaluating(
    real_root: Path, synthetic_root: Path, segmenter_dir: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "m.json"
    argv = ["evaluate", str(real_root), str(synthetic_root), "--out", str(out)]
    argv += ["--segmenter", str(segmenter_dir), "--run", str(tmp_path / "no-such-run")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"siamdiff: error: {tmp_path / 'no-such-run'}: not a training run (no "
        "loss_curve.png, no samples/)"
    ]
    assert not out.exists()


def test_damaged_datasets_are_refused_before_training_or_scoring(
    real_root: Path, synthetic_root: Path, segmenter_dir: Path, tmp_path: Path, capsys
) -> None:
    damaged = tmp_path / "real"
    shutil.copytree(real_root, damaged)
    mask = next(damaged.glob("*_mask.png"))
    mask.write_bytes(mask.read_bytes()[:100])
    metrics = tmp_path / "metrics.json"
    commands = [
        ["train-segmenter", str(damaged), "--out", str(tmp_path / "seg")],
        ["evaluate", str(damaged), str(synthetic_root), "--segmenter", str(segmenter_dir)],
    ]
    commands[1] += ["--out", str(metrics)]
    for argv in commands:
        assert main(argv) == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith(f"siamdiff: error: {damaged}: dataset does not verify (1 changed")
        assert error.endswith("or pass --no-verify")
    assert not (tmp_path / "seg").exists() and not metrics.exists()


def test_a_report_folder_that_is_a_file_is_refused_before_evaluating(
    real_root: Path, synthetic_root: Path, segmenter_dir: Path, tmp_path: Path, capsys
) -> None:
    """It failed with "File exists" after every metric was computed."""
    out, afile = tmp_path / "m.json", tmp_path / "afile"
    afile.write_text("")
    argv = ["evaluate", str(real_root), str(synthetic_root), "--out", str(out)]
    assert main([*argv, "--segmenter", str(segmenter_dir), "--report", str(afile)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"siamdiff: error: {afile}: is a file: --report names a folder"]
    assert not out.exists()
    # Metrics named .html: the report would overwrite them.
    argv[-1] = str(tmp_path / "m.html")
    assert main([*argv, "--segmenter", str(segmenter_dir)]) == 2
    assert "name the metrics file otherwise" in capsys.readouterr().err
    assert not (tmp_path / "m.html").exists()


def test_an_output_among_the_inputs_is_refused_before_evaluating(
    real_root: Path, synthetic_root: Path, segmenter_dir: Path, capsys
) -> None:
    """--out SYN/manifest-v1.json wrote the metrics over the synthetic set's manifest."""
    argv = ["evaluate", str(real_root), str(synthetic_root), "--segmenter", str(segmenter_dir)]
    for out, what in (
        (synthetic_root / "manifest-v1.json", "the synthetic set"),
        (segmenter_dir / "segmenter.json", "the segmenter"),
        (real_root / "eval" / "m.json", "the real dataset"),
    ):
        assert main([*argv, "--out", str(out)]) == 2
        assert f"is, holds or lies inside {what}" in capsys.readouterr().err
    assert not (real_root / "eval").exists() and verify(synthetic_root).ok
    assert verify(real_root).ok


def test_a_synthetic_set_with_damaged_sampling_settings_is_a_one_line_error(
    real_root: Path, synthetic_root: Path, tmp_path: Path, capsys
) -> None:
    """``preprocessing.synthesis: []`` failed both commands with an AttributeError traceback."""
    damaged = tmp_path / "syn"
    shutil.copytree(synthetic_root, damaged)
    manifest = damaged / "manifest-v1.json"
    obj = json.loads(manifest.read_text())
    obj["preprocessing"]["synthesis"] = []
    manifest.write_text(json.dumps(obj))
    metrics = tmp_path / "m.json"
    commands = [
        ["evaluate", str(real_root), str(damaged), "--segmenter", str(tmp_path / "seg")],
        ["train-segmenter", str(real_root), "--extra", str(damaged), "--out", str(tmp_path / "s")],
    ]
    commands[0] += ["--out", str(metrics)]
    for argv in commands:
        assert main([*argv, "--no-verify"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"siamdiff: error: {manifest}: preprocessing.synthesis is [], not an object"]
    assert not metrics.exists() and not (tmp_path / "s").exists()

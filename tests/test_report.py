"""Loss curves and sample grids: what each panel plots and what each grid pixel shows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

import siamdiff.report as report
from siamdiff.report import save_loss_curve, save_sample_grid, to_uint8_rgb, training_seconds


def test_each_loss_panel_plots_its_own_term(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Terms with different values per step: a panel drawing another column (the total loss,
    say) would show a curve the title does not name."""
    log = tmp_path / "losses.jsonl"
    rows = [
        {"step": step, "loss": 10.0 + step, "mask": 1.0 + step, "image": 2.0 * step + 3.0}
        for step in (1, 2, 3)
    ]
    log.write_text("".join(json.dumps(row) + "\n" for row in rows))
    drawn: list[Figure] = []

    def keep_figure(figure: Figure) -> bytes:  # the PNG hides the data; the figure keeps it
        drawn.append(figure)
        return b"png"

    monkeypatch.setattr(report, "figure_png", keep_figure)
    save_loss_curve(log, tmp_path / "curve.png", ("loss", "mask", "image", "augment"))
    (figure,) = drawn
    assert (tmp_path / "curve.png").read_bytes() == b"png"
    # One panel per logged term, in the order asked for; "augment" was never logged.
    assert [ax.get_title() for ax in figure.axes] == ["loss", "mask", "image"]
    for ax in figure.axes:
        (line,) = ax.get_lines()
        term = ax.get_title()
        assert list(line.get_xdata()) == [1, 2, 3]
        assert list(line.get_ydata()) == [row[term] for row in rows]
        assert ax.get_yscale() == "log"  # all positive


def test_sample_grid_draws_masks_black_and_white(tmp_path: Path) -> None:
    """A {0, 1} mask column: lesion 255, background 0, whatever the image columns hold."""
    masks = torch.zeros(1, 1, 8, 8)
    masks[0, 0, 2:6, 2:6] = 1.0
    reals = torch.zeros(1, 3, 8, 8)  # mid grey in [-1, 1]
    synthetic = torch.full((1, 3, 8, 8), -1.0)  # black
    save_sample_grid(tmp_path / "grid.png", masks, reals, synthetic)
    grid = np.asarray(Image.open(tmp_path / "grid.png").convert("RGB"))
    assert grid.shape == (8 + 2 * 2, 3 * 8 + 4 * 2, 3)  # 2 px padding around each tile

    def tile(column: int) -> np.ndarray:
        left = 2 + column * (8 + 2)
        return grid[2:10, left : left + 8]

    expected_mask = np.zeros((8, 8, 3), np.uint8)
    expected_mask[2:6, 2:6] = 255
    np.testing.assert_array_equal(tile(0), expected_mask)
    np.testing.assert_array_equal(tile(1), np.full((8, 8, 3), 128, np.uint8))  # 127.5 rounded
    np.testing.assert_array_equal(tile(2), np.zeros((8, 8, 3), np.uint8))


def test_to_uint8_rgb_maps_masks_from_0_1_and_images_from_minus_1_1() -> None:
    mask = torch.tensor([0.0, 1.0]).view(1, 1, 1, 2)  # one channel: a {0, 1} mask
    assert to_uint8_rgb(mask)[0, :, 0].tolist() == [[0, 255]] * 3
    image = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 1, 4).expand(1, 3, 1, 4)
    out = to_uint8_rgb(image)  # three channels in [-1, 1]; out-of-range values clip
    assert out.dtype == torch.uint8 and out[0, :, 0].tolist() == [[0, 128, 255, 255]] * 3


def test_training_seconds_adds_each_rows_steps_at_its_rate() -> None:
    rows = [
        {"step": 10, "it_per_s": 2.0},  # 10 steps at 2/s
        {"step": 20, "it_per_s": 5.0},  # 10 at 5/s
        {"step": 20, "loss": 1.0},  # a run resumed at its last step: no steps, no rate
        {"step": 30, "it_per_s": 1.0},  # 10 at 1/s
    ]
    assert training_seconds(rows) == pytest.approx(5 + 2 + 10)
    assert training_seconds([]) == 0

"""Pictures people look at: loss curves and mask | real | synthetic sample grids."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torchvision.utils import make_grid

from siamdiff.atomic import atomic_save_png, atomic_write_bytes, atomic_write_text


def read_loss_log(path: str | Path) -> list[dict]:
    """The JSON-lines loss log written by training; a torn last line (killed run) is ignored."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def training_seconds(rows: list[dict]) -> float:
    """About the time a loss log's steps took, from each row's rate over the steps since the
    row before: a resumed run's parts add up, the pauses between them do not count."""
    seconds, before = 0.0, 0
    for row in rows:
        if row.get("it_per_s"):  # absent on the row of a run resumed at its last step
            seconds += (row["step"] - before) / row["it_per_s"]
        before = row["step"]
    return seconds


def truncate_loss_log(path: Path, step: int) -> None:
    """Drop the rows after ``step``: a killed run logs steps that its last checkpoint lacks,
    and the resumed run logs them again."""
    if path.is_file():
        rows = [row for row in read_loss_log(path) if row["step"] <= step]
        atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def figure_png(figure: Figure) -> bytes:
    """PNG bytes of a bare matplotlib Figure: no pyplot, so a notebook's backend is left alone."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def save_loss_curve(
    log_path: str | Path,
    png: str | Path,
    terms: tuple[str, ...] = ("loss", "mask", "image", "consistency", "augment"),
) -> None:
    """One panel per loss term against the optimiser step (log scale where positive)."""
    rows = read_loss_log(log_path) if Path(log_path).exists() else []
    keys = [k for k in terms if rows and k in rows[0]]
    figure = Figure(figsize=(3.2 * max(1, len(keys)), 3))
    axes = np.atleast_1d(figure.subplots(1, max(1, len(keys))))
    steps = [r["step"] for r in rows]
    for ax, key in zip(axes, keys, strict=False):
        values = [r[key] for r in rows]
        ax.plot(steps, values, lw=1.2, marker="o" if len(rows) < 2 else None)  # one row: a dot
        ax.set_title(key)
        ax.set_xlabel("step")
        if all(v > 0 for v in values):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    figure.tight_layout()
    atomic_write_bytes(png, figure_png(figure))


def to_uint8_rgb(images: torch.Tensor) -> torch.Tensor:
    """Bx{1,3}xHxW in [-1, 1] (images) or {0, 1} (masks, 1 channel) -> Bx3xHxW uint8."""
    images = images.detach().float().cpu()
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1) * 2 - 1
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def save_sample_grid(
    path: str | Path, masks: torch.Tensor, reals: torch.Tensor, *synthetic: torch.Tensor
) -> None:
    """Rows: one per mask. Columns: mask | real | each synthetic set given."""
    save_columns(path, masks, reals, *synthetic, size_of=1)


def save_columns(path: str | Path, *images: torch.Tensor, size_of: int = 0) -> None:
    """A grid PNG, one column per batch given (all drawn at the size of column ``size_of``)."""
    columns = [to_uint8_rgb(t) for t in images]
    size = columns[size_of].shape[-2:]
    columns = [
        torch.nn.functional.interpolate(c.float(), size=size).to(torch.uint8)
        if c.shape[-2:] != size
        else c
        for c in columns
    ]
    tiles = torch.stack(columns, dim=1).flatten(0, 1)
    grid = make_grid(tiles, nrow=len(columns), padding=2, pad_value=255)
    atomic_save_png(path, grid.permute(1, 2, 0).contiguous().numpy())

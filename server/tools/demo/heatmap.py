"""The expert-usage heatmap of the demo evaluation, drawn on the shared PNG raster."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from server.tools.png import Canvas, text_width


def colour(value: float) -> tuple[int, int, int]:
    """0 -> white, 1 -> dark blue."""
    v = min(max(value, 0.0), 1.0)
    return (int(255 - 235 * v), int(255 - 200 * v), int(255 - 105 * v))


def heatmap(
    path: Path,
    values: Sequence[Sequence[float]],
    groups: int,
    cell: tuple[int, int] = (6, 20),
    labels: Sequence[str] | None = None,
) -> None:
    """values[row][column] in [0, 1]; columns split into `groups` equal blocks (the layers) with a
    grey 2-pixel gap between blocks and a white 1-pixel gap between rows; `labels` name the rows."""
    width_cells = len(values[0])
    if width_cells % groups:
        raise ValueError(f"heatmap: {width_cells} columns do not split into {groups} groups")
    per_group = width_cells // groups
    cw, ch = cell
    margin = max((text_width(t) for t in labels), default=0) + 6 if labels else 0
    width = margin + width_cells * cw + 2 * (groups - 1)
    canvas = Canvas(width, len(values) * (ch + 1))
    for number, row in enumerate(values):
        top = number * (ch + 1)
        if labels:
            canvas.text(2, top + (ch - 10) // 2, labels[number])
        x = margin
        for column, value in enumerate(row):
            if column and column % per_group == 0:
                canvas.box(x, top, x + 1, top + ch - 1, (128, 128, 128))
                x += 2
            canvas.box(x, top, x + cw - 1, top + ch - 1, colour(value))
            x += cw
    canvas.save(path)

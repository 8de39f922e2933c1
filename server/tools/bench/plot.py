"""Line charts of a metric against device-tier size, one line per routing.

matplotlib when it is installed; otherwise the hand-rolled raster of png.py (axes, ticks with
values, a legend), so that the benchmark never needs an extra dependency to draw.
"""

from __future__ import annotations

import math
from pathlib import Path

from server.tools.png import Canvas, text_width

Series = list[tuple[str, list[tuple[float, float]]]]  # (label, [(x, y), ...])
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def line_chart(series: Series, title: str, x_label: str, y_label: str, path: Path,
               y_max: float | None = None) -> str:
    """Write the chart to ``path`` (y from 0 to ``y_max``, None = fit the data); returns the
    backend used ("matplotlib" or "builtin")."""
    series = [(label, sorted(p for p in points if math.isfinite(p[1]))) for label, points in series]
    series = [(label, points) for label, points in series if points]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _raster_chart(series, title, x_label, y_label, path, y_max)
        return "builtin"
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for label, points in series:
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=label)
    ax.set(title=title, xlabel=x_label, ylabel=y_label)
    ax.set_ylim(bottom=0, top=y_max)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return "matplotlib"


def _fmt(v: float) -> str:
    if v >= 100:
        return f"{v:.0f}"
    return f"{v:.2f}".rstrip("0").rstrip(".") if v else "0"


def _nice(v: float) -> float:
    """The smallest 1, 2, 4, 5 or 8 x 10^k at or above ``v`` (quarter ticks stay round)."""
    if not v > 0:
        return 1.0
    base = 10.0 ** math.floor(math.log10(v))
    return next(float(m * base) for m in (1, 2, 4, 5, 8, 10) if m * base >= v * (1 - 1e-9))


def _raster_chart(series: Series, title: str, x_label: str, y_label: str, path: Path,
                  y_top: float | None) -> None:
    W, H = 640, 400
    left, right, top, bottom = 70, 160, 40, 50  # plot area margins (legend on the right)
    c = Canvas(W, H)
    c.text(left, 12, title, scale=2)
    xs = sorted({x for _, pts in series for x, _ in pts}) or [0.0, 1.0]
    y_max = y_top or _nice(max((y for _, pts in series for _, y in pts), default=1.0) * 1.05)
    x_lo, x_hi = xs[0], xs[-1] if xs[-1] > xs[0] else xs[0] + 1.0
    pw, ph = W - left - right, H - top - bottom

    def px(x: float) -> int:
        return left + round((x - x_lo) / (x_hi - x_lo) * pw)

    def py(y: float) -> int:
        return top + ph - round(y / y_max * ph)

    grey, black = (220, 220, 220), (0, 0, 0)
    for i in range(5):  # horizontal grid + y ticks
        y = y_max * i / 4
        c.line(left, py(y), left + pw, py(y), grey)
        label = _fmt(y)
        c.text(left - 6 - text_width(label), py(y) - 5, label)
    for x in xs:
        label = f"{x * 100:.0f}%"
        c.line(px(x), top + ph, px(x), top + ph + 4, black)
        c.text(px(x) - text_width(label) // 2, top + ph + 8, label)
    c.line(left, top, left, top + ph, black)
    c.line(left, top + ph, left + pw, top + ph, black)
    c.text(left + pw // 2 - text_width(x_label) // 2, H - 18, x_label)
    c.text(4, top - 16, y_label)
    for i, (label, points) in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
            c.line(px(x0), py(y0), px(x1), py(y1), color, width=2)
        for x, y in points:
            c.box(px(x) - 3, py(y) - 3, px(x) + 3, py(y) + 3, color)
        ly = top + 10 + i * 18
        c.box(W - right + 14, ly, W - right + 26, ly + 10, color)
        c.text(W - right + 32, ly, label)
    c.save(path)

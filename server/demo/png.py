"""A minimal PNG writer (8-bit RGB, zlib) for the expert-usage heatmap: no plotting dependency."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from pathlib import Path


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def write_png(path: Path, pixels: Sequence[Sequence[tuple[int, int, int]]]) -> None:
    """pixels[row][column] = (r, g, b), each 0..255; every row the same width."""
    height = len(pixels)
    width = len(pixels[0]) if height else 0
    if not height or not width or any(len(row) != width for row in pixels):
        raise ValueError("write_png needs a non-empty rectangle of pixels")
    raw = bytearray()
    for row in pixels:
        raw.append(0)  # filter type 0 (none) for every scanline
        for r, g, b in row:
            raw += bytes((r, g, b))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit truecolour
    png = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(bytes(raw), 9))
    path.write_bytes(png + _chunk(b"IEND", b""))


def colour(value: float) -> tuple[int, int, int]:
    """0 -> white, 1 -> dark blue."""
    v = min(max(value, 0.0), 1.0)
    return (int(255 - 235 * v), int(255 - 200 * v), int(255 - 105 * v))


# 3x5 glyphs (rows top to bottom, 3 bits each) for the letters of the domain names.
_GLYPHS = {
    "a": (2, 5, 7, 5, 5), "c": (3, 4, 4, 4, 3), "d": (6, 5, 5, 5, 6), "e": (7, 4, 6, 4, 7),
    "g": (3, 4, 5, 5, 3), "h": (5, 5, 7, 5, 5), "i": (7, 2, 2, 2, 7), "l": (4, 4, 4, 4, 7),
    "m": (5, 7, 7, 5, 5), "n": (6, 5, 5, 5, 5), "o": (2, 5, 5, 5, 2), "p": (6, 5, 6, 4, 4),
    "r": (6, 5, 6, 5, 5), "s": (3, 4, 2, 1, 6), "t": (7, 2, 2, 2, 2), "y": (5, 5, 2, 2, 2),
}  # fmt: skip


def label(text: str, width: int, height: int, scale: int = 2) -> list[list[tuple[int, int, int]]]:
    """`text` in black 3x5 glyphs (unknown characters blank), left-aligned, centred vertically."""
    pixels = [[(255, 255, 255)] * width for _ in range(height)]
    top = (height - 5 * scale) // 2
    for index, char in enumerate(text.lower()):
        for row, bits in enumerate(_GLYPHS.get(char, (0, 0, 0, 0, 0))):
            for bit in range(3):
                if not bits >> (2 - bit) & 1:
                    continue
                for dy in range(scale):
                    for dx in range(scale):
                        x, y = 2 + index * 4 * scale + bit * scale + dx, top + row * scale + dy
                        if x < width and 0 <= y < height:
                            pixels[y][x] = (0, 0, 0)
    return pixels


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
    margin = 8 * max((len(t) for t in labels), default=0) + 4 if labels else 0
    pixels: list[list[tuple[int, int, int]]] = []
    for number, row in enumerate(values):
        line: list[tuple[int, int, int]] = []
        for column, value in enumerate(row):
            if column and column % per_group == 0:
                line += [(128, 128, 128)] * 2
            line += [colour(value)] * cw
        text = label(labels[number], margin, ch) if labels else [[] for _ in range(ch)]
        pixels += [text[y] + line for y in range(ch)]
        pixels.append([(255, 255, 255)] * (margin + len(line)))
    write_png(path, pixels)

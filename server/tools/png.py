"""A tiny RGB raster with lines, boxes and a 3x5 pixel font, written as PNG (zlib + struct).

Used for the benchmark plots (when matplotlib is not installed) and the demo's pool heatmap.
PNG layout: the 8-byte signature, then chunks ``length | type | data | crc32(type + data)``:
IHDR (8-bit RGB), one IDAT (the zlib-compressed scanlines, each prefixed by filter byte 0), IEND.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

Color = tuple[int, int, int]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# 3x5 glyphs: 15 bits, rows top to bottom, 3 bits per row (left bit first)
_GLYPHS = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001001001",
    "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", "%": "101001010100101",
    "-": "000000111000000", "/": "001001010100100", ":": "000010000010000", "(": "010100100100010",
    ")": "010001001001010", "=": "000111000111000", ">": "100010001010100", "_": "000000000000111",
    "@": "111101111100111", "+": "000010111010000", ",": "000000000010100",
    "A": "010101111101101", "B": "110101110101110", "C": "011100100100011", "D": "110101101101110",
    "E": "111100110100111", "F": "111100110100100", "G": "011100101101011", "H": "101101111101101",
    "I": "111010010010111", "J": "001001001101010", "K": "101101110101101", "L": "100100100100111",
    "M": "101111111101101", "N": "110101101101101", "O": "010101101101010", "P": "110101110100100",
    "Q": "010101101110011", "R": "110101110101101", "S": "011100010001110", "T": "111010010010010",
    "U": "101101101101111", "V": "101101101101010", "W": "101101111111101", "X": "101101010101101",
    "Y": "101101010010010", "Z": "111001010100111",
}


def encode_png(width: int, height: int, rgb: bytes) -> bytes:
    """PNG bytes of an 8-bit RGB image given as ``height`` rows of ``width * 3`` bytes."""
    if width < 1 or height < 1 or len(rgb) != width * height * 3:
        raise ValueError(f"encode_png: {len(rgb)} bytes is not a {width}x{height} RGB image")

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    stride = width * 3
    raw = b"".join(b"\x00" + rgb[y * stride : (y + 1) * stride] for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit, RGB, no interlace
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    return PNG_SIGNATURE + body


class Canvas:
    def __init__(self, width: int, height: int, background: Color = (255, 255, 255)) -> None:
        self.width, self.height = width, height
        self.pixels = bytearray(bytes(background) * (width * height))

    def dot(self, x: int, y: int, color: Color) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            i = (y * self.width + x) * 3
            self.pixels[i : i + 3] = bytes(color)

    def box(self, x0: int, y0: int, x1: int, y1: int, color: Color) -> None:
        """Filled rectangle, corners inclusive."""
        for y in range(max(0, min(y0, y1)), min(self.height, max(y0, y1) + 1)):
            for x in range(max(0, min(x0, x1)), min(self.width, max(x0, x1) + 1)):
                self.dot(x, y, color)

    def line(self, x0: int, y0: int, x1: int, y1: int, color: Color, width: int = 1) -> None:
        """Bresenham, thickened by drawing a ``width``-pixel square at every step."""
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        while True:
            self.box(x0, y0, x0 + width - 1, y0 + width - 1, color)
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err, x0 = err + dy, x0 + sx
            if e2 <= dx:
                err, y0 = err + dx, y0 + sy

    def text(self, x: int, y: int, s: str, color: Color = (0, 0, 0), scale: int = 2) -> int:
        """Draw ``s`` (unknown characters as blanks) with its top-left at (x, y); returns its width."""
        for i, ch in enumerate(s.upper()):
            bits = _GLYPHS.get(ch, "0" * 15)
            for row in range(5):
                for col in range(3):
                    if bits[row * 3 + col] == "1":
                        gx, gy = x + (i * 4 + col) * scale, y + row * scale
                        self.box(gx, gy, gx + scale - 1, gy + scale - 1, color)
        return text_width(s, scale)

    def save(self, path: Path) -> None:
        Path(path).write_bytes(encode_png(self.width, self.height, bytes(self.pixels)))


def text_width(s: str, scale: int = 2) -> int:
    return max(0, len(s) * 4 - 1) * scale

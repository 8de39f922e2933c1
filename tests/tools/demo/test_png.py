"""The demo heatmap: a valid PNG whose cells carry the colours of their values."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest

from server.tools.demo.heatmap import colour, heatmap
from server.tools.png import text_width


def decode(path: Path) -> tuple[int, int, bytes]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, size = 8, b"", (0, 0)
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
            assert body[8:10] == bytes((8, 2))
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    return size[0], size[1], zlib.decompress(idat)


def test_heatmap_layout(tmp_path: Path) -> None:
    heatmap(tmp_path / "h.png", [[0.0, 1.0, 0.5, 0.0]], groups=2, cell=(3, 4), labels=["c"])
    width, height, raw = decode(tmp_path / "h.png")
    margin = text_width("c") + 6
    assert (width, height) == (margin + 4 * 3 + 2, 5)
    row = raw[1 : 1 + 3 * width]  # first scanline after its filter byte
    assert tuple(row[3 * (margin + 3) : 3 * (margin + 4)]) == colour(1.0)
    assert tuple(row[3 * (margin + 6) : 3 * (margin + 7)]) == (128, 128, 128)  # the layer gap
    assert tuple(row[3 * (margin + 8) : 3 * (margin + 9)]) == colour(0.5)
    with pytest.raises(ValueError, match="do not split"):
        heatmap(tmp_path / "x.png", [[0.0, 1.0, 0.5]], groups=2)

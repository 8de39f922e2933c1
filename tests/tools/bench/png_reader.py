"""A strict PNG reader for the tests: checks the signature, every chunk's CRC, IHDR and that
the IDAT data inflates to exactly the scanlines the header promises."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

from server.tools.png import PNG_SIGNATURE

CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # color type -> samples per pixel (8-bit depth only)


def read_png(path: Path) -> tuple[int, int, int, bytes]:
    """(width, height, color type, inflated scanlines) of an 8-bit, non-interlaced PNG."""
    data = Path(path).read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path}: not a PNG signature"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"{path}: bad CRC in {kind!r}"
        chunks.append((kind, body))
        pos += 12 + length
    assert pos == len(data), f"{path}: trailing bytes"
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND", f"{path}: chunk order"
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert depth == 8 and interlace == 0 and color in CHANNELS, f"{path}: unexpected IHDR"
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    assert len(raw) == height * (1 + width * CHANNELS[color]), f"{path}: IDAT size"
    return width, height, color, raw

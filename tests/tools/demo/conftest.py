"""The fixture corpus tree (tests/tools/demo/fixture_root) made real: gzip where Debian gzips,
a dictd index."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest

FIXTURE = Path(__file__).parent / "fixture_root"
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def dictd_encode(value: int) -> str:
    digits = ""
    while True:
        digits = _B64[value % 64] + digits
        value //= 64
        if value == 0:
            return digits


def _gzip(path: Path, target: Path) -> None:
    with gzip.open(target, "wb") as handle:
        handle.write(path.read_bytes())
    path.unlink()


@pytest.fixture(scope="session")
def fixture_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fsroot") / "root"
    shutil.copytree(FIXTURE, root)
    share = root / "usr/share"
    _gzip(share / "doc/pkga/changelog.Debian", share / "doc/pkga/changelog.Debian.gz")
    _gzip(share / "man/man1/ringcat.1", share / "man/man1/ringcat.1.gz")
    # foldoc: headword entries are separated by a blank line followed by an unindented line
    data = (share / "dictd/foldoc.dict").read_bytes()
    entries = data.decode().split("\n\n")
    index, offset, i = [], 0, 0
    while i < len(entries):
        text = entries[i] + "\n\n" + entries[i + 1] + "\n\n"
        length = len(text.encode())
        index.append(f"{entries[i]}\t{dictd_encode(offset)}\t{dictd_encode(length)}")
        offset += length
        i += 2
    (share / "dictd/foldoc.index").write_text("\n".join(sorted(index)) + "\n")
    _gzip(share / "dictd/foldoc.dict", share / "dictd/foldoc.dict.dz")
    return root

"""The unit of the demo corpus (one document of one domain) and where its sources live."""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

# Order matters only for display (tables, heatmap rows).
DOMAINS: tuple[str, ...] = ("python", "c", "licence", "manpage", "dictionary", "prose", "changelog")

HELDOUT_PERCENT = 8


@dataclass(frozen=True)
class Document:
    """One document: its text keeps its own boundaries; never merged with or split from others."""

    domain: str
    name: str  # unique within the domain, stable across builds (the held-out split hashes it)
    package: str
    file: str
    licence: str
    text: str

    def __post_init__(self) -> None:
        if self.domain not in DOMAINS:
            raise ValueError(f"Document.domain {self.domain!r} is not one of {DOMAINS}")
        if not self.name:
            raise ValueError("Document.name must not be empty")

    @property
    def doc_id(self) -> str:
        return f"{self.domain}/{self.name}"

    @property
    def split(self) -> str:
        """Fixed per-document split: a hash of the id, so it never depends on what else was built."""
        digest = hashlib.sha1(self.doc_id.encode()).digest()
        return "heldout" if int.from_bytes(digest[:4], "big") % 100 < HELDOUT_PERCENT else "train"


def _default_stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@dataclass(frozen=True)
class Roots:
    """Where the builder reads from. `root` is "/" on a real machine, a fixture tree in tests."""

    root: Path = Path("/")
    python_stdlib: Path = field(default_factory=_default_stdlib)
    # Command printing the King James Bible one verse per line ("Ge1:1 In the beginning...").
    bible_command: Sequence[str] = ("bible", "-f", "Gen1:1-Rev22:21")

    def __post_init__(self) -> None:
        if not self.root.is_dir():
            raise ValueError(f"Roots.root {self.root} is not a directory")

    def path(self, relative: str) -> Path:
        return self.root / relative


@dataclass(frozen=True)
class Limits:
    """Caps that keep the corpus a size two CPU cores can train on."""

    max_doc_chars: int = 12_000
    min_doc_chars: int = 400
    max_domain_chars: int = 2_500_000
    max_manpages: int = 900  # rendering costs ~0.1 s CPU each
    max_manpages_per_package: int = 40

    def __post_init__(self) -> None:
        if not 0 < self.min_doc_chars < self.max_doc_chars <= self.max_domain_chars:
            raise ValueError("Limits need 0 < min_doc_chars < max_doc_chars <= max_domain_chars")
        if self.max_manpages < 1 or self.max_manpages_per_package < 1:
            raise ValueError("Limits.max_manpages and max_manpages_per_package must be >= 1")


def hashed_order(items: list[str]) -> list[str]:
    """A deterministic shuffle: sampling by this order spreads a cap evenly over a source tree."""
    return sorted(items, key=lambda s: hashlib.sha1(s.encode()).hexdigest())

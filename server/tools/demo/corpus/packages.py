"""Which Debian package ships a file, and under which licence (for the corpus manifest)."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from server.tools.demo.corpus.document import Roots

_LICENSE_LINE = re.compile(r"^License:\s*(\S.*)$", re.MULTILINE)


class PackageIndex:
    """Reads dpkg's file lists once: absolute path -> package name."""

    def __init__(self, roots: Roots) -> None:
        self._roots = roots
        self._owner: dict[str, str] = {}
        info = roots.path("var/lib/dpkg/info")
        if info.is_dir():
            for listing in sorted(info.glob("*.list")):
                package = listing.name[: -len(".list")].split(":")[0]
                for line in listing.read_text(errors="replace").splitlines():
                    self._owner.setdefault(line, package)

    @property
    def root(self) -> Path:
        return self._roots.root

    def package_of(self, path: Path) -> str:
        """The owning package of `path` (given inside roots.root), "unknown" when dpkg has none."""
        relative = "/" + str(path.relative_to(self._roots.root)).lstrip("/")
        owner = self._owner.get(relative)
        if owner is None:
            # Symlinked directories (/usr/share/doc/<pkg> -> <other>) are listed under their own name.
            resolved = "/" + str(path.resolve().relative_to(self._roots.root.resolve())).lstrip("/")
            owner = self._owner.get(resolved, "unknown")
        return owner

    def licence_of(self, package: str) -> str:
        names = _licence_from_copyright(self._roots.path(f"usr/share/doc/{package}/copyright"))
        return names or f"see /usr/share/doc/{package}/copyright"


@lru_cache(maxsize=4096)
def _licence_from_copyright(copyright_file: Path) -> str:
    """The licence names a machine-readable copyright file declares ("" when it declares none)."""
    try:
        text = copyright_file.read_text(errors="replace")
    except OSError:
        return ""
    names = sorted({m.group(1).strip() for m in _LICENSE_LINE.finditer(text)})
    return "; ".join(names)[:200]

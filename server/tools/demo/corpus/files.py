"""Sources whose documents are whole files: Python, C headers, licences, changelogs, manual pages."""

from __future__ import annotations

import gzip
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from server.tools.demo.corpus.document import Document, Limits, Roots, hashed_order
from server.tools.demo.corpus.packages import PackageIndex

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_OVERSTRIKE = re.compile(r".\x08")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
MAN_SECTIONS = ("1", "2", "3", "5", "7", "8")


def clean(text: str, limits: Limits) -> str | None:
    """Control characters out, cut at a line end under the cap; None when too short to keep."""
    text = _CONTROL.sub("", text.replace("\r\n", "\n")).strip("\n")
    if len(text) > limits.max_doc_chars:
        cut = text.rfind("\n", 0, limits.max_doc_chars)
        text = text[: cut if cut > limits.min_doc_chars else limits.max_doc_chars]
    return text if len(text) >= limits.min_doc_chars else None


def _read(path: Path) -> str:
    if path.suffix == ".gz":
        with gzip.open(path, "rt", errors="replace") as handle:
            return handle.read()
    return path.read_text(errors="replace")


def _file_docs(
    domain: str, paths: list[Path], base: Path, index: PackageIndex, limits: Limits
) -> Iterator[Document]:
    by_name = {str(p.relative_to(base)): p for p in paths}
    for name in hashed_order(list(by_name)):
        path = by_name[name]
        text = clean(_read(path), limits)
        if text is None:
            continue
        package = index.package_of(path)
        file = "/" + str(path.relative_to(index.root))
        yield Document(domain, name, package, file, index.licence_of(package), text)


def python_docs(roots: Roots, index: PackageIndex, limits: Limits) -> Iterator[Document]:
    base = roots.python_stdlib
    paths = [p for p in base.rglob("*.py") if "site-packages" not in p.parts and p.is_file()]
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    by_name = {str(p.relative_to(base)): p for p in paths}
    for name in hashed_order(list(by_name)):
        text = clean(by_name[name].read_text(errors="replace"), limits)
        if text is not None:
            yield Document(
                "python", name, f"python{version} standard library", f"{base}/{name}", "PSF-2.0", text
            )


def c_docs(roots: Roots, index: PackageIndex, limits: Limits) -> Iterator[Document]:
    base = roots.path("usr/include")
    yield from _file_docs("c", [p for p in base.rglob("*.h") if p.is_file()], base, index, limits)


def licence_docs(roots: Roots, index: PackageIndex, limits: Limits) -> Iterator[Document]:
    base = roots.path("usr/share")
    paths = [p for p in (base / "common-licenses").glob("*") if p.is_file()]
    paths += sorted((base / "doc").glob("*/copyright"))
    yield from _file_docs("licence", paths, base, index, limits)


def changelog_docs(roots: Roots, index: PackageIndex, limits: Limits) -> Iterator[Document]:
    base = roots.path("usr/share/doc")
    yield from _file_docs("changelog", sorted(base.glob("*/changelog.Debian.gz")), base, index, limits)


def manpage_docs(roots: Roots, index: PackageIndex, limits: Limits) -> Iterator[Document]:
    base = roots.path("usr/share/man")
    paths = [p for s in MAN_SECTIONS for p in sorted((base / f"man{s}").glob("*")) if p.is_file()]
    by_name = {str(p.relative_to(base)): p for p in paths}
    per_package: dict[str, int] = {}
    rendered = 0
    for name in hashed_order(list(by_name)):
        path = by_name[name]
        package = index.package_of(path)
        # one package can ship thousands of pages (google-cloud-cli): cap it so the domain stays varied
        if per_package.get(package, 0) >= limits.max_manpages_per_package:
            continue
        if rendered >= limits.max_manpages:
            break
        rendered += 1
        text = clean(render_manpage(path), limits)
        if text is None:
            continue
        per_package[package] = per_package.get(package, 0) + 1
        file = "/" + str(path.relative_to(index.root))
        yield Document("manpage", name, package, file, index.licence_of(package), text)


def render_manpage(path: Path) -> str:
    """Formatted text of a man page via man-db; a plain troff strip when man is not installed."""
    if shutil.which("man") is None:
        return strip_troff(_read(path))
    env = {"MANWIDTH": "80", "LC_ALL": "C.UTF-8", "PATH": "/usr/bin:/bin", "MAN_DISABLE_SECCOMP": "1"}
    try:
        done = subprocess.run(
            ["man", "--no-hyphenation", "--no-justification", "-l", str(path)],
            capture_output=True,
            env=env,
            timeout=30,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return ""
    if done.returncode != 0:
        return strip_troff(_read(path))
    text = done.stdout.decode("utf-8", errors="replace")
    return _ANSI.sub("", _OVERSTRIKE.sub("", text))


_FONT = re.compile(r"\\f[BIRP]|\\f\(..|\\\*\(..|\\&|\\e")
_TEXT_MACROS = ("B", "I", "BR", "IR", "RB", "BI", "IB", "RI", "SH", "SS")


def strip_troff(source: str) -> str:
    """Enough of man(7) to keep the words: requests dropped, text macros unwrapped."""
    lines: list[str] = []
    for line in source.splitlines():
        if line.startswith(('.\\"', "'\\\"")):
            continue
        if line.startswith("."):
            macro, _, rest = line[1:].partition(" ")
            if macro not in _TEXT_MACROS:
                continue
            line = rest.replace('"', "")
            if macro == "SH":
                lines.append("")
        lines.append(_FONT.sub("", line).replace("\\-", "-"))
    return "\n".join(lines)

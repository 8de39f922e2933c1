"""The repository stands on its own: the code and the docs cite only documents inside it (the
facts they rely on are stated in docs/, e.g. docs/emo.md), never notes kept outside it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = [ROOT / "server", ROOT / "expert_cache", ROOT / "docs", ROOT / "README.md"]
OUTSIDE = re.compile(r"emo-model\.md|\.\./shared|architecture\.md")
TEXT_SUFFIXES = {".py", ".md", ".txt", ".json", ".jinja", ".html", ".js", ".css", ".toml", ".yml", ".yaml"}


def scanned_files() -> list[Path]:
    files: list[Path] = []
    for top in SCANNED:
        files += [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
    return [p for p in files if p.suffix in TEXT_SUFFIXES and "__pycache__" not in p.parts]


def test_nothing_cites_documents_outside_the_repository() -> None:
    files = scanned_files()
    assert ROOT / "README.md" in files and ROOT / "docs/emo.md" in files and len(files) > 50
    cited = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
             for p in files for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
             if OUTSIDE.search(line)]
    assert not cited, "cite docs/ instead (state the fact there):\n" + "\n".join(cited)


def test_every_docs_link_resolves() -> None:
    """A relative link in README.md or docs/*.md names a file of the repository."""
    broken = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if "://" in target or target.startswith("#"):
                continue
            if not (page.parent / target.split("#")[0]).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken

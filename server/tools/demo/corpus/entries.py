"""Sources made of many short entries grouped into documents: dictionaries, the Bible, fortunes."""

from __future__ import annotations

import gzip
import re
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path

from server.tools.demo.corpus.document import Document, Limits, Roots, hashed_order
from server.tools.demo.corpus.files import clean
from server.tools.demo.corpus.packages import PackageIndex

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_VERSE = re.compile(r"^([1-3]?[A-Za-z]+)(\d+):(\d+) (.*)$")
ENTRY_GROUP_CHARS = 3_000  # a "page" of entries: long enough for a 64-token pool prefix


def dictd_number(text: str) -> int:
    """dictd's base-64 offsets and lengths (most significant digit first)."""
    value = 0
    for char in text:
        value = value * 64 + _B64.index(char)
    return value


def _group(entries: Iterable[str], limit: int = ENTRY_GROUP_CHARS) -> Iterator[str]:
    """Consecutive entries joined until `limit` characters: entry boundaries are never cut."""
    page: list[str] = []
    size = 0
    for entry in entries:
        page.append(entry)
        size += len(entry) + 1
        if size >= limit:
            yield "\n".join(page)
            page, size = [], 0
    if page:
        yield "\n".join(page)


def _pages(
    domain: str, stem: str, source: Path, pages: Iterable[str], index: PackageIndex, limits: Limits
) -> Iterator[Document]:
    package = index.package_of(source)
    licence = index.licence_of(package)
    file = "/" + str(source.relative_to(index.root))
    for number, page in enumerate(pages):
        text = clean(page, limits)
        if text is not None:
            yield Document(domain, f"{stem}/{number:05d}", package, file, licence, text)


def dictd_entries(index_file: Path, dict_file: Path) -> list[str]:
    """Every headword entry of a dictd database in file order (the 00-database-* header skipped)."""
    with gzip.open(dict_file, "rb") as handle:
        data = handle.read()
    spans: set[tuple[int, int]] = set()
    for line in index_file.read_text(errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and not parts[0].startswith("00-database"):
            spans.add((dictd_number(parts[1]), dictd_number(parts[2])))
    return [data[start : start + length].decode("utf-8", errors="replace") for start, length in sorted(spans)]


def wordnet_entries(data_file: Path) -> list[str]:
    """`word, word (pos): gloss` for each synset line of a WordNet data.* file."""
    entries: list[str] = []
    pos = data_file.suffix.lstrip(".")
    for line in data_file.read_text(errors="replace").splitlines():
        if line.startswith("  ") or " | " not in line:
            continue
        head, gloss = line.split(" | ", 1)
        fields = head.split()
        count = int(fields[3], 16)
        words = [w.replace("_", " ") for w in fields[4 : 4 + 2 * count : 2]]
        entries.append(f"{', '.join(words)} ({pos}): {gloss.strip()}")
    return entries


def dictionary_docs(roots: Roots, index: PackageIndex, limits: Limits) -> Iterator[Document]:
    docs: list[Document] = []
    dictd = roots.path("usr/share/dictd")
    for stem in ("gcide", "foldoc"):
        index_file, dict_file = dictd / f"{stem}.index", dictd / f"{stem}.dict.dz"
        if index_file.is_file() and dict_file.is_file():
            entries = dictd_entries(index_file, dict_file)
            docs += _pages("dictionary", stem, dict_file, _group(entries), index, limits)
    for data_file in sorted(roots.path("usr/share/wordnet").glob("data.*")):
        stem = f"wordnet-{data_file.suffix.lstrip('.')}"
        docs += _pages("dictionary", stem, data_file, _group(wordnet_entries(data_file)), index, limits)
    yield from _in_hashed_order(docs)


def bible_chapters(lines: Iterable[str]) -> Iterator[tuple[str, str]]:
    """(book+chapter, text) from `bible -f` output, one chapter per document."""
    current = ""
    verses: list[str] = []
    for line in lines:
        match = _VERSE.match(line.strip())
        if match is None:
            continue
        book, chapter, verse, text = match.groups()
        key = f"{book}{chapter}"
        if key != current and verses:
            yield current, "\n".join(verses)
            verses = []
        current = key
        verses.append(f"{chapter}:{verse} {text}")
    if verses:
        yield current, "\n".join(verses)


def prose_docs(roots: Roots, index: PackageIndex, limits: Limits) -> Iterator[Document]:
    docs: list[Document] = []
    bible_data = roots.path("usr/lib/bible.data")
    try:
        done = subprocess.run(list(roots.bible_command), capture_output=True, timeout=300, check=True)
        output = done.stdout.decode("utf-8", errors="replace").splitlines()
    except (OSError, subprocess.SubprocessError):
        output = []
    for key, text in bible_chapters(output):
        kept = clean(text, limits)
        if kept is not None:
            package = index.package_of(bible_data) if bible_data.exists() else "bible-kjv-text"
            docs.append(
                Document(
                    "prose", f"kjv/{key}", package, "/usr/lib/bible.data", index.licence_of(package), kept
                )
            )
    fortunes = roots.path("usr/share/games/fortunes")
    for source in sorted(fortunes.glob("*")):
        if source.suffix in {".dat", ".u8"} or not source.is_file() or source.name.startswith("."):
            continue
        entries = [e.strip("\n") for e in source.read_text(errors="replace").split("\n%\n")]
        docs += _pages(
            "prose", f"fortunes/{source.name}", source, _group(e for e in entries if e), index, limits
        )
    yield from _in_hashed_order(docs)


def _in_hashed_order(docs: list[Document]) -> Iterator[Document]:
    by_id = {d.name: d for d in docs}
    for name in hashed_order(list(by_id)):
        yield by_id[name]

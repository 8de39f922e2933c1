"""The corpus builder on a fixture tree: seven domains, boundaries, labels, split, manifest."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from server.tools.demo.corpus import DOMAINS, Document, Roots, build_corpus, load_documents
from server.tools.demo.corpus.document import Limits
from server.tools.demo.corpus.entries import bible_chapters, dictd_entries, dictd_number
from server.tools.demo.corpus.files import strip_troff
from tests.tools.demo.conftest import FIXTURE, dictd_encode

LIMITS = Limits(max_doc_chars=4000, min_doc_chars=40, max_domain_chars=100_000)


def roots(root: Path) -> Roots:
    return Roots(root=root, python_stdlib=root / "python", bible_command=("cat", str(root / "kjv.txt")))


@pytest.fixture(scope="module")
def built(fixture_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    build_corpus(out, roots(fixture_root), LIMITS)
    return out


def all_docs(corpus: Path) -> list[Document]:
    return load_documents(corpus, "train") + load_documents(corpus, "heldout")


def test_every_domain_is_gathered_with_its_label(built: Path) -> None:
    docs = all_docs(built)
    assert {d.domain for d in docs} == set(DOMAINS)
    by_name = {(d.domain, d.name): d for d in docs}
    assert "struct ring {" in by_name[("c", "demo/ring.h")].text
    assert "class RingBuffer" in by_name[("python", "json_demo/ringbuf.py")].text
    assert "License: MIT" in by_name[("licence", "doc/pkga/copyright")].text
    assert "Demo Permissive Licence" in by_name[("licence", "common-licenses/Demo-1.0")].text
    assert "wrap-around" in by_name[("changelog", "pkga/changelog.Debian.gz")].text
    man = by_name[("manpage", "man1/ringcat.1.gz")].text
    assert "ring buffer" in man and ".SH" not in man and "\\fB" not in man


def test_documents_keep_their_boundaries(built: Path) -> None:
    docs = all_docs(built)
    python = [d for d in docs if d.domain == "python"]
    assert len(python) == 1  # one file, one document: nothing merged or split
    assert python[0].text == (FIXTURE / "python/json_demo/ringbuf.py").read_text().strip("\n")
    prose = {d.name: d.text for d in docs if d.domain == "prose"}
    assert prose["kjv/Ge1"].splitlines()[0].startswith("1:1 In the beginning")
    assert "2:1" not in prose["kjv/Ge1"] and prose["kjv/Ge2"].startswith("2:1 Thus")
    dictionary = "\n".join(d.text for d in docs if d.domain == "dictionary")
    assert "A circular queue of fixed size in which the writer wraps\n   around" in dictionary


def test_manifest_records_package_file_licence(built: Path) -> None:
    with (built / "manifest.tsv").open() as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    assert len(rows) == len(all_docs(built))
    by_id = {r["id"]: r for r in rows}
    ring = by_id["c/demo/ring.h"]
    assert (ring["package"], ring["file"], ring["licence"]) == ("pkga", "/usr/include/demo/ring.h", "MIT")
    assert by_id["python/json_demo/ringbuf.py"]["licence"] == "PSF-2.0"
    assert all(r["split"] in ("train", "heldout") and int(r["chars"]) > 0 for r in rows)


def test_split_is_fixed_per_document_by_hashed_name() -> None:
    docs = [Document("prose", f"doc{i}", "p", "/f", "l", "text") for i in range(2000)]
    held = [d for d in docs if d.split == "heldout"]
    assert 0.05 < len(held) / len(docs) < 0.11
    again = [Document("prose", d.name, "other", "/g", "m", "different text").split for d in docs]
    assert again == [d.split for d in docs]  # depends on the document's id only, never its lines


def test_dictd_offsets_and_entries(fixture_root: Path) -> None:
    for value in (0, 1, 63, 64, 4095, 123456):
        assert dictd_number(dictd_encode(value)) == value
    share = fixture_root / "usr/share/dictd"
    entries = dictd_entries(share / "foldoc.index", share / "foldoc.dict.dz")
    assert [e.split("\n")[0] for e in entries] == ["ring buffer", "stack", "queue"]


def test_bible_chapters_and_troff_fallback() -> None:
    chapters = list(
        bible_chapters(["Ex3:1 Now Moses kept the flock", "Ex3:2 And the angel", "Ex4:1 And Moses"])
    )
    assert [c[0] for c in chapters] == ["Ex3", "Ex4"]
    text = strip_troff((FIXTURE / "usr/share/man/man1/ringcat.1").read_text())
    assert "ringcat - copy standard input through a ring buffer" in text and "\\f" not in text


def test_missing_domain_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "python").mkdir()
    with pytest.raises(RuntimeError, match="no documents found for domains"):
        build_corpus(
            tmp_path / "out",
            Roots(root=tmp_path, python_stdlib=tmp_path / "python", bible_command=("true",)),
            LIMITS,
        )

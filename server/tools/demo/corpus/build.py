"""`emo-serve demo build-corpus`: gather the documents of every domain, split them, write a manifest."""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from server.tools.demo.corpus.document import DOMAINS, Document, Limits, Roots
from server.tools.demo.corpus.entries import dictionary_docs, prose_docs
from server.tools.demo.corpus.files import c_docs, changelog_docs, licence_docs, manpage_docs, python_docs
from server.tools.demo.corpus.packages import PackageIndex

Source = Callable[[Roots, PackageIndex, Limits], Iterator[Document]]
SOURCES: dict[str, Source] = {
    "python": python_docs,
    "c": c_docs,
    "licence": licence_docs,
    "manpage": manpage_docs,
    "dictionary": dictionary_docs,
    "prose": prose_docs,
    "changelog": changelog_docs,
}
SPLITS = ("train", "heldout")
MANIFEST_COLUMNS = ("id", "domain", "split", "package", "file", "licence", "chars")


@dataclass(frozen=True)
class CorpusStats:
    """Documents and characters per (domain, split)."""

    documents: dict[str, dict[str, int]]
    chars: dict[str, dict[str, int]]

    def as_markdown(self) -> str:
        rows = [
            "| domain | train docs | held-out docs | train chars | held-out chars |",
            "|---|---|---|---|---|",
        ]
        for domain in self.documents:
            d, c = self.documents[domain], self.chars[domain]
            rows.append(f"| {domain} | {d['train']} | {d['heldout']} | {c['train']} | {c['heldout']} |")
        return "\n".join(rows)


def gather(roots: Roots, limits: Limits, domains: tuple[str, ...] = DOMAINS) -> list[Document]:
    """Documents of each domain up to its character cap; exact duplicate texts kept once."""
    index = PackageIndex(roots)
    seen: set[str] = set()
    documents: list[Document] = []
    for domain in domains:
        total = 0
        for doc in SOURCES[domain](roots, index, limits):
            digest = hashlib.sha1(doc.text.encode()).hexdigest()
            if digest in seen:
                continue
            seen.add(digest)
            documents.append(doc)
            total += len(doc.text)
            if total >= limits.max_domain_chars:
                break
    return documents


def build_corpus(out: Path, roots: Roots | None = None, limits: Limits | None = None) -> CorpusStats:
    """Write OUT/{train,heldout}.jsonl (one document per line), OUT/manifest.tsv, OUT/stats.json."""
    documents = gather(roots or Roots(), limits or Limits())
    missing = [d for d in DOMAINS if not any(doc.domain == d for doc in documents)]
    if missing:
        raise RuntimeError(f"no documents found for domains {missing}: install their Debian packages")
    out.mkdir(parents=True, exist_ok=True)
    counts = {d: dict.fromkeys(SPLITS, 0) for d in DOMAINS}
    chars = {d: dict.fromkeys(SPLITS, 0) for d in DOMAINS}
    handles = {s: (out / f"{s}.jsonl").open("w", encoding="utf-8") for s in SPLITS}
    try:
        with (out / "manifest.tsv").open("w", encoding="utf-8", newline="") as manifest:
            writer = csv.writer(manifest, delimiter="\t", lineterminator="\n")
            writer.writerow(MANIFEST_COLUMNS)
            for doc in documents:
                split = doc.split
                record = {
                    "id": doc.doc_id,
                    "domain": doc.domain,
                    "name": doc.name,
                    "package": doc.package,
                    "file": doc.file,
                    "licence": doc.licence,
                    "text": doc.text,
                }
                handles[split].write(json.dumps(record, ensure_ascii=False) + "\n")
                writer.writerow(
                    (doc.doc_id, doc.domain, split, doc.package, doc.file, doc.licence, len(doc.text))
                )
                counts[doc.domain][split] += 1
                chars[doc.domain][split] += len(doc.text)
    finally:
        for handle in handles.values():
            handle.close()
    stats = CorpusStats(counts, chars)
    (out / "stats.json").write_text(json.dumps({"documents": counts, "chars": chars}, indent=1) + "\n")
    return stats


def load_documents(corpus: Path, split: str) -> list[Document]:
    """The documents of one split of a built corpus, in file order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path = corpus / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a built corpus (run `emo-serve demo build-corpus`)")
    documents = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            try:
                r = json.loads(line)
                documents.append(
                    Document(r["domain"], r["name"], r["package"], r["file"], r["licence"], r["text"])
                )
            except (KeyError, ValueError) as exc:
                raise ValueError(f"{path}:{number}: bad document record: {exc}") from exc
    return documents

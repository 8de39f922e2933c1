"""`emo-serve demo` end to end on a tiny corpus: tokenizer, both trainings, evaluation, samples."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest

from server.cli import main
from tests.tools.demo.conftest import FIXTURE

SOURCES = {
    "python": "python/json_demo/ringbuf.py",
    "c": "usr/include/demo/ring.h",
    "licence": "usr/share/common-licenses/Demo-1.0",
    "manpage": "usr/share/man/man1/ringcat.1",
    "dictionary": "usr/share/dictd/foldoc.dict",
    "prose": "kjv.txt",
    "changelog": "usr/share/doc/pkga/changelog.Debian",
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both splits hold every fixture document (a held-out split by hash would be near empty)."""
    out = tmp_path_factory.mktemp("cli-corpus")
    lines = []
    for domain, rel in SOURCES.items():
        text = (FIXTURE / rel).read_text() * 4
        record = {
            "id": f"{domain}/{rel}",
            "domain": domain,
            "name": rel,
            "package": "p",
            "file": "/" + rel,
            "licence": "l",
            "text": text,
        }
        lines.append(json.dumps(record))
    for split in ("train", "heldout"):
        (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return out


def assert_rederivable(numbers: dict[str, Any], documents_tsv: str, corpus: Path) -> None:
    """Every loss of evaluation.json from the per-document rows: a domain's summed NLL over its
    scored tokens, the mean the unweighted mean of the domains; the ids are held-out documents."""
    rows = list(csv.DictReader(io.StringIO(documents_tsv), delimiter="\t"))
    heldout = {json.loads(line)["id"] for line in (corpus / "heldout.jsonl").read_text().splitlines()}
    assert rows and {r["id"] for r in rows} <= heldout
    assert {d: sum(r["domain"] == d for r in rows) for d in numbers["documents"]} == numbers["documents"]
    for r in rows:
        assert int(r["scored"]) == int(r["tokens"]) - 64  # the default prefix
    for column, losses in numbers["losses"].items():
        per_domain = {}
        for domain in numbers["documents"]:
            mine = [r for r in rows if r["domain"] == domain]
            if mine:
                nll = sum(float(r[f"nll {column}"]) for r in mine)
                per_domain[domain] = nll / sum(int(r["scored"]) for r in mine)
                assert losses[domain] == pytest.approx(per_domain[domain], rel=1e-6), (column, domain)
        assert losses["mean"] == pytest.approx(sum(per_domain.values()) / len(per_domain), rel=1e-6)


def test_demo_pipeline(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tok = tmp_path / "tok"
    assert (
        main(["demo", "train-tokenizer", "--corpus", str(corpus), "--out", str(tok), "--vocab-size", "400"])
        == 0
    )
    assert json.loads((tok / "tokenizer_config.json").read_text())["chat_template"]
    common = [
        "--corpus",
        str(corpus),
        "--tokenizer",
        str(tok),
        "--preset",
        "smoke",
        "--steps",
        "4",
        "--seq-len",
        "64",
        "--batch-size",
        "2",
        "--pool-min",
        "2",
    ]
    assert main(["demo", "train", *common, "--out", str(tmp_path / "emo")]) == 0
    assert main(["demo", "train", *common, "--out", str(tmp_path / "base"), "--baseline"]) == 0
    record = json.loads((tmp_path / "emo/training_record.json").read_text())
    assert record["steps"] == 4 and record["tokens_seen"] > 0 and record["train"]["use_pools"]
    assert not json.loads((tmp_path / "base/training_record.json").read_text())["train"]["use_pools"]
    capsys.readouterr()
    assert (
        main(
            [
                "demo",
                "evaluate",
                "--emo",
                str(tmp_path / "emo"),
                "--baseline",
                str(tmp_path / "base"),
                "--corpus",
                str(corpus),
                "--out",
                str(tmp_path / "eval"),
                "--max-len",
                "96",
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert "| python |" in table and "| mean |" in table and "Jaccard" in table
    png = (tmp_path / "eval/pool_heatmap.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    numbers = json.loads((tmp_path / "eval/evaluation.json").read_text())
    assert set(numbers["losses"]) == {"emo/full", "emo/pool", "emo/random", "baseline/pool", "baseline/full"}
    assert_rederivable(numbers, (tmp_path / "eval/evaluation_documents.tsv").read_text(), corpus)
    assert (
        main(
            [
                "demo",
                "sample",
                "--model",
                str(tmp_path / "emo"),
                "--corpus",
                str(corpus),
                "--max-new-tokens",
                "3",
            ]
        )
        == 0
    )
    assert "layer 0:" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["evaluate", "--baseline", "b", "--corpus", "c", "--out", "o"], "--emo"),
        (["sample", "--corpus", "c"], "--model"),
        (["named-pools", "--corpus", "c"], "--model"),
    ],
)
def test_without_a_shipped_checkpoint_the_default_is_refused_by_name(
    argv: list[str], flag: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An install without the demo checkpoint (a wheel built without package data) is what
    demo_model_dir() answers None for; each step then names the flag to give instead."""
    import server.cli.demo

    monkeypatch.setattr(server.cli.demo, "demo_model_dir", lambda: None)
    assert main(["demo", *argv]) == 2
    assert capsys.readouterr().err == (
        f"error: no {flag} given and no demo checkpoint is shipped in this install\n"
    )

"""`emo-serve demo named-pools` on the shipped demo model: its full and own-pool columns agree
with `demo evaluate`'s independent implementation (the training model), and the command writes
its table."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from server.cli import main
from server.demo_model import demo_model_dir
from server.model.loader import load_model
from server.tools.demo.corpus import Document
from server.tools.demo.evaluate import EvalConfig, evaluate_mode, prepare
from server.tools.demo.named_pool_eval import evaluate_named_pools
from server.tools.demo.train.export import load_checkpoint
from tests.tools.demo.conftest import FIXTURE

MODEL = demo_model_dir()
pytestmark = pytest.mark.skipif(MODEL is None, reason="the demo checkpoint is not shipped in this install")
SOURCES = {"python": "python/json_demo/ringbuf.py", "licence": "usr/share/common-licenses/Demo-1.0",
           "prose": "kjv.txt"}
CFG = EvalConfig(max_len=128)


def documents() -> list[Document]:
    """Two documents per domain: the two halves of a fixture file, each repeated to be long enough."""
    docs = []
    for domain, rel in SOURCES.items():
        text = (FIXTURE / rel).read_text()
        for half, part in enumerate((text[: len(text) // 2], text[len(text) // 2:])):
            docs.append(Document(domain=domain, name=f"{rel}#{half}", package="p", file="/" + rel,
                                 licence="l", text=part * 3))
    return docs


def test_full_and_own_pool_match_the_training_models_evaluation() -> None:
    assert MODEL is not None
    docs = prepare(documents(), Tokenizer.from_file(str(MODEL / "tokenizer.json")), CFG)
    assert sorted({d.domain for d in docs}) == sorted(SOURCES) and len(docs) == 6
    results = evaluate_named_pools(load_model(MODEL, device="cpu", dtype="fp32"), docs, CFG)
    pad = json.loads((MODEL / "generation_config.json").read_text())["pad_token_id"]
    reference = load_checkpoint(MODEL)
    for column, mode in (("full", "full"), ("own", "pool")):
        expected = evaluate_mode(reference, docs, CFG, mode, pad)
        for domain, row in results.items():
            assert row.loss(column) == pytest.approx(expected.loss(domain), rel=1e-4), (column, domain)
    for domain, row in results.items():
        assert row.docs == 2 and row.tokens["same"] == row.tokens["own"]
        assert row.tokens["other"] == 2 * row.tokens["own"] and set(row.by_source) == set(SOURCES) - {domain}


def test_the_command_writes_its_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    lines = [json.dumps(dataclasses.asdict(d)) for d in documents()]
    (corpus / "heldout.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["demo", "named-pools", "--corpus", str(corpus), "--out", str(tmp_path / "out"),
                 "--max-len", "128"]) == 0
    table = capsys.readouterr().out
    assert "| python | 2 |" in table and "pool of ONE other doc, same domain" in table
    numbers = json.loads((tmp_path / "out/named_pools.json").read_text())
    assert set(numbers["domains"]) == set(SOURCES) and numbers["pool_size"] == 8
    assert (tmp_path / "out/named_pools.md").read_text().strip() in table

"""Smoke run of the paging benchmark on a CPU slab (no timing asserts)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from server.cli import bench
from server.tools.bench.paging import CacheBenchConfig, run_cache_bench
from tests.expert_cache.helpers import write_checkpoint


def test_cache_bench_rows_on_cpu(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, layers=2, experts=6, hidden=16, inter=8, dtype=torch.bfloat16, shards=2)
    result = run_cache_bench(
        CacheBenchConfig(tmp_path, experts=10, device="cpu", device_slots=3), log=lambda _: None
    )
    eb = 3 * 16 * 8 * 2
    rows = {r.name: r for r in result.rows}
    assert rows["host tier -> device"].nbytes == 10 * eb
    assert (
        rows["disk -> device (host tier 0)"].nbytes == rows["disk -> host tier -> device"].nbytes == 10 * eb
    )
    assert rows["reference: file sequential read"].nbytes >= 10 * eb
    assert "reference: memcpy host->cpu" in rows
    assert all(r.seconds > 0 for r in result.rows)
    assert "3 device slots" in result.header and "GB/s" in result.table()


def test_cli_suite_dispatch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_checkpoint(tmp_path / "ckpt", layers=1, experts=4)
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    out = tmp_path / "r.json"
    args = parser.parse_args(
        ["cache", "--model", str(tmp_path / "ckpt"), "--experts", "4", "--device", "cpu", "--json", str(out)]
    )
    assert bench.run(args) == 0
    table = capsys.readouterr().out
    assert "host tier -> device" in table and "file sequential read" in table
    assert {r["name"] for r in json.loads(out.read_text())["rows"]} >= {"host tier -> device"}
    args = parser.parse_args(
        ["cache", "--model", str(tmp_path / "ckpt"), "--experts", "99", "--device", "cpu"]
    )
    assert bench.run(args) == 2
    assert "only 4 experts" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["nosuch"])

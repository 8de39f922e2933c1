"""`emo-serve bench arrivals` runs both modes end to end on the tiny model and reports what it
measured (the numbers themselves are for the README, never asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.cli import main


def test_cold_arrivals_report(tiny_emo_checkpoint: Path, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    args = ["bench", "arrivals", "--model", str(tiny_emo_checkpoint), "--out", str(tmp_path),
            "--device", "cpu", "--streams", "2", "--stream-tokens", "24", "--arrivals", "2",
            "--arrival-every", "3",
            "--prompt-tokens", "16"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| async |" in out and "| blocking |" in out
    report = json.loads((tmp_path / "arrivals.json").read_text())
    for mode in report["results"]:
        assert mode["quiet"]["count"] > 0 and mode["arrivals"]["count"] > 0
        assert len(mode["cold_ttft_s"]) == 2 and all(t > 0 for t in mode["cold_ttft_s"])
        assert mode["paged_bytes"] > 0  # the arrivals' domains were cold: read from the files


def test_bad_arguments_are_reported(tiny_emo_checkpoint: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    args = ["bench", "arrivals", "--model", str(tiny_emo_checkpoint), "--out", str(tmp_path), "--tier", "0"]
    assert main(args) == 2
    assert "tier must be in (0, 1]" in capsys.readouterr().err

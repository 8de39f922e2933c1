"""The prefetch-recall benchmark measures what the model really prefetched."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.cli import main
from server.tools.bench.prefetch_recall import measure_prefetch_recall


def test_recall_on_planted_domains(tiny_emo_checkpoint: Path) -> None:
    result = measure_prefetch_recall(tiny_emo_checkpoint, prompts_per_domain=1)
    assert len(result.per_layer) == 3  # every MoE layer after the first is predicted
    assert all(0.0 <= r <= 1.0 for r in result.per_layer)
    # planted domains make the next layer's pool predictable; random guessing of 8 of 31
    # routable experts would give about 0.26
    assert result.mean > 0.6


def test_cli(tiny_emo_checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "prefetch", "--model", str(tiny_emo_checkpoint), "--prompts-per-domain", "1"]) == 0
    assert "| mean |" in capsys.readouterr().out

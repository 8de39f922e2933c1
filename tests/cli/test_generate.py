"""`emo-serve generate` (server/cli/generate.py) on the tiny synthetic checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from server.cli import generate
from server.engine.request import GenerationRequest
from server.model.loader import LoadedModel
from tests.engine.conftest import EngineFactory, greedy, run_all


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    generate.add_arguments(parser)
    return generate.run(parser.parse_args(argv))


PROMPT = "the court ruled on the appeal"


def test_generate_streams_the_engine_text(tiny_emo_checkpoint: Path, loaded: LoadedModel,
                                          make_engine: EngineFactory,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    ids = loaded.tokenizer.encode(PROMPT)
    ref = run_all(make_engine(), [GenerationRequest("r", ids, greedy(12), expert_pool=5)])
    expected = ref.text("r")
    rc = run(["--model", str(tiny_emo_checkpoint), "--prompt", PROMPT, "--max-tokens", "12",
              "--temperature", "0", "--pool-size", "5", "--device", "cpu", "--show-pool"])
    out = capsys.readouterr()
    assert rc == 0
    assert out.out == expected + "\n"
    assert "expert pool: 5 per layer" in out.err and "layer 3:" in out.err
    assert "12 generated tokens" in out.err
    # paged through a small device tier: same text
    rc = run(["--model", str(tiny_emo_checkpoint), "--prompt", PROMPT, "--max-tokens", "12",
              "--temperature", "0", "--pool-size", "5", "--expert-cache", f"{24 * 24576}",
              "--host-cache", "1MiB", "--dtype", "fp32"])
    out = capsys.readouterr()
    assert rc == 0 and out.out == expected + "\n"


def test_generate_reports_bad_arguments(tiny_emo_checkpoint: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    rc = run(["--model", str(tiny_emo_checkpoint), "--prompt", "x", "--pool-size", "99", "--device", "cpu"])
    assert rc == 2 and "expert pool size must be" in capsys.readouterr().err
    rc = run(["--model", str(tiny_emo_checkpoint), "--prompt", "x", "--dtype", "int8"])
    assert rc == 2 and "dtype" in capsys.readouterr().err
    rc = run(["--model", str(tiny_emo_checkpoint), "--prompt", "x", "--expert-cache", "lots"])
    assert rc == 2 and "--expert-cache" in capsys.readouterr().err

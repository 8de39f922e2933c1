"""Tests stay inside tmp: the synthetic demo checkpoint the API tests serve is written under
this session's $EMO_SERVE_CACHE, never into ~/.cache where stale weights could outlive a change."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from server.model.synth import demo_checkpoint_dir


def test_the_demo_checkpoint_is_written_under_the_session_tmp(
    emo_serve_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    base = tmp_path_factory.getbasetemp()
    assert emo_serve_cache.is_relative_to(base) and os.environ["EMO_SERVE_CACHE"] == str(emo_serve_cache)
    written = demo_checkpoint_dir()
    assert written.is_relative_to(emo_serve_cache) and (written / "config.json").is_file()

"""Tests stay inside tmp: every test (and every process a test starts) sees an $EMO_SERVE_CACHE
under this session's tmp dir, so the synthetic demo checkpoint the API tests serve is written
there, never into ~/.cache where stale weights could outlive a change of the writer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from server.model.synth import demo_checkpoint_dir


def test_the_demo_checkpoint_is_written_under_the_session_tmp(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    cache = Path(os.environ["EMO_SERVE_CACHE"])  # set by tests/conftest.py for the whole session
    assert cache.is_relative_to(tmp_path_factory.getbasetemp())
    written = demo_checkpoint_dir()
    assert written.is_relative_to(cache) and (written / "config.json").is_file()

"""Tests stay inside tmp: every test (and every process a test starts) sees an $EMO_SERVE_CACHE
under this session's tmp dir, so the synthetic demo checkpoint the API tests serve is written
there, never into ~/.cache where stale weights could outlive a change of the writer; and
Hypothesis keeps its storage in a temporary directory, not in the checkout."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from hypothesis.configuration import storage_directory

from server.tools.synth import demo_checkpoint_dir


def test_the_demo_checkpoint_is_written_under_the_session_tmp(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    cache = Path(os.environ["EMO_SERVE_CACHE"])  # set by tests/conftest.py for the whole session
    assert cache.is_relative_to(tmp_path_factory.getbasetemp())
    written = demo_checkpoint_dir()
    assert written.is_relative_to(cache) and (written / "config.json").is_file()


def test_hypothesis_stores_nothing_in_the_checkout() -> None:
    where = storage_directory("examples", intent_to_write=False).path  # its example database
    assert where.is_relative_to(tempfile.gettempdir()), where
    assert not where.is_relative_to(Path(__file__).resolve().parents[1]), where

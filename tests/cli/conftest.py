"""The CLI tests run the commands on the checkpoints the API and engine tests use: the same
fixtures, imported so that pytest finds them here too."""

from __future__ import annotations

from tests.api.conftest import checkpoint
from tests.engine.conftest import loaded, make_engine

__all__ = ["checkpoint", "loaded", "make_engine"]

from __future__ import annotations

from pathlib import Path

import pytest

from server.tools.synth import demo_checkpoint_dir


@pytest.fixture(scope="session")
def checkpoint() -> Path:
    """The tiny synthetic EMO checkpoint (written once, then cached under $EMO_SERVE_CACHE)."""
    return demo_checkpoint_dir()

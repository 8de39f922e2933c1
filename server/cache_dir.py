"""Where emo-serve keeps what it writes for itself: $EMO_SERVE_CACHE, else ~/.cache/emo-serve."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("EMO_SERVE_CACHE") or Path.home() / ".cache" / "emo-serve")

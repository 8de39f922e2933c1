"""The checkpoint `serve` and `generate` run when no --model is given."""

from __future__ import annotations

from pathlib import Path

from server.demo_model import demo_model_dir


def default_model_dir() -> Path:
    """The trained demo when it is shipped, else the synthetic `tiny` preset (written once to the
    cache directory). Only that fallback reaches into server/tools, and only when it is taken."""
    shipped = demo_model_dir()
    if shipped is not None:
        return shipped
    from server.tools.synth import demo_checkpoint_dir

    return demo_checkpoint_dir()

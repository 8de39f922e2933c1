"""The checkpoint `serve` and `generate` run when no --model is given."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from server.demo_model import DEMO_MODEL_NAME, demo_model_dir
from server.runtime.settings import Settings


def default_model_dir() -> Path:
    """The trained demo when it is shipped, else the synthetic `tiny` preset (written once to the
    cache directory). Only that fallback reaches into server/tools, and only when it is taken."""
    shipped = demo_model_dir()
    if shipped is not None:
        return shipped
    from server.tools.synth import demo_checkpoint_dir

    return demo_checkpoint_dir()


def with_default_model(settings: Settings) -> Settings:
    """``settings`` with the default checkpoint filled in when no --model was given; it is
    served as ``emo-demo`` unless --served-model-name says otherwise."""
    if settings.model is not None:
        return settings
    names = settings.served_model_name or (DEMO_MODEL_NAME,)
    return replace(settings, model=default_model_dir(), served_model_name=names)

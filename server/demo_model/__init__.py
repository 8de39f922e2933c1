"""The built-in demo EMO: a small model trained by emo-serve's own recipe, shipped as package data."""

from __future__ import annotations

from pathlib import Path

CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def demo_model_dir() -> Path | None:
    """The shipped demo checkpoint inside the installed package; None when it is not shipped."""
    directory = Path(__file__).resolve().parent / "checkpoint"
    if all((directory / name).is_file() for name in CHECKPOINT_FILES):
        return directory
    return None


DEMO_MODEL_NAME = "emo-demo"


def default_model_dir() -> Path:
    """What `serve` and `generate` run without --model: the trained demo when it is shipped,
    else the synthetic `tiny` preset (written once to the cache directory)."""
    shipped = demo_model_dir()
    if shipped is not None:
        return shipped
    from server.model.synth import demo_checkpoint_dir

    return demo_checkpoint_dir()

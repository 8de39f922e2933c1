"""The built-in demo EMO: a small model trained by emo-serve's own recipe, shipped as package data.

It lives on the serving side (serve and generate run it when no --model is given); the code that
built it (corpus, tokenizer, trainer, evaluation) is server/tools/demo.
"""

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


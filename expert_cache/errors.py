"""The error for a checkpoint that cannot be used, shared by every reader of one.

Its own module, with nothing but the standard library under it, so that ``server.model``
(config.json, tokenizer, trunk weights) and ``expert_cache`` (safetensors headers, expert
reads) raise the same type without the server depending on the safetensors reader for it.
It lives in ``expert_cache`` because that package may not import ``server``.
"""

from __future__ import annotations

from pathlib import Path


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, naming the file and, where known, the tensor or field."""

    def __init__(self, path: Path | str, message: str, tensor: str | None = None) -> None:
        where = f"{path}" + (f", tensor '{tensor}'" if tensor else "")
        super().__init__(f"{where}: {message}")
        self.path, self.tensor, self.message = Path(path), tensor, message

"""Adapters from each family's ``config.json`` to the one ``ModelConfig``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from server.model.config import ModelConfig
from server.model.families import emo, mixtral, olmoe, qwen2_moe, qwen3_moe

FAMILIES: dict[str, Callable[[dict[str, Any]], ModelConfig]] = {
    "emo": emo.parse,
    "olmoe": olmoe.parse,
    "mixtral": mixtral.parse,
    "qwen3_moe": qwen3_moe.parse,
    "qwen2_moe": qwen2_moe.parse,
}

"""EngineConfig: what the engine is told at construction, validated once, here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from server.model.dtypes import resolve_dtype

MAX_MODEL_LEN_CAP = 4096  # default cap on the context (KV slots are max_model_len long)


class ConfigError(ValueError):
    """A setting has a bad value; ``setting`` names the field. The command line maps the field to
    its flag and variable (server/runtime/settings.py), so every layer reports bad values alike."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting, self.message = setting, message


@dataclass(frozen=True)
class EngineConfig:
    """``max_model_len`` None = the model's max_position_embeddings capped at MAX_MODEL_LEN_CAP.
    ``pool_size``: the expert pool of requests that name none; None = the model's default (EMO:
    a quarter of the routable experts; other families: "full"). ``device`` None = the model's
    (given, it must be the model's).
    ``dtype``: KV cache dtype, None = the model's. ``kv_cache_bytes`` None = one KV slot per
    ``max_num_seqs``; given, the number of slots is what fits (at most ``max_num_seqs``).
    ``max_wait_steps``: a request waiting longer than this many engine steps is served first.
    ``prefill_chunk_tokens``: the prefill work one engine step may do, in token rows (a layer's
    attention counts the prompt's length, each expert the tokens it serves; at least one unit
    runs): between two such pieces the running streams decode. ``prefill_share``: while requests
    decode, a piece is also kept to about this fraction of a decode step's time (measured; 0 =
    off), so streams' gaps stay within about (1 + share) x their usual size (engine/pace.py).
    ``loader_threads``: threads that page experts in for admitted requests, off the engine
    thread. ``expert_load_timeout``: a request whose experts are not resident this many seconds
    after its load was started fails (ExpertLoadTimeout) and frees what it holds; the read itself
    cannot be interrupted and releases its pins when it lands. None waits forever.
    ``async_paging`` False brings back the blocking behaviour (a prefill whole in one step, its
    pool read on the engine thread), for benchmarks to compare against."""

    max_num_seqs: int = 16
    max_model_len: int | None = None
    max_queue: int = 256
    pool_size: int | Literal["full"] | None = None
    device: str | None = None
    dtype: str | torch.dtype | None = None
    kv_cache_bytes: int | None = None
    max_wait_steps: int = 64
    prefill_chunk_tokens: int = 2048
    prefill_share: float = 0.5
    loader_threads: int = 2
    expert_load_timeout: float | None = 60.0
    async_paging: bool = True

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_queue", "max_wait_steps", "prefill_chunk_tokens", "loader_threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(name, f"must be an integer >= 1, got {value!r}")
        if not (isinstance(self.prefill_share, int | float) and self.prefill_share >= 0):
            raise ConfigError("prefill_share", f"must be a number >= 0, got {self.prefill_share!r}")
        if self.expert_load_timeout is not None and not (
                isinstance(self.expert_load_timeout, int | float) and self.expert_load_timeout > 0):
            raise ConfigError("expert_load_timeout", f"must be a number > 0 or None, "
                              f"got {self.expert_load_timeout!r}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int)
                                               or self.max_model_len < 2):
            raise ConfigError("max_model_len", f"must be an integer >= 2 or None, got {self.max_model_len!r}")
        pool = self.pool_size
        if not (pool is None or pool == "full" or (isinstance(pool, int) and not isinstance(pool, bool)
                                                   and pool >= 1)):
            raise ConfigError("pool_size", f"must be an integer >= 1, 'full' or None, got {pool!r}")
        if self.kv_cache_bytes is not None and (not isinstance(self.kv_cache_bytes, int)
                                                or self.kv_cache_bytes < 1):
            raise ConfigError("kv_cache_bytes", f"must be a positive integer or None, "
                              f"got {self.kv_cache_bytes!r}")
        if self.dtype is not None:
            try:
                resolve_dtype(self.dtype, torch.device("cpu"))
            except ValueError as exc:
                raise ConfigError("dtype", str(exc).removeprefix("dtype: ")) from None

"""Engine configuration and the device / dtype flag helpers shared by the CLI commands."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from server.model.dtypes import COMPUTE_DTYPES, DTYPE_NAMES

MAX_MODEL_LEN_CAP = 4096  # default cap on the context (KV slots are max_model_len long)


def resolve_device(name: str | None) -> torch.device:
    """'auto' / None -> cuda if available else cpu; otherwise 'cpu', 'cuda', 'cuda:N'."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"device: {name!r} is not a device (use auto, cpu, cuda or cuda:N)") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} asked for but CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device: {name!r} is not supported (use auto, cpu, cuda or cuda:N)")
    return device


def resolve_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """'auto' / None -> bf16 on CUDA, fp32 on CPU; otherwise bf16 / fp16 / fp32 (or a dtype)."""
    if isinstance(name, torch.dtype):
        if name not in COMPUTE_DTYPES.values():
            raise ValueError(f"dtype: {name} is not supported (bf16, fp16, fp32)")
        return name
    if name in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype: {name!r} is not supported (use auto, bf16, fp16 or fp32)")
    return DTYPE_NAMES[name]


@dataclass(frozen=True)
class EngineConfig:
    """``max_model_len`` None = the model's max_position_embeddings capped at MAX_MODEL_LEN_CAP.
    ``default_pool`` None = the model's default (EMO: a quarter of the routable experts; other
    families: "full"). ``device`` None = the model's (given, it must be the model's).
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
    default_pool: int | Literal["full"] | None = None
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
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"EngineConfig.{name}: must be an integer >= 1, got {value!r}")
        if not (isinstance(self.prefill_share, int | float) and self.prefill_share >= 0):
            raise ValueError(f"EngineConfig.prefill_share: must be a number >= 0, "
                             f"got {self.prefill_share!r}")
        if self.expert_load_timeout is not None and not (
                isinstance(self.expert_load_timeout, int | float) and self.expert_load_timeout > 0):
            raise ValueError(f"EngineConfig.expert_load_timeout: must be a number > 0 or None, "
                             f"got {self.expert_load_timeout!r}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int)
                                               or self.max_model_len < 2):
            raise ValueError(f"EngineConfig.max_model_len: must be an integer >= 2 or None, "
                             f"got {self.max_model_len!r}")
        pool = self.default_pool
        if not (pool is None or pool == "full" or (isinstance(pool, int) and not isinstance(pool, bool)
                                                   and pool >= 1)):
            raise ValueError(f"EngineConfig.default_pool: must be an integer >= 1, 'full' or None, "
                             f"got {pool!r}")
        if self.kv_cache_bytes is not None and (not isinstance(self.kv_cache_bytes, int)
                                                or self.kv_cache_bytes < 1):
            raise ValueError(f"EngineConfig.kv_cache_bytes: must be a positive integer or None, "
                             f"got {self.kv_cache_bytes!r}")
        if self.dtype is not None:
            resolve_dtype(self.dtype, torch.device("cpu"))

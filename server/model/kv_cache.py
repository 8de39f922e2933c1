"""Per-layer key/value storage indexed by (slot, position).

A slot holds one sequence; the engine owns the mapping from requests to slots.
Layout per layer: ``kv[layer]`` [num_slots, 2, num_kv_heads, max_len, head_dim], keys then
values of a slot side by side, so a decode step writes both with one scatter and reads both with
one gather; ``k[layer]`` and ``v[layer]`` are views of it [num_slots, num_kv_heads, max_len, head_dim].
"""

from __future__ import annotations

import torch

from server.model.config import ModelConfig


class KVCache:
    def __init__(
        self,
        config: ModelConfig,
        num_slots: int,
        max_len: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        if num_slots <= 0 or max_len <= 0:
            raise ValueError(f"KVCache needs num_slots > 0 and max_len > 0, got {num_slots}, {max_len}")
        self.num_slots, self.max_len, self.dtype = num_slots, max_len, dtype
        self.device = torch.device(device)
        shape = (num_slots, 2, config.num_kv_heads, max_len, config.head_dim)
        self.kv = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(config.num_layers)]
        self.k = [t[:, 0] for t in self.kv]
        self.v = [t[:, 1] for t in self.kv]
        # [num_slots, 2 * num_kv_heads, max_len, head_dim]: keys then values as one head axis
        self.heads = [t.view(num_slots, -1, max_len, config.head_dim) for t in self.kv]

    @staticmethod
    def bytes_per_slot(config: ModelConfig, max_len: int, dtype: torch.dtype) -> int:
        itemsize = dtype.itemsize
        return 2 * config.num_layers * config.num_kv_heads * max_len * config.head_dim * itemsize

    def check_positions(self, last_position: int) -> None:
        if last_position >= self.max_len:
            raise ValueError(f"position {last_position} is past the KV cache length {self.max_len}")

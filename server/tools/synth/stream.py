"""Streaming writer of sharded safetensors files.

Every shard's header is computed from the tensor shapes alone; then tensors are written one
block at a time as they are generated, so peak memory is one block (at most one tensor), never
the model. Files follow the safetensors format: u64 little-endian header length, a JSON header
padded with spaces to a multiple of 8 bytes, then the tensors' bytes in header order.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from expert_cache.safetensors_index import SAFETENSORS_CODES
from server.model.dtypes import COMPUTE_DTYPES
from server.tools.synth.spec import TensorSpec

INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class Shard:
    filename: str
    tensors: tuple[TensorSpec, ...]
    header: bytes  # the file's first bytes: length prefix + padded JSON
    data_bytes: int


def tensor_nbytes(t: TensorSpec, itemsize: int) -> int:
    return itemsize * math.prod(t.shape)


def plan_shards(tensors: list[TensorSpec], dtype: str, shard_bytes: int) -> list[Shard]:
    """Greedy split in tensor order: a shard closes when the next tensor would push its data
    past ``shard_bytes`` (a tensor larger than that gets a shard of its own)."""
    if isinstance(shard_bytes, bool) or not isinstance(shard_bytes, int) or shard_bytes <= 0:
        raise ValueError(f"shard size must be a positive number of bytes, got {shard_bytes!r}")
    torch_dtype = COMPUTE_DTYPES[dtype]
    st_name, itemsize = SAFETENSORS_CODES[torch_dtype], torch_dtype.itemsize
    groups: list[list[TensorSpec]] = [[]]
    size = 0
    for t in tensors:
        n = tensor_nbytes(t, itemsize)
        if groups[-1] and size + n > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += n
    shards = []
    for i, group in enumerate(groups):
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for t in group:
            n = tensor_nbytes(t, itemsize)
            header[t.name] = {"dtype": st_name, "shape": list(t.shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        filename = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        shards.append(Shard(filename, tuple(group), struct.pack("<Q", len(raw)) + raw, offset))
    return shards


def write_shards(
    out_dir: Path,
    shards: list[Shard],
    dtype: str,
    blocks: Callable[[TensorSpec], Iterable[torch.Tensor]],
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Write every shard, pulling each tensor's float32 blocks from ``blocks``; returns the
    total data bytes. ``progress(done_bytes, total_bytes)`` is called after each tensor."""
    torch_dtype = COMPUTE_DTYPES[dtype]
    itemsize = torch_dtype.itemsize
    total = sum(s.data_bytes for s in shards)
    done = 0
    for shard in shards:
        with open(out_dir / shard.filename, "wb") as f:
            f.write(shard.header)
            for t in shard.tensors:
                written = 0
                for block in blocks(t):
                    raw = block.to(torch_dtype).contiguous().reshape(-1).view(torch.uint8)
                    f.write(raw.numpy().data)
                    written += raw.numel()
                if written != tensor_nbytes(t, itemsize):
                    raise RuntimeError(f"tensor {t.name}: generated {written} bytes, header says "
                                       f"{tensor_nbytes(t, itemsize)}")
                done += written
                if progress is not None:
                    progress(done, total)
    return total


def write_index(out_dir: Path, shards: list[Shard]) -> None:
    index = {
        "metadata": {"total_size": sum(s.data_bytes for s in shards)},
        "weight_map": {t.name: s.filename for s in shards for t in s.tensors},
    }
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

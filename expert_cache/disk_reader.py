"""The disk tier: one expert's parts read straight from the safetensors files by offset.

Every file's header is parsed and every chunk of the catalog is checked against it once, at
construction: the tensor exists in that file, the dtypes agree, the byte range lies inside the
tensor's data (so inside the file). Reads then go directly into the destination buffer (a host
tier slot or a staging buffer); only a chunk whose file dtype differs from the catalog's dtype
passes through a scratch byte buffer to be converted.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from expert_cache.base import ExpertCatalog, ExpertKey, TensorChunk
from expert_cache.errors import CheckpointError
from expert_cache.safetensors_index import TensorInfo, read_bytes_into, read_header

RawBuffer = Callable[[int], torch.Tensor]  # nbytes -> a reusable uint8 CPU tensor of >= nbytes


class DiskReader:
    """Validated byte-range reads of the catalog's experts."""

    def __init__(
        self, catalog: ExpertCatalog, before_read: Callable[[ExpertKey], None] | None = None
    ) -> None:
        """``before_read(key)`` runs in the reading thread before each expert is read: a hook
        for tests and benchmarks to slow a read down, gate it on an event, or fail it (what it
        raises propagates as the read's failure)."""
        self.catalog = catalog
        self.before_read = before_read
        headers: dict[Path, dict[str, TensorInfo]] = {}
        self._file_bytes: dict[ExpertKey, int] = {}
        self._converts: set[ExpertKey] = set()
        self.max_convert_chunk_bytes = 0
        for key, parts in catalog.chunks.items():
            total = 0
            for spec in catalog.parts[key[0]]:
                chunks = parts.get(spec.name)
                if not chunks:
                    raise ValueError(f"expert catalog: expert {key} has no chunks for part '{spec.name}'")
                numel = 0
                for chunk in chunks:
                    path = Path(chunk.path)
                    if path not in headers:
                        headers[path] = read_header(path)
                    self._check_chunk(chunk, headers[path])
                    numel += chunk.numel
                    total += chunk.nbytes
                    if chunk.dtype != catalog.dtype:
                        self._converts.add(key)
                        self.max_convert_chunk_bytes = max(self.max_convert_chunk_bytes, chunk.nbytes)
                expected = math.prod(spec.shape)
                if numel != expected:
                    raise CheckpointError(
                        chunks[0].path,
                        f"expert {key} part '{spec.name}' {spec.shape} needs {expected} elements "
                        f"but its chunks hold {numel}",
                        chunks[0].tensor_name,
                    )
            extra = set(parts) - {p.name for p in catalog.parts[key[0]]}
            if extra:
                raise ValueError(f"expert catalog: expert {key} has chunks for unknown parts {sorted(extra)}")
            self._file_bytes[key] = total

    def _check_chunk(self, chunk: TensorChunk, header: dict[str, TensorInfo]) -> None:
        path, name = chunk.path, chunk.tensor_name
        info = header.get(name)
        if info is None:
            raise CheckpointError(path, "tensor is not in this file", name)
        if chunk.dtype != info.dtype:
            raise CheckpointError(
                path,
                f"wrong dtype: the expert catalog expects {chunk.dtype} but the file stores {info.dtype}",
                name,
            )
        if not (chunk.dtype.is_floating_point or chunk.dtype == self.catalog.dtype):
            raise CheckpointError(path, f"cannot convert {chunk.dtype} to {self.catalog.dtype}", name)
        size = chunk.dtype.itemsize
        if chunk.nbytes != chunk.numel * size or chunk.numel < 0:
            raise CheckpointError(
                path, f"chunk of {chunk.numel} x {chunk.dtype} cannot span {chunk.nbytes} bytes", name
            )
        start, end = info.offset, info.offset + info.nbytes
        if not (start <= chunk.offset and chunk.offset + chunk.nbytes <= end):
            raise CheckpointError(
                path,
                f"byte range [{chunk.offset}, {chunk.offset + chunk.nbytes}) lies outside the "
                f"tensor's data [{start}, {end})",
                name,
            )
        if (chunk.offset - start) % size:
            raise CheckpointError(path, f"byte offset {chunk.offset} is not on an element boundary", name)

    def file_bytes(self, key: ExpertKey) -> int:
        """Bytes one read of ``key`` takes from disk (in the file's dtypes)."""
        return self._file_bytes[key]

    def converts(self, key: ExpertKey) -> bool:
        return key in self._converts

    def read_into(self, key: ExpertKey, dest: dict[str, torch.Tensor], raw: RawBuffer) -> int:
        """Fill ``dest[part]`` (contiguous CPU tensors of the part's shape in the catalog dtype)
        with ``key``'s bytes; returns the bytes read from disk."""
        parts = self.catalog.chunks.get(key)
        if parts is None:
            raise KeyError(f"expert {key} is not in the catalog")
        if self.before_read is not None:
            try:
                self.before_read(key)
            except OSError as e:  # reported like a failed read of the expert's first chunk
                first = parts[self.catalog.parts[key[0]][0].name][0]
                raise CheckpointError(first.path, f"read failed: {e.strerror or e}", first.tensor_name) from e
        for spec in self.catalog.parts[key[0]]:
            out = dest[spec.name].reshape(-1)  # a view: dest is contiguous
            out_bytes = out.view(torch.uint8)
            element = 0
            for chunk in parts[spec.name]:
                if chunk.dtype == self.catalog.dtype:
                    start = element * out.element_size()
                    _read(chunk, out_bytes[start : start + chunk.nbytes])
                else:
                    scratch = raw(chunk.nbytes)[: chunk.nbytes]
                    _read(chunk, scratch)
                    out[element : element + chunk.numel].copy_(scratch.view(chunk.dtype))
                element += chunk.numel
        return self._file_bytes[key]


def _read(chunk: TensorChunk, out: torch.Tensor) -> None:
    try:
        read_bytes_into(Path(chunk.path), chunk.offset, out)
    except CheckpointError as e:
        raise CheckpointError(chunk.path, f"read failed: {e.message}", chunk.tensor_name) from e
    except OSError as e:
        raise CheckpointError(chunk.path, f"read failed: {e.strerror or e}", chunk.tensor_name) from e

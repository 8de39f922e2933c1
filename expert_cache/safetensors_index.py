"""Validated, offset-level access to safetensors files.

Headers are parsed once and checked against the file size, dtype and shape, so a later read
by offset cannot run past the end or misinterpret bytes. Reads go straight into the caller's
buffer (``readinto``): no whole-file load, no intermediate copy.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from expert_cache.errors import CheckpointError

# safetensors dtype codes -> torch dtypes; only what model checkpoints use. These codes are the
# file format's own namespace, apart from the names flags and config.json use (server/model/dtypes.py).
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
SAFETENSORS_CODES: dict[torch.dtype, str] = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit


@dataclass(frozen=True)
class TensorInfo:
    name: str
    path: Path
    offset: int  # absolute byte offset in the file
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate one safetensors file's header."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(path, f"truncated file: {size} bytes, no safetensors header")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
                raise CheckpointError(
                    path, f"corrupt header: it claims {header_len} bytes but the file has {size}"
                )
            raw = f.read(header_len)
    except OSError as e:
        raise CheckpointError(path, f"cannot read: {e.strerror or e}") from e
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(path, f"corrupt header: not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(path, "corrupt header: not a JSON object")
    data_start = 8 + header_len
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        infos[name] = _parse_entry(path, name, entry, data_start, size)
    return infos


def _parse_entry(path: Path, name: str, entry: object, data_start: int, size: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise CheckpointError(path, "corrupt header entry", name)
    dtype_name, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype_name not in SAFETENSORS_DTYPES:
        raise CheckpointError(path, f"unsupported dtype {dtype_name!r}", name)
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise CheckpointError(path, f"bad shape {shape!r}", name)
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise CheckpointError(path, f"bad data_offsets {offsets!r}", name)
    dtype = SAFETENSORS_DTYPES[dtype_name]
    numel = math.prod(shape)
    nbytes = offsets[1] - offsets[0]
    if nbytes != numel * dtype.itemsize:
        raise CheckpointError(
            path,
            f"data_offsets span {nbytes} bytes but {dtype_name}{shape} needs "
            f"{numel * dtype.itemsize}",
            name,
        )
    if data_start + offsets[1] > size:
        raise CheckpointError(
            path,
            f"data runs past the end of the file (ends at byte {data_start + offsets[1]}, "
            f"file has {size}): truncated or corrupt",
            name,
        )
    return TensorInfo(name, path, data_start + offsets[0], nbytes, dtype, tuple(shape))


class SafetensorsIndex:
    """All tensors of a (possibly sharded) checkpoint, by name."""

    def __init__(self, tensors: dict[str, TensorInfo]) -> None:
        self._tensors = tensors

    @classmethod
    def from_files(cls, paths: Iterable[Path]) -> SafetensorsIndex:
        tensors: dict[str, TensorInfo] = {}
        for path in paths:
            for name, info in read_header(Path(path)).items():
                if name in tensors:
                    raise CheckpointError(path, f"duplicate tensor, also in {tensors[name].path}", name)
                tensors[name] = info
        return cls(tensors)

    @classmethod
    def from_directory(cls, directory: Path) -> SafetensorsIndex:
        """Open ``model.safetensors.index.json`` when present, else every ``*.safetensors``."""
        directory = Path(directory)
        index_path = directory / "model.safetensors.index.json"
        if index_path.exists():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
                files = sorted({directory / f for f in weight_map.values()})
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(index_path, f"unreadable index ({e})") from e
            for f in files:
                if not f.exists():
                    raise CheckpointError(f, "listed in model.safetensors.index.json but missing")
            index = cls.from_files(files)
            for name, fname in weight_map.items():
                info = index._tensors.get(name)
                if info is None or info.path != directory / fname:
                    raise CheckpointError(directory / fname, "listed in the index but not in this file", name)
            return index
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise CheckpointError(directory, "no *.safetensors files")
        return cls.from_files(files)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._tensors[name]
        except KeyError:
            raise KeyError(f"tensor '{name}' is not in the checkpoint") from None

    def read(self, name: str) -> torch.Tensor:
        """The tensor as stored (file dtype and shape), in fresh CPU memory."""
        info = self.info(name)
        out = torch.empty(info.nbytes, dtype=torch.uint8)
        read_bytes_into(info.path, info.offset, out)
        return out.view(info.dtype).reshape(info.shape)


def read_bytes_into(path: Path, offset: int, out: torch.Tensor) -> None:
    """Fill the contiguous CPU byte tensor ``out`` from ``path`` at ``offset``."""
    assert out.dtype == torch.uint8 and out.is_contiguous() and out.device.type == "cpu"
    view = out.numpy().data.cast("B")
    fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise CheckpointError(path, f"unexpected end of file at byte {offset + done}")
            done += n
    finally:
        os.close(fd)

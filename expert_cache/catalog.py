"""An ExpertCatalog from per-expert tensor names, for checkpoints in the common layout

    model.layers.{l}.mlp.experts.{e}.gate_proj.weight  [I, H]
    model.layers.{l}.mlp.experts.{e}.up_proj.weight    [I, H]
    model.layers.{l}.mlp.experts.{e}.down_proj.weight  [H, I]

-> parts ``gate_up`` (2I, H) = [gate_proj; up_proj] and ``down`` (H, I).

It knows nothing of a model's config: which experts are routable (not shared, not always
active) is the model loader's business, passed in as ``include``. Benchmarks and tools that
only need "the experts of this checkpoint" use it as is.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from expert_cache.base import ExpertCatalog, ExpertKey, PartSpec, TensorChunk
from expert_cache.errors import CheckpointError
from expert_cache.safetensors_index import SafetensorsIndex, TensorInfo

EXPERT_TENSOR = re.compile(
    r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$"
)
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def chunk_of(info: TensorInfo) -> TensorChunk:
    """The whole tensor as one chunk."""
    return TensorChunk(info.path, info.name, info.offset, info.nbytes, info.dtype, info.numel)


def per_expert_catalog(
    index: SafetensorsIndex,
    *,
    dtype: torch.dtype | None = None,
    include: Callable[[ExpertKey], bool] | None = None,
) -> ExpertCatalog:
    """Every expert of ``index`` in the per-expert layout (filtered by ``include``).
    ``dtype`` is the slab dtype; None keeps the file's."""
    found: dict[ExpertKey, dict[str, TensorInfo]] = {}
    for name in index:
        m = EXPERT_TENSOR.match(name)
        if m is None:
            continue
        key = (int(m.group(1)), int(m.group(2)))
        if include is None or include(key):
            found.setdefault(key, {})[m.group(3)] = index.info(name)
    if not found:
        raise ValueError("no tensors named model.layers.{l}.mlp.experts.{e}.{gate,up,down}_proj.weight")
    parts: dict[int, tuple[PartSpec, ...]] = {}
    chunks: dict[ExpertKey, dict[str, tuple[TensorChunk, ...]]] = {}
    file_dtype: torch.dtype | None = None
    for key in sorted(found):
        projections = found[key]
        missing = [p for p in PROJECTIONS if p not in projections]
        if missing:
            raise ValueError(f"expert {key}: missing {', '.join(missing)}")
        gate, up, down = (projections[p] for p in PROJECTIONS)
        if len(gate.shape) != 2 or gate.shape != up.shape or down.shape != gate.shape[::-1]:
            raise CheckpointError(
                down.path,
                f"expert {key}: gate {gate.shape}, up {up.shape}, down {down.shape} "
                "do not fit [I, H], [I, H], [H, I]",
                down.name,
            )
        inter, hidden = gate.shape
        spec = (PartSpec("gate_up", (2 * inter, hidden)), PartSpec("down", (hidden, inter)))
        if parts.setdefault(key[0], spec) != spec:
            raise CheckpointError(
                down.path, f"expert {key} has other shapes than layer {key[0]}'s first", down.name
            )
        chunks[key] = {"gate_up": (chunk_of(gate), chunk_of(up)), "down": (chunk_of(down),)}
        file_dtype = file_dtype or gate.dtype
    assert file_dtype is not None
    return ExpertCatalog(parts=parts, chunks=chunks, dtype=dtype or file_dtype)

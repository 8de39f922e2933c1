"""A device tier as the benchmarks size it: a share of each layer's routable experts.

The catalog comes from the checkpoint's headers alone (no weight is read), so a benchmark can
size its expert cache before it opens the engine with those budgets.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from expert_cache.base import ExpertCatalog
from expert_cache.host_tier import host_bytes_for
from expert_cache.safetensors_index import SafetensorsIndex
from server.model.config import load_config
from server.model.weights import build_catalog


def header_catalog(model_dir: Path, dtype: torch.dtype) -> ExpertCatalog:
    return build_catalog(load_config(model_dir), SafetensorsIndex.from_directory(model_dir), dtype)


def experts_per_layer(catalog: ExpertCatalog) -> dict[int, int]:
    counts: dict[int, int] = {}
    for layer, _ in catalog.chunks:
        counts[layer] = counts.get(layer, 0) + 1
    return counts


def tier_budget(catalog: ExpertCatalog, tier: float) -> tuple[int, int]:
    """(slots, bytes) of a tier: ceil(tier * |R_l|) experts per MoE layer."""
    slots = {layer: math.ceil(tier * n - 1e-9) for layer, n in experts_per_layer(catalog).items()}
    return sum(slots.values()), sum(n * catalog.expert_bytes(layer) for layer, n in slots.items())


def whole_host_budget(catalog: ExpertCatalog, pinned: bool) -> int:
    """A host tier that holds every expert (arena rounding included)."""
    return sum(host_bytes_for(catalog.expert_bytes(layer), n, pinned)
               for layer, n in experts_per_layer(catalog).items())

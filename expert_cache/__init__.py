"""Expert paging for MoE inference: disk (safetensors) -> host RAM -> fixed device slots.

Two ``ExpertStore``s: ``TieredExpertCache`` pages experts through a bounded device cache;
``ResidentExpertStore`` loads every expert onto the device once. Knows experts only as keys
``(layer, expert)`` and byte sizes; never imports ``server``.
"""

from expert_cache.base import (
    CacheStats,
    ExpertCatalog,
    ExpertKey,
    ExpertLoadTimeout,
    ExpertStore,
    LayerResidency,
    PartSpec,
    ResidencySnapshot,
    SlotsExhausted,
    TensorChunk,
    TierStats,
)
from expert_cache.cache import TieredExpertCache
from expert_cache.catalog import per_expert_catalog
from expert_cache.errors import CheckpointError
from expert_cache.memory import (
    default_device_budget_bytes,
    default_host_budget_bytes,
    format_bytes,
    parse_bytes,
)
from expert_cache.resident import ResidentExpertStore
from expert_cache.safetensors_index import SafetensorsIndex

__all__ = [
    "CacheStats",
    "CheckpointError",
    "ExpertCatalog",
    "ExpertKey",
    "ExpertStore",
    "LayerResidency",
    "PartSpec",
    "ResidencySnapshot",
    "ResidentExpertStore",
    "SafetensorsIndex",
    "ExpertLoadTimeout",
    "SlotsExhausted",
    "TensorChunk",
    "TierStats",
    "TieredExpertCache",
    "default_device_budget_bytes",
    "default_host_budget_bytes",
    "format_bytes",
    "parse_bytes",
    "per_expert_catalog",
]

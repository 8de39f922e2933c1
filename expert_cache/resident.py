"""An ExpertStore that holds every routable expert on the device (slot = fixed index).

For tests and for fully-resident serving: loads everything once, never evicts, and keeps the
ExpertStore bookkeeping (pins, free slots, stats) honest so the model runs the same code as
with a tiered cache.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Sequence

import torch

from expert_cache.base import (
    CacheStats,
    ExpertCatalog,
    ExpertKey,
    ExpertStore,
    LayerResidency,
    PartSpec,
    ResidencySnapshot,
    TensorChunk,
    TierStats,
    ids_by_layer,
)
from expert_cache.errors import CheckpointError
from expert_cache.safetensors_index import read_bytes_into


def load_part(chunks: Sequence[TensorChunk], part: PartSpec, dtype: torch.dtype) -> torch.Tensor:
    """Read the chunks of one expert part from disk into a CPU tensor of ``part.shape``."""
    pieces = []
    for c in chunks:
        raw = torch.empty(c.nbytes, dtype=torch.uint8)
        read_bytes_into(c.path, c.offset, raw)
        pieces.append(raw.view(c.dtype).to(dtype))
    flat = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
    expected = math.prod(part.shape)
    if flat.numel() != expected:
        raise CheckpointError(chunks[0].path, f"expert part {part.name} has {flat.numel()} elements, "
                              f"expected {expected} for shape {part.shape}", chunks[0].tensor_name)
    return flat.view(part.shape)


class ResidentExpertStore(ExpertStore):
    """Every expert in its own slot from construction on. It starts no thread and registers no
    metrics, so it keeps the contract's ``close()``: a no-op, safe to call any number of times."""

    def __init__(self, catalog: ExpertCatalog, device: torch.device | str) -> None:
        self.lock = threading.RLock()
        self.catalog, self.device = catalog, torch.device(device)
        # layers with identical part lists share one slab; each key gets its own slot in it
        self._group_of: dict[int, tuple[PartSpec, ...]] = dict(catalog.parts)
        self._slot: dict[ExpertKey, int] = {}
        counts: Counter[tuple[PartSpec, ...]] = Counter()
        for key in catalog.keys():  # noqa: SIM118 (ExpertCatalog.keys() is sorted, not a dict)
            group = self._group_of[key[0]]
            self._slot[key] = counts[group]
            counts[group] += 1
        self._slabs = {
            group: {p.name: torch.empty((n, *p.shape), dtype=catalog.dtype, device=self.device)
                    for p in group}
            for group, n in counts.items()
        }
        self._pins: Counter[ExpertKey] = Counter()
        self._pinned_per_group: Counter[tuple[PartSpec, ...]] = Counter()
        self._hits = 0
        for key in catalog.keys():  # noqa: SIM118
            group = self._group_of[key[0]]
            for part in group:
                weights = load_part(catalog.chunks[key][part.name], part, catalog.dtype)
                self._slabs[group][part.name][self._slot[key]].copy_(weights)

    def _group(self, layer: int) -> tuple[PartSpec, ...]:
        try:
            return self._group_of[layer]
        except KeyError:
            raise KeyError(f"layer {layer} has no routable experts in the catalog") from None

    def slab(self, layer: int) -> dict[str, torch.Tensor]:
        return self._slabs[self._group(layer)]

    def acquire(self, keys: Sequence[ExpertKey]) -> torch.Tensor:
        return torch.tensor(self.acquire_slots(keys), dtype=torch.int64, device=self.device)

    def acquire_slots(self, keys: Sequence[ExpertKey]) -> list[int]:
        with self.lock:
            groups = {self._group(layer) for layer, _ in keys}
            if len(groups) > 1:
                raise ValueError("acquire: all keys of one call must belong to one slab")
            missing = [k for k in keys if k not in self._slot]
            if missing:
                raise KeyError(f"experts {missing} are not in the catalog")
            for key in keys:
                if self._pins[key] == 0:
                    self._pinned_per_group[self._group_of[key[0]]] += 1
                self._pins[key] += 1
            self._hits += len(keys)
            return [self._slot[k] for k in keys]

    def slots_of(self, keys: Sequence[ExpertKey]) -> list[int]:
        """The slots of ``keys``: fixed at load (nothing moves here), so no pin is needed."""
        return [self._slot[k] for k in keys]

    def release(self, keys: Sequence[ExpertKey]) -> None:
        with self.lock:
            need = Counter(keys)
            for key, n in need.items():
                if self._pins[key] < n:
                    raise RuntimeError(f"release of {key} that is not pinned {n} time(s)")
            for key, n in need.items():
                self._pins[key] -= n
                if self._pins[key] == 0:
                    del self._pins[key]
                    self._pinned_per_group[self._group_of[key[0]]] -= 1

    def prefetch(self, keys: Sequence[ExpertKey]) -> None:
        """Everything is resident already: nothing to do."""

    def capacity(self, layer: int) -> int:
        return next(iter(self.slab(layer).values())).shape[0]

    def free_slots(self, layer: int) -> int:
        with self.lock:
            return self.capacity(layer) - self._pinned_per_group[self._group(layer)]

    def is_resident(self, key: ExpertKey) -> bool:
        return key in self._slot

    def pin_count(self, key: ExpertKey) -> int:
        with self.lock:
            return self._pins[key]

    def stats(self) -> CacheStats:
        with self.lock:
            total = sum(t.numel() * t.element_size() for s in self._slabs.values() for t in s.values())
            slots = len(self._slot)
            return CacheStats(
                device=TierStats(hits=self._hits, resident=slots, resident_bytes=total, capacity_bytes=total),
                pinned_slots=len(self._pins),
                capacity_slots=slots,
            )

    def snapshot(self) -> ResidencySnapshot:
        slab_index = {group: i for i, group in enumerate(self._slabs)}
        with self.lock:
            stats = self.stats()
            pinned = ids_by_layer(self._pins)
        layers = tuple(
            LayerResidency(layer=layer, slab=slab_index[self._group_of[layer]], experts=experts,
                           device_capacity=self.capacity(layer), host_capacity=0, resident=experts,
                           pinned=pinned.get(layer, ()), loading=(), host_resident=())
            for layer, experts in ids_by_layer(self._slot).items()
        )
        return ResidencySnapshot(layers, stats)

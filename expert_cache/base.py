"""The contract between the model and the expert cache.

The cache knows experts only as keys ``(layer, expert)`` made of named parts (byte ranges in
safetensors files, typed tensors on the device). It never imports ``server`` and knows nothing
about requests: pinning is reference-counted, and whoever pins a key releases it.
"""

from __future__ import annotations

import math
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from expert_cache.tally import Traffic

ExpertKey = tuple[int, int]  # (layer, expert id within the layer)


class SlotsExhausted(RuntimeError):
    """More distinct experts must be pinned at once than the device tier has free slots.

    Raised by ``acquire`` before anything is pinned or loaded, so the caller can back off
    (finish or preempt other work) and retry: no deadlock, no partial state.
    """

    def __init__(self, layer: int, needed: int, free: int, capacity: int) -> None:
        super().__init__(
            f"layer {layer}: {needed} experts must be pinned at once but only {free} of "
            f"{capacity} device slots are free"
        )
        self.layer, self.needed, self.free, self.capacity = layer, needed, free, capacity


class ExpertLoadTimeout(TimeoutError):
    """A wait for an expert that another thread is loading outlasted the store's timeout (a
    read hanging on a stalled disk or network filesystem). Raised by ``acquire`` after undoing
    its pins: the caller fails the work that needed the expert and goes on."""

    def __init__(self, key: ExpertKey, seconds: float) -> None:
        super().__init__(
            f"expert {key} was not loaded within {seconds:g} s: the read filling it has not "
            f"finished (stalled disk or network filesystem?)"
        )
        self.key, self.seconds = key, seconds


@dataclass(frozen=True)
class TensorChunk:
    """Where some bytes of one expert part live on disk: ``nbytes`` at ``offset`` of ``path``,
    holding ``numel`` elements of ``dtype`` (the file's dtype; the cache converts to the slab's)."""

    path: Path
    tensor_name: str
    offset: int
    nbytes: int
    dtype: torch.dtype
    numel: int


@dataclass(frozen=True)
class PartSpec:
    """One named tensor of an expert, e.g. ``gate_up`` [2I, H] or ``down`` [H, I]."""

    name: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ExpertCatalog:
    """Everything the cache must know about a checkpoint's pageable experts.

    ``parts[layer]`` lists the parts of every expert of that layer (all experts of a layer have
    the same shapes); layers with equal part lists share one slab of slots. ``chunks[key][part]``
    lists the byte ranges that, concatenated in order, fill that part of the expert.
    """

    parts: dict[int, tuple[PartSpec, ...]]
    chunks: dict[ExpertKey, dict[str, tuple[TensorChunk, ...]]]
    dtype: torch.dtype  # dtype of the slabs the model computes on

    def expert_bytes(self, layer: int) -> int:
        return sum(self.dtype.itemsize * math.prod(p.shape) for p in self.parts[layer])

    def keys(self) -> list[ExpertKey]:
        return sorted(self.chunks)


@dataclass
class TierStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    resident: int = 0
    resident_bytes: int = 0
    capacity_bytes: int = 0


@dataclass
class CacheStats:
    device: TierStats = field(default_factory=TierStats)
    host: TierStats = field(default_factory=TierStats)
    bytes_loaded_from_host: int = 0
    bytes_loaded_from_disk: int = 0
    pinned_slots: int = 0
    capacity_slots: int = 0


@dataclass(frozen=True)
class LayerResidency:
    """Where one layer's pageable experts are at one moment; every id list is sorted.

    Capacities are those of the slab serving the layer: layers whose experts have the same
    shapes share one slab per tier, so ``slab`` names it and its slots are shared.
    """

    layer: int
    slab: int
    experts: tuple[int, ...]  # every pageable expert id of the layer
    device_capacity: int
    host_capacity: int
    resident: tuple[int, ...]  # in a device slot and ready to compute with
    pinned: tuple[int, ...]  # held by a running request (ready or still loading)
    loading: tuple[int, ...]  # being copied into a device slot
    host_resident: tuple[int, ...]  # in a host-tier buffer


@dataclass(frozen=True)
class ResidencySnapshot:
    """Every layer's residency and the counters, taken together under the store's lock."""

    layers: tuple[LayerResidency, ...]
    stats: CacheStats


def ids_by_layer(keys: Iterable[ExpertKey]) -> dict[int, tuple[int, ...]]:
    """``{layer: sorted expert ids}`` of ``keys``, layers in order."""
    by_layer: dict[int, list[int]] = {}
    for layer, expert in keys:
        by_layer.setdefault(layer, []).append(expert)
    return {layer: tuple(sorted(by_layer[layer])) for layer in sorted(by_layer)}


class ExpertStore(ABC):
    """Gives the model device tensors of experts it asks for, by slot.

    Contract:
    - ``slab(layer)[part]`` is a device tensor ``[num_slots, *part.shape]`` in the catalog's dtype;
      it never moves or changes shape, so the model may keep references to it.
    - ``acquire(keys)`` pins every key (a reference count per key), loads the ones not resident,
      and returns their slot ids in the order given. Duplicate keys are allowed. On return every
      returned slot holds its expert, or the copies filling it are ordered before any later work
      on the compute stream (no read before a copy completes). A pinned slot is never evicted or
      overwritten. All keys of one call must be of one slab (one layer shape).
    - ``acquire`` raises ``SlotsExhausted`` and pins nothing when the keys cannot all be pinned,
      and ``ExpertLoadTimeout``, with its pins undone, when a load it waits on hangs.
      ``acquire_slots`` is ``acquire`` answering host ints (no device round trip).
    - ``release(keys)`` drops one pin per key given (the same multiset that was acquired).
    - ``prefetch(keys)`` is best effort: it loads what fits into free unpinned slots, never
      evicts a pinned slot, may do nothing, and never raises for lack of room.
    - Device bytes of slabs never exceed the configured budget. Methods are thread-safe.
    - Observation never changes state: ``stats()`` and ``snapshot()`` are consistent pictures of
      one moment; ``thread_traffic()`` is the calling thread's own hits, misses and bytes (so
      a caller can charge a request exactly the traffic it caused while loader threads run);
      ``tier_of(key)`` says where a load of ``key`` would come from now.
    - ``close()`` ends the store's life: it stops its background work (a loader thread) and
      takes its metrics off their registry. Call it when nothing will ask the store for experts
      any more (after the engine has stopped); no other method may be called after it. It may be
      called more than once (a ``with`` block and a shutdown path may both close): calls after
      the first do nothing. Slab tensors already handed out stay readable. The default does
      nothing, which suits stores that start no threads and register no metrics
      (``ResidentExpertStore``).
    """

    lock: threading.RLock

    @abstractmethod
    def slab(self, layer: int) -> dict[str, torch.Tensor]: ...

    @abstractmethod
    def acquire(self, keys: Sequence[ExpertKey]) -> torch.Tensor:
        """Pin ``keys``; return int64 slot ids ``[len(keys)]`` on the slab's device."""

    def acquire_slots(self, keys: Sequence[ExpertKey]) -> list[int]:
        """``acquire`` with the slot ids as a host list, for callers that index the slab from
        Python: no host->device->host round trip (on CUDA a sync of the compute stream).
        Stores that know their slots on the host override this."""
        return self.acquire(keys).tolist()

    @abstractmethod
    def release(self, keys: Sequence[ExpertKey]) -> None: ...

    @abstractmethod
    def prefetch(self, keys: Sequence[ExpertKey]) -> None: ...

    @abstractmethod
    def capacity(self, layer: int) -> int:
        """Number of slots in the slab that serves ``layer``."""

    @abstractmethod
    def free_slots(self, layer: int) -> int:
        """Slots of ``layer``'s slab not pinned now: how many more distinct keys fit a pin."""

    @abstractmethod
    def is_resident(self, key: ExpertKey) -> bool: ...

    @abstractmethod
    def stats(self) -> CacheStats: ...

    @abstractmethod
    def snapshot(self) -> ResidencySnapshot:
        """Which experts are where now, layer by layer, with ``stats()`` of the same moment."""

    def thread_traffic(self) -> Traffic:
        """Device hits and misses of the calling thread's acquires, and the bytes its loads
        moved, since the store was made (see tally.py). Stores that never load anything and
        are used from one thread may answer from their global counters."""
        s = self.stats()
        return Traffic(s.device.hits, s.device.misses, s.bytes_loaded_from_host + s.bytes_loaded_from_disk)

    def tier_of(self, key: ExpertKey) -> str:
        """Where ``key`` would come from now: "device" (resident), "host" or "disk". Stores
        without a host tier answer "device" or "disk"."""
        return "device" if self.is_resident(key) else "disk"

    def close(self) -> None:  # noqa: B027 (a deliberate no-op default: see the contract)
        """Stop background work and unregister metrics; idempotent (see the contract). Default:
        nothing."""

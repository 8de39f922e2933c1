"""TieredExpertCache: experts paged disk -> host RAM -> device slots on demand.

The pieces: ``disk_reader`` (validated offset reads), ``host_tier`` (RAM buffers, own LRU),
``device_tier`` (slabs, streams, events), ``policy`` (slot tables), ``loading`` (one expert into
one slot), ``residency`` (pins, slot states, the fill protocol), ``metrics``, ``prefetcher``.

Counting (what ``stats()`` and the metrics report):
- device hit / miss: once per distinct key of each ``acquire`` call (a key still being filled by
  a prefetch is a hit); ``prefetch`` counts neither;
- host hit / miss: once per expert moved into a device slot (by acquire or prefetch);
- evictions: resident experts displaced to make room, per tier.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import torch
from prometheus_client import CollectorRegistry

from expert_cache.base import (
    CacheStats,
    ExpertCatalog,
    ExpertKey,
    ExpertStore,
    LayerResidency,
    ResidencySnapshot,
    TierStats,
    ids_by_layer,
)
from expert_cache.device_tier import DeviceTier, SlotState
from expert_cache.disk_reader import DiskReader
from expert_cache.host_tier import HostTier, StagingBuffers
from expert_cache.layout import slab_groups
from expert_cache.loading import ExpertLoader
from expert_cache.metrics import CacheMetrics
from expert_cache.prefetcher import Prefetcher
from expert_cache.residency import Residency
from expert_cache.tally import ThreadTally, Traffic

DEFAULT_LOAD_TIMEOUT_S = 60.0  # one expert is MBs: a healthy disk delivers it in well under a second


class TieredExpertCache(ExpertStore):
    """An ExpertStore over a byte-budgeted device slab, a host-RAM tier and the checkpoint files.

    ``host_budget_bytes=0`` disables the host tier (disk reads then go through a staging
    buffer). With ``background_prefetch`` (the default) ``prefetch`` hands its keys to a loader
    thread and returns at once; otherwise it loads in the calling thread. ``load_timeout_s``
    bounds how long ``acquire`` waits for a load another thread runs (ExpertLoadTimeout); None
    waits forever. ``before_disk_read(key)`` runs in the reading thread before each disk read
    (see ``DiskReader``): tests and benchmarks use it to make reads slow, gated or failing.
    """

    def __init__(
        self,
        catalog: ExpertCatalog,
        *,
        device: torch.device | str,
        device_budget_bytes: int,
        host_budget_bytes: int,
        registry: CollectorRegistry | None = None,
        background_prefetch: bool = True,
        load_timeout_s: float | None = DEFAULT_LOAD_TIMEOUT_S,
        before_disk_read: Callable[[ExpertKey], None] | None = None,
    ) -> None:
        if load_timeout_s is not None and not load_timeout_s > 0:
            raise ValueError(f"load_timeout_s must be > 0 or None, got {load_timeout_s!r}")
        for name, value in (
            ("device_budget_bytes", device_budget_bytes),
            ("host_budget_bytes", host_budget_bytes),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        self.catalog = catalog
        self.device = torch.device(device)
        self.groups, self._layer_group = slab_groups(catalog)
        self.lock = threading.RLock()
        self._cond = threading.Condition(self.lock)
        disk = DiskReader(catalog, before_disk_read)  # validates every chunk before any memory is taken
        pinned = self.device.type == "cuda"
        self._device = DeviceTier(self.groups, self.device, device_budget_bytes)
        self._host = HostTier(self.groups, host_budget_bytes, pinned)
        self._metrics = CacheMetrics(registry, self.stats, self._capacity_experts)
        self._tally = ThreadTally()
        self.registry = self._metrics.registry
        self._loader = ExpertLoader(
            self.groups,
            self.lock,
            disk,
            self._host,
            StagingBuffers(self.groups, pinned),
            self._device,
            self._metrics,
            self._tally,
        )
        self._residency = Residency(self._device, self._loader, self._cond, self._tally, load_timeout_s)
        self._prefetcher = Prefetcher(self._prefetch_now) if background_prefetch else None
        self._closed = False

    # -- ExpertStore -------------------------------------------------------------------------
    def slab(self, layer: int) -> dict[str, torch.Tensor]:
        return dict(self._device.slabs[self._group_of_layer(layer)])

    def capacity(self, layer: int) -> int:
        return self._device.capacities[self._group_of_layer(layer)]

    def free_slots(self, layer: int) -> int:
        with self.lock:
            return self._device.tables[self._group_of_layer(layer)].unpinned_slots

    def is_resident(self, key: ExpertKey) -> bool:
        if key not in self.catalog.chunks:
            return False
        group = self._layer_group[key[0]]
        with self.lock:
            slot = self._device.tables[group].slot(key)
            return slot is not None and self._device.states[group][slot] is SlotState.READY

    def tier_of(self, key: ExpertKey) -> str:
        group = self._layer_group.get(key[0])
        if group is None or key not in self.catalog.chunks:
            return "disk"
        with self.lock:
            slot = self._device.tables[group].slot(key)
            if slot is not None and self._device.states[group][slot] is SlotState.READY:
                return "device"
            return "host" if key in self._host.tables[group] else "disk"

    def acquire(self, keys: Sequence[ExpertKey]) -> torch.Tensor:
        keys = list(keys)
        if not keys:
            return self._device.slot_ids([])
        return self._device.slot_ids(self._residency.acquire(self._group_of_keys(keys), keys))

    def acquire_slots(self, keys: Sequence[ExpertKey]) -> list[int]:
        keys = list(keys)
        return self._residency.acquire(self._group_of_keys(keys), keys) if keys else []

    def release(self, keys: Sequence[ExpertKey]) -> None:
        keys = list(keys)
        if keys:
            self._residency.release(self._group_of_keys(keys), keys)

    def prefetch(self, keys: Sequence[ExpertKey]) -> None:
        keys = [k for k in dict.fromkeys(keys) if k in self.catalog.chunks]
        if not keys:
            return
        if self._prefetcher is not None:
            self._prefetcher.submit(keys)
        else:
            self._prefetch_now(keys)

    def thread_traffic(self) -> Traffic:
        return self._tally.read()

    def stats(self) -> CacheStats:
        with self.lock:
            self._loader.observe_finished_copies()
            d, tables = self._residency.counts, self._device.tables
            resident_bytes = sum(len(t) * g.expert_bytes for t, g in zip(tables, self.groups, strict=True))
            device = TierStats(
                d.hits,
                d.misses,
                d.evictions,
                sum(len(t) for t in tables),
                resident_bytes,
                self._device.capacity_bytes,
            )
            c = self._loader.counters
            return CacheStats(
                device=device,
                host=self._loader.host_stats(),
                bytes_loaded_from_host=c.bytes_from_host,
                bytes_loaded_from_disk=c.bytes_from_disk,
                pinned_slots=sum(t.pinned for t in tables),
                capacity_slots=sum(self._device.capacities),
            )

    def snapshot(self) -> ResidencySnapshot:
        ready: list[ExpertKey] = []
        pinned: list[ExpertKey] = []
        loading: list[ExpertKey] = []
        on_host: list[ExpertKey] = []
        with self.lock:
            stats = self.stats()
            for table, states, host in zip(self._device.tables, self._device.states, self._host.tables,
                                           strict=True):
                for key in table.resident_keys():
                    # FILLING is a copy under way; STALE a failed one that its next waiter redoes
                    (ready if states[table.slot_of(key)] is SlotState.READY else loading).append(key)
                    if table.pins(key):
                        pinned.append(key)
                on_host.extend(host.resident_keys())
        ids = {name: ids_by_layer(keys) for name, keys in
               (("resident", ready), ("pinned", pinned), ("loading", loading), ("host", on_host))}
        layers = []
        for layer, experts in ids_by_layer(self.catalog.chunks).items():
            group = self._layer_group[layer]
            layers.append(LayerResidency(
                layer=layer, slab=group, experts=experts,
                device_capacity=self._device.capacities[group], host_capacity=self._host.capacity(group),
                resident=ids["resident"].get(layer, ()), pinned=ids["pinned"].get(layer, ()),
                loading=ids["loading"].get(layer, ()), host_resident=ids["host"].get(layer, ()),
            ))
        return ResidencySnapshot(tuple(layers), stats)

    # -- extras --------------------------------------------------------------------------------
    def host_capacity(self, layer: int) -> int:
        """Experts of ``layer``'s slab group the host tier can hold."""
        return self._host.capacity(self._group_of_layer(layer))

    def allocate_host_tier(self) -> None:
        """Allocate and pin the whole host tier now. By default host memory is taken on first
        use, arena by arena (up to 1 GiB each); a server calls this at start-up so that no
        request pays for pinning memory."""
        self._host.allocate_all()

    def wait_for_prefetch(self, timeout: float | None = None) -> bool:
        """Block until queued prefetches have run; False on timeout."""
        return True if self._prefetcher is None else self._prefetcher.wait_idle(timeout)

    def lru_order(self, layer: int) -> list[ExpertKey]:
        """Resident unpinned experts of ``layer``'s slab, the next to be evicted first."""
        with self.lock:
            return self._device.tables[self._group_of_layer(layer)].lru_order()

    def close(self) -> None:
        """Stop the loader thread and take the metrics off the registry; later calls do nothing."""
        with self.lock:  # the flag only: joining the loader under the lock could deadlock with it
            if self._closed:
                return
            self._closed = True
        if self._prefetcher is not None:
            self._prefetcher.close()
        self._metrics.unregister()

    def __enter__(self) -> TieredExpertCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------------
    def _prefetch_now(self, keys: list[ExpertKey]) -> None:
        # Buffers may have been allocated lazily by a caller running under inference_mode, and
        # such tensors can only be written inside it; writing normal tensors there is fine too.
        with torch.inference_mode():
            self._prefetch_groups(keys)

    def _prefetch_groups(self, keys: list[ExpertKey]) -> None:
        by_group: dict[int, list[ExpertKey]] = {}
        for key in keys:
            by_group.setdefault(self._layer_group[key[0]], []).append(key)
        for group, group_keys in by_group.items():
            self._residency.prefetch(group, group_keys)

    def _capacity_experts(self) -> dict[str, int]:
        return {
            "device": sum(self._device.capacities),
            "host": sum(self._host.capacity(g.index) for g in self.groups),
        }

    def _group_of_layer(self, layer: int) -> int:
        try:
            return self._layer_group[layer]
        except KeyError:
            raise KeyError(f"layer {layer} has no pageable experts in the catalog") from None

    def _group_of(self, key: ExpertKey) -> int:
        if key not in self.catalog.chunks:
            raise KeyError(f"expert {key} is not in the expert catalog")
        return self._layer_group[key[0]]

    def _group_of_keys(self, keys: list[ExpertKey]) -> int:
        groups = {self._group_of(k) for k in keys}
        if len(groups) != 1:
            layers = sorted({k[0] for k in keys})
            raise ValueError(f"one acquire/release must stay within one slab group; got layers {layers}")
        return groups.pop()


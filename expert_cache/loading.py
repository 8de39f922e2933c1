"""Moving one expert into a device slot: from its host-tier buffer, or from disk.

A disk read goes into a host-tier slot when one can be had (the expert is then cached in RAM
too), else into the calling thread's staging buffer; the device copy is issued from there.
Table changes happen under the cache's lock; reads and copies run outside it, protected by pins:
the host slot being filled or copied from is pinned, so no other thread can evict or reuse it.
Only one thread loads a given key at a time (the device tier marks it FILLING), so a host entry
another thread can see is always complete.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from expert_cache.base import ExpertKey, TierStats
from expert_cache.device_tier import DeviceTier
from expert_cache.disk_reader import DiskReader
from expert_cache.host_tier import HostTier, StagingBuffers
from expert_cache.layout import SlabGroup
from expert_cache.metrics import CacheMetrics
from expert_cache.tally import ThreadTally


@dataclass
class LoadCounters:
    """Host-tier lookups and bytes moved, guarded by the cache's lock."""

    host: TierStats
    bytes_from_host: int = 0
    bytes_from_disk: int = 0


class ExpertLoader:
    def __init__(
        self,
        groups: list[SlabGroup],
        lock: threading.RLock,
        disk: DiskReader,
        host: HostTier,
        staging: StagingBuffers,
        device: DeviceTier,
        metrics: CacheMetrics,
        tally: ThreadTally,
    ) -> None:
        self.groups, self.lock = groups, lock
        self.disk, self.host, self.staging, self.device, self.metrics = disk, host, staging, device, metrics
        self.counters = LoadCounters(TierStats())
        self.tally = tally

    def load(self, group: int, key: ExpertKey, slot: int) -> None:
        """Fill device ``slot`` of ``group`` with ``key`` (the caller owns the slot's FILLING
        state). Raises CheckpointError (naming file and tensor) when the disk read fails."""
        table = self.host.tables[group]
        with self.lock:
            host_slot = table.slot(key)
            from_host = host_slot is not None
            if from_host:
                self.counters.host.hits += 1
                table.pin(key)
            else:
                self.counters.host.misses += 1
                try:
                    host_slot, evicted = table.insert(key)
                except LookupError:  # no host tier, or every host slot is in use right now
                    host_slot = None
                else:
                    table.pin(key)
                    self.counters.host.evictions += evicted is not None
        try:
            t0 = time.perf_counter()
            if host_slot is not None:
                buffer = self.host.buffer(group, host_slot)
            else:
                buffer = self.staging.expert(group)
            if not from_host:
                buffer.wait_writable()
                nbytes = self.disk.read_into(key, buffer.views, self.staging.raw)
            else:
                nbytes = self.groups[group].expert_bytes
            source = "host" if from_host else "disk"
            latency = self.device.copy_in(group, slot, buffer, source, time.perf_counter() - t0)
        except BaseException:
            with self.lock:
                if host_slot is not None:
                    table.unpin(key)
                    if not from_host:  # half-filled: forget it
                        table.remove(key)
            raise
        with self.lock:
            if host_slot is not None:
                table.unpin(key)
            if from_host:
                self.counters.bytes_from_host += nbytes
            else:
                self.counters.bytes_from_disk += nbytes
        self.tally.add(nbytes=nbytes)
        if latency is not None:
            self.metrics.observe_load(source, latency)

    def observe_finished_copies(self) -> None:
        for source, seconds in self.device.finished_timings():
            self.metrics.observe_load(source, seconds)

    def host_stats(self) -> TierStats:
        """A copy of the host tier's counters and sizes (call under the lock)."""
        h = self.counters.host
        resident = sum(len(t) for t in self.host.tables)
        resident_bytes = sum(
            len(t) * g.expert_bytes for t, g in zip(self.host.tables, self.groups, strict=True)
        )
        return TierStats(h.hits, h.misses, h.evictions, resident, resident_bytes, self.host.capacity_bytes)

"""Which expert is in which device slot, and the protocol that fills slots safely.

One lock (the cache's) guards the slot tables, slot states and device counters. Disk reads and
copies run outside it, protected by pins and slot states (``SlotState``): a slot being filled is
FILLING, and whoever else wants that key pins it and waits on the condition until it is READY.
A fill that fails while others hold pins leaves the slot STALE and the next waiter refills it.
Waiting never holds the lock, and the loader thread never waits for the engine, so there is no
lock-order deadlock. Every wait on another thread's load is bounded by ``wait_timeout_s``: a read
that hangs ends in ExpertLoadTimeout for the caller, whose pins are undone; the hung load keeps
its slot FILLING until it returns.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter

from expert_cache.base import ExpertKey, ExpertLoadTimeout, SlotsExhausted, TierStats
from expert_cache.device_tier import DeviceTier, SlotState
from expert_cache.loading import ExpertLoader
from expert_cache.tally import ThreadTally

log = logging.getLogger("emo_serve.expert_cache")


class Residency:
    def __init__(self, device: DeviceTier, loader: ExpertLoader, cond: threading.Condition,
                 tally: ThreadTally, wait_timeout_s: float | None = None) -> None:
        self._device, self._loader, self._cond, self._tally = device, loader, cond, tally
        self.wait_timeout_s = wait_timeout_s
        self.counts = TierStats()  # device-tier hits, misses, evictions

    def acquire(self, group: int, keys: list[ExpertKey]) -> list[int]:
        """Pin ``keys`` and make sure their slots are filled; slot per key, in order."""
        table = self._device.tables[group]
        deadline = None if self.wait_timeout_s is None else time.monotonic() + self.wait_timeout_s
        with self._cond:
            self._loader.observe_finished_copies()
            owned, waits = self._plan_acquire(group, keys, deadline)
        pending = set(owned)
        try:
            self._fill(group, owned, pending)
            self._wait_filled(group, waits, pending, deadline)
        except BaseException:
            with self._cond:
                self.release(group, keys)
                self._abandon(group, pending)
            raise
        with self._cond:
            slots = [table.slot_of(k) for k in keys]  # pinned: they cannot have moved
            self._device.wait_ready(group, slots)
        return slots

    def release(self, group: int, keys: list[ExpertKey]) -> None:
        table = self._device.tables[group]
        with self._cond:
            for key, n in Counter(keys).items():
                if table.pins(key) < n:
                    raise ValueError(f"release of expert {key} x{n}, but it holds {table.pins(key)} pins")
            for key in keys:
                table.unpin(key)
            self._device.record_release(group, [table.slot_of(k) for k in dict.fromkeys(keys)])
            self._cond.notify_all()

    def _wait(self, deadline: float | None, key: ExpertKey) -> None:
        """One wait on the condition (lock held), ExpertLoadTimeout past ``deadline``."""
        if deadline is None:
            self._cond.wait()
            return
        left = deadline - time.monotonic()
        if left <= 0 or not self._cond.wait(left) and time.monotonic() >= deadline:
            assert self.wait_timeout_s is not None
            raise ExpertLoadTimeout(key, self.wait_timeout_s)

    def _plan_acquire(self, group: int, keys: list[ExpertKey],
                      deadline: float | None = None) -> tuple[list[ExpertKey], list[ExpertKey]]:
        """Pin every key (under the lock), giving misses slots; returns (keys this call must
        fill, keys another thread is filling). Raises SlotsExhausted before any change."""
        table, states = self._device.tables[group], self._device.states[group]
        distinct = list(dict.fromkeys(keys))
        while True:
            needed, free = table.needed_to_pin(distinct), table.unpinned_slots
            if needed > free:
                raise SlotsExhausted(keys[0][0], needed, free, table.capacity)
            misses = [k for k in distinct if k not in table]
            if table.victims_available(exclude=distinct) >= len(misses):
                break
            assert table.busy > 0, "slot accounting broken: free slots but no victims"
            self._wait(deadline, keys[0])  # slots held by an in-flight prefetch free up when it finishes
        owned: list[ExpertKey] = []
        waits: list[ExpertKey] = []
        for key in distinct:  # hits first, so that inserting the misses cannot evict them
            slot = table.slot(key)
            if slot is not None:
                self.counts.hits += 1
                self._tally.add(hits=1)
                table.pin(key)
                if states[slot] is not SlotState.READY:
                    waits.append(key)
        for key in misses:
            self.counts.misses += 1
            self._tally.add(misses=1)
            slot, evicted = table.insert(key)
            self.counts.evictions += evicted is not None
            states[slot] = SlotState.FILLING
            table.pin(key)
            owned.append(key)
        for key, n in Counter(keys).items():
            for _ in range(n - 1):
                table.pin(key)
        return owned, waits

    def _fill(self, group: int, keys: list[ExpertKey], pending: set[ExpertKey]) -> None:
        """Load ``keys`` (FILLING, owned by this thread) one by one, publishing each when done."""
        table, states = self._device.tables[group], self._device.states[group]
        for key in keys:
            slot = table.slot_of(key)  # FILLING and ours: pinned or busy, so it cannot move
            self._loader.load(group, key, slot)
            with self._cond:
                states[slot] = SlotState.READY
                table.set_busy(key, False)
                pending.discard(key)
                self._cond.notify_all()

    def _wait_filled(self, group: int, keys: list[ExpertKey], pending: set[ExpertKey],
                     deadline: float | None = None) -> None:
        """Wait until pinned ``keys`` filled by other threads are READY; refill STALE ones."""
        table, states = self._device.tables[group], self._device.states[group]
        while keys:
            with self._cond:
                claimed = []
                for key in keys:
                    slot = table.slot_of(key)
                    if states[slot] is SlotState.STALE:
                        states[slot] = SlotState.FILLING
                        claimed.append(key)
                        pending.add(key)
                if not claimed:
                    keys = [k for k in keys if states[table.slot_of(k)] is not SlotState.READY]
                    if keys:
                        self._wait(deadline, keys[0])
                    continue
            self._fill(group, claimed, pending)

    def _abandon(self, group: int, keys: set[ExpertKey]) -> None:
        """After a failed fill: unpinned keys leave the tier, pinned ones become STALE."""
        table, states = self._device.tables[group], self._device.states[group]
        for key in keys:
            slot = table.slot_of(key)
            table.set_busy(key, False)
            if table.pins(key) == 0:
                table.remove(key)
                states[slot] = SlotState.READY  # an empty slot: its state is not read
            else:
                states[slot] = SlotState.STALE
        self._cond.notify_all()

    def prefetch(self, group: int, group_keys: list[ExpertKey]) -> None:
        """Best effort: fill slots with ``group_keys`` without evicting pinned, busy or
        same-request keys; failures are logged."""
        table, states = self._device.tables[group], self._device.states[group]
        owned: list[ExpertKey] = []
        protect = set(group_keys)
        with self._cond:
            for key in group_keys:
                if key in table:
                    table.touch(key)
                    continue
                try:  # never evicts a key pinned, being filled, or of this same request
                    slot, evicted = table.insert(key, protect=protect)
                except LookupError:
                    break
                self.counts.evictions += evicted is not None
                states[slot] = SlotState.FILLING
                table.set_busy(key, True)
                owned.append(key)
        pending = set(owned)
        try:
            self._fill(group, owned, pending)
        except Exception:
            log.exception("prefetch of %d experts failed", len(owned))
            with self._cond:
                self._abandon(group, pending)

"""The slot table of one tier: which key sits in which slot, pins, and LRU eviction.

Pure Python bookkeeping (no torch, no locks: the owner serialises calls). The same table runs
the device tier's slab slots and the host tier's buffers.

Invariants:
- a key is in at most one slot and a slot holds at most one key;
- a pinned key (``pins > 0``) is never chosen as a victim;
- a *busy* key (its slot is being filled by someone who holds no pin, e.g. a prefetch) is
  never chosen as a victim either, but it does not count as pinned;
- ``_lru`` holds exactly the resident unpinned keys, least recently used first. A key enters
  it at the most recent end when inserted unpinned, when its last pin is dropped, or on touch.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Container, Hashable, Iterable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class SlotTable(Generic[K]):
    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self._slot_of: dict[K, int] = {}
        self._pins: dict[K, int] = {}  # only keys pinned now
        self._lru: OrderedDict[K, None] = OrderedDict()
        self._busy: set[K] = set()
        self._empty: list[int] = list(range(capacity - 1, -1, -1))  # pop() gives the lowest slot

    # -- queries ---------------------------------------------------------------------------
    def __contains__(self, key: object) -> bool:
        return key in self._slot_of

    def __len__(self) -> int:
        return len(self._slot_of)

    def slot(self, key: K) -> int | None:
        return self._slot_of.get(key)

    def slot_of(self, key: K) -> int:
        """The slot of a key known to be resident (KeyError otherwise)."""
        try:
            return self._slot_of[key]
        except KeyError:
            raise KeyError(f"{key} is not resident") from None

    def pins(self, key: K) -> int:
        return self._pins.get(key, 0)

    @property
    def pinned(self) -> int:
        """Distinct keys pinned now (each holds one slot)."""
        return len(self._pins)

    @property
    def unpinned_slots(self) -> int:
        """Slots not pinned: the most distinct new keys that a pin could still take."""
        return self.capacity - len(self._pins)

    @property
    def busy(self) -> int:
        return len(self._busy)

    def needed_to_pin(self, keys: Iterable[K]) -> int:
        """Distinct keys among ``keys`` that are not pinned now: the unpinned slots a pin of
        all of them would take."""
        return sum(1 for k in dict.fromkeys(keys) if k not in self._pins)

    def victims_available(self, exclude: Iterable[K] = ()) -> int:
        """Slots an insert could take now: empty ones plus evictable keys not in ``exclude``."""
        # O(busy + excluded), not O(resident): this runs on every acquire
        held = self._busy.union(k for k in exclude if k in self._lru)
        return len(self._empty) + len(self._lru) - sum(1 for k in held if k in self._lru)

    def lru_order(self) -> list[K]:
        """Resident unpinned keys, the next victim first (busy ones included)."""
        return list(self._lru)

    def resident_keys(self) -> list[K]:
        return list(self._slot_of)

    # -- changes ---------------------------------------------------------------------------
    def pin(self, key: K) -> None:
        if key not in self._slot_of:
            raise KeyError(f"{key} is not resident")
        n = self._pins.get(key, 0)
        if n == 0:
            self._lru.pop(key, None)
        self._pins[key] = n + 1

    def unpin(self, key: K) -> bool:
        """Drop one pin; True when it was the last (the key becomes the most recently used)."""
        n = self._pins.get(key, 0)
        if n == 0:
            raise ValueError(f"{key} is not pinned")
        if n > 1:
            self._pins[key] = n - 1
            return False
        del self._pins[key]
        self._lru[key] = None
        return True

    def touch(self, key: K) -> None:
        """Mark an unpinned resident key most recently used (pinned keys are not in the LRU)."""
        if key in self._lru:
            self._lru.move_to_end(key)

    def set_busy(self, key: K, busy: bool) -> None:
        if busy:
            if key not in self._slot_of:
                raise KeyError(f"{key} is not resident")
            self._busy.add(key)
        else:
            self._busy.discard(key)

    def insert(self, key: K, protect: Container[K] = ()) -> tuple[int, K | None]:
        """Give ``key`` (not resident) a slot: an empty one, else the least recently used
        evictable key's, never one in ``protect``. Returns ``(slot, evicted key or None)``; the
        key starts unpinned at the most recent end of the LRU. Raises LookupError when every
        slot is pinned, busy or protected."""
        if key in self._slot_of:
            raise ValueError(f"{key} is already resident")
        evicted: K | None = None
        if self._empty:
            slot = self._empty.pop()
        else:
            evicted = next((k for k in self._lru if k not in self._busy and k not in protect), None)
            if evicted is None:
                raise LookupError("no free slot: every slot is pinned or being filled")
            del self._lru[evicted]
            slot = self._slot_of.pop(evicted)
        self._slot_of[key] = slot
        self._lru[key] = None
        return slot, evicted

    def remove(self, key: K) -> int:
        """Forget an unpinned key (a failed fill); its slot becomes empty."""
        if key in self._pins:
            raise ValueError(f"{key} is pinned and cannot be removed")
        slot = self._slot_of.pop(key)
        self._lru.pop(key, None)
        self._busy.discard(key)
        self._empty.append(slot)
        return slot

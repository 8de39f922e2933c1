"""KV slot allocator: one slot of ``max_model_len`` positions per running sequence.

The slots index ``server.model.kv_cache.KVCache`` storage; this class only hands out their
numbers. Lowest free slot first, so a quiet server keeps reusing the same few slots.
"""

from __future__ import annotations

import heapq


class KVSlotAllocator:
    def __init__(self, num_slots: int) -> None:
        if num_slots < 1:
            raise ValueError(f"KVSlotAllocator: num_slots must be >= 1, got {num_slots}")
        self.num_slots = num_slots
        self._free = list(range(num_slots))  # a heap
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    @property
    def usage(self) -> float:
        """Fraction of slots in use, 0..1."""
        return len(self._used) / self.num_slots

    def allocate(self) -> int | None:
        """A free slot, or None when all are in use."""
        if not self._free:
            return None
        slot = heapq.heappop(self._free)
        self._used.add(slot)
        return slot

    def free(self, slot: int) -> None:
        if slot not in self._used:
            raise ValueError(f"KVSlotAllocator.free: slot {slot} is not allocated")
        self._used.remove(slot)
        heapq.heappush(self._free, slot)

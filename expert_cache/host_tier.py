"""The host-RAM tier: a byte-budgeted set of expert buffers with its own LRU, and the staging
buffers a disk read goes through when there is no host slot for it.

Buffers are page-locked when the device is CUDA so host->device copies run asynchronously at
full bus speed. PyTorch's pinned allocator rounds every allocation up to a power of two, so the
tier allocates power-of-two arenas of at most ``ARENA_BYTES`` and packs fixed-stride expert
slots into them: what is pinned (and counted against the budget) is what is allocated. Arenas
are allocated on first use, so a budget larger than the model costs nothing up front.

A buffer that is the source of an asynchronous copy must not be written again until that copy
has run: each buffer keeps the event of its last copy and ``wait_writable`` waits for it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from expert_cache.base import ExpertKey
from expert_cache.layout import SlabGroup
from expert_cache.policy import SlotTable

ARENA_BYTES = 1 << 30
SLOT_ALIGN = 512  # pinned slot starts aligned for DMA; parts follow each other inside a slot


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _pow2_floor(n: int) -> int:
    return 1 << (n.bit_length() - 1) if n > 0 else 0


@dataclass
class ExpertBuffer:
    """Host memory for one expert: ``views[part]`` is a contiguous tensor of the part's shape."""

    views: dict[str, torch.Tensor]
    last_copy: torch.cuda.Event | None = None

    def wait_writable(self) -> None:
        """Block until the last asynchronous copy out of this buffer has run."""
        if self.last_copy is not None:
            self.last_copy.synchronize()
            self.last_copy = None


def _expert_views(group: SlabGroup, base: torch.Tensor) -> dict[str, torch.Tensor]:
    views, offset = {}, 0
    for part in group.parts:
        n = group.part_bytes(part)
        views[part.name] = base[offset : offset + n].view(group.dtype).view(part.shape)
        offset += n
    return views


def plan_arenas(slot_bytes: int, max_slots: int, budget_bytes: int, pinned: bool) -> list[int]:
    """Slots per arena so that the arenas' allocated bytes stay within ``budget_bytes``
    (pinned arenas are allocated as powers of two)."""

    def size(k: int) -> int:
        return _pow2_ceil(k * slot_bytes) if pinned else k * slot_bytes

    per_arena = max(1, max(ARENA_BYTES, _pow2_ceil(slot_bytes)) // slot_bytes)
    plan: list[int] = []
    left_slots, left_bytes = max_slots, budget_bytes
    while left_slots > 0:
        k = min(per_arena, left_slots)
        if size(k) > left_bytes:
            k = (_pow2_floor(left_bytes) if pinned else left_bytes) // slot_bytes
            if k == 0:
                break
        plan.append(k)
        left_slots -= k
        left_bytes -= size(k)
    return plan


def host_bytes_for(expert_bytes: int, experts: int, pinned: bool) -> int:
    """The host budget that holds ``experts`` experts of ``expert_bytes`` (arena rounding included)."""
    slot_bytes = _round_up(expert_bytes, SLOT_ALIGN) if pinned else expert_bytes
    plan = plan_arenas(slot_bytes, experts, 1 << 62, pinned)
    return sum(_pow2_ceil(k * slot_bytes) if pinned else k * slot_bytes for k in plan)


class _GroupArena:
    """Lazily allocated arenas holding one group's host slots."""

    def __init__(self, group: SlabGroup, slot_bytes: int, plan: list[int], pinned: bool) -> None:
        self.group, self.slot_bytes, self.plan, self.pinned = group, slot_bytes, plan, pinned
        self.capacity = sum(plan)
        self.arena_bytes = [(_pow2_ceil(k * slot_bytes) if pinned else k * slot_bytes) for k in plan]
        self.buffers: list[ExpertBuffer | None] = [None] * self.capacity

    def buffer(self, slot: int) -> ExpertBuffer:
        buf = self.buffers[slot]
        if buf is None:
            self._allocate_arena_of(slot)
            buf = self.buffers[slot]
            assert buf is not None
        return buf

    def _allocate_arena_of(self, slot: int) -> None:
        first = 0
        for k, nbytes in zip(self.plan, self.arena_bytes, strict=True):
            if slot < first + k:
                arena = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pinned)
                for i in range(k):
                    base = arena[i * self.slot_bytes : i * self.slot_bytes + self.group.expert_bytes]
                    self.buffers[first + i] = ExpertBuffer(_expert_views(self.group, base))
                return
            first += k
        raise IndexError(f"host slot {slot} out of range")


class HostTier:
    """Host slots per slab group; the caller serialises table access with its own lock."""

    def __init__(self, groups: list[SlabGroup], budget_bytes: int, pinned: bool) -> None:
        total = sum(g.total_bytes for g in groups) or 1
        self._arenas: list[_GroupArena] = []
        for g in groups:
            slot_bytes = _round_up(g.expert_bytes, SLOT_ALIGN) if pinned else g.expert_bytes
            share = budget_bytes * g.total_bytes // total  # in proportion to the group's bytes
            plan = plan_arenas(slot_bytes, g.num_keys, share, pinned)
            self._arenas.append(_GroupArena(g, slot_bytes, plan, pinned))
        self.tables: list[SlotTable[ExpertKey]] = [SlotTable(a.capacity) for a in self._arenas]
        self.pinned = pinned
        self._alloc_lock = threading.Lock()

    def capacity(self, group: int) -> int:
        return self._arenas[group].capacity

    @property
    def capacity_bytes(self) -> int:
        return sum(sum(a.arena_bytes) for a in self._arenas)

    def allocate_all(self) -> None:
        """Allocate (and pin) every arena now rather than on first use."""
        with self._alloc_lock:
            for arena in self._arenas:
                for slot in range(arena.capacity):
                    arena.buffer(slot)

    def buffer(self, group: int, slot: int) -> ExpertBuffer:
        """The buffer of a host slot (allocating its arena on first use). Thread-safe."""
        with self._alloc_lock:
            return self._arenas[group].buffer(slot)


class StagingBuffers:
    """Per-thread reusable buffers: two expert buffers per group (a disk read fills one while
    the copy out of the other may still run) and a raw byte buffer for dtype conversion."""

    def __init__(self, groups: list[SlabGroup], pinned: bool) -> None:
        self._groups, self._pinned = groups, pinned
        self._local = threading.local()

    def expert(self, group: int) -> ExpertBuffer:
        """This thread's next staging buffer for ``group`` (the two alternate)."""
        rings: dict[int, list[ExpertBuffer]] = self._local.__dict__.setdefault("rings", {})
        ring = rings.get(group)
        if ring is None:
            g = self._groups[group]
            ring = [ExpertBuffer(_expert_views(g, self._bytes(g.expert_bytes))) for _ in range(2)]
            rings[group] = ring
        ring.reverse()
        return ring[0]

    def _bytes(self, n: int) -> torch.Tensor:
        return torch.empty(n, dtype=torch.uint8, pin_memory=self._pinned)

    def raw(self, nbytes: int) -> torch.Tensor:
        buf: torch.Tensor | None = self._local.__dict__.get("raw")
        if buf is None or buf.numel() < nbytes:
            buf = torch.empty(nbytes, dtype=torch.uint8)
            self._local.raw = buf
        return buf

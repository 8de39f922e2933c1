"""The device tier: one preallocated slab per slab group, filled slot by slot.

``slabs[group][part]`` is ``[N, *part.shape]`` in the catalog dtype, allocated once, never
moved, with ``sum(N * expert_bytes) <= budget``. On CUDA, copies into a slot run on a dedicated
copy stream:
- before overwriting a slot, the copy stream waits for the event recorded on the compute
  stream when the slot was last released (its old contents may still be read by queued kernels);
- after the copy, an event per slot marks its readiness; ``wait_ready`` makes the compute stream
  wait only for the slots it is about to read.
On a CPU device the same calls run, with synchronous copies and no events.
"""

from __future__ import annotations

import time
from collections import deque
from enum import Enum

import torch

from expert_cache.base import ExpertKey
from expert_cache.host_tier import ExpertBuffer
from expert_cache.layout import SlabGroup, split_slots
from expert_cache.policy import SlotTable


# torch's stubs leave the CUDA Stream/Event constructors and Event.query unannotated; these
# typed wrappers keep the ignores in one place.
def _cuda_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)  # type: ignore[no-untyped-call]  # torch stub gap


def _cuda_event(enable_timing: bool = False) -> torch.cuda.Event:
    return torch.cuda.Event(enable_timing=enable_timing)  # type: ignore[no-untyped-call]  # torch stub gap


def _event_done(event: torch.cuda.Event) -> bool:
    return bool(event.query())  # type: ignore[no-untyped-call]  # torch stub gap


class SlotState(Enum):
    READY = "ready"  # holds its key (on CUDA: once its copy event has fired)
    FILLING = "filling"  # a thread is reading/copying the key in; readers must wait
    STALE = "stale"  # a fill failed while someone held a pin; the next waiter refills it


class DeviceTier:
    """Slabs, slot tables, slot states and the stream/event plumbing of the device tier."""

    def __init__(self, groups: list[SlabGroup], device: torch.device, budget_bytes: int) -> None:
        self.groups, self.device = groups, device
        self.capacities = split_slots(groups, budget_bytes, [g.expert_bytes for g in groups])
        for g, n in zip(groups, self.capacities, strict=True):
            if n == 0 and g.num_keys > 0:
                raise ValueError(
                    f"device budget of {budget_bytes} bytes leaves no slot for layers {list(g.layers)} "
                    f"(one expert takes {g.expert_bytes} bytes)"
                )
        self.slabs: list[dict[str, torch.Tensor]] = [
            {p.name: torch.empty((n, *p.shape), dtype=g.dtype, device=device) for p in g.parts}
            for g, n in zip(groups, self.capacities, strict=True)
        ]
        self.tables: list[SlotTable[ExpertKey]] = [SlotTable(n) for n in self.capacities]
        self.states: list[list[SlotState]] = [[SlotState.READY] * n for n in self.capacities]
        self.is_cuda = device.type == "cuda"
        n_slots = self.capacities
        self._ready_events: list[list[torch.cuda.Event | None]] = [[None] * n for n in n_slots]
        self._release_events: list[list[torch.cuda.Event | None]] = [[None] * n for n in n_slots]
        self._copy_stream = _cuda_stream(device) if self.is_cuda else None
        # (source, host seconds, start event, end event) of copies whose time is not known yet
        self._timings: deque[tuple[str, float, torch.cuda.Event, torch.cuda.Event]] = deque()

    @property
    def capacity_bytes(self) -> int:
        return sum(n * g.expert_bytes for g, n in zip(self.groups, self.capacities, strict=True))

    def copy_in(self, group: int, slot: int, src: ExpertBuffer, source: str, host_s: float) -> float | None:
        """Copy ``src`` into ``slot``; ``host_s`` is the time already spent producing ``src``.
        Returns the load latency when it is known now (CPU), else records it for
        ``finished_timings`` (CUDA, measured with events on the copy stream)."""
        slab = self.slabs[group]
        if self._copy_stream is None:
            t0 = time.perf_counter()
            for name, view in src.views.items():
                slab[name][slot].copy_(view)
            return host_s + time.perf_counter() - t0
        with torch.cuda.stream(self._copy_stream):
            released = self._release_events[group][slot]
            if released is not None:
                self._copy_stream.wait_event(released)
            start = _cuda_event(enable_timing=True)
            start.record(self._copy_stream)
            for name, view in src.views.items():
                slab[name][slot].copy_(view, non_blocking=True)
            done = _cuda_event(enable_timing=True)
            done.record(self._copy_stream)
        self._ready_events[group][slot] = done
        src.last_copy = done
        self._timings.append((source, host_s, start, done))
        return None

    def finished_timings(self) -> list[tuple[str, float]]:
        """``(source, seconds)`` of CUDA copies that have completed since the last call."""
        out: list[tuple[str, float]] = []
        while self._timings and _event_done(self._timings[0][3]):
            source, host_s, start, done = self._timings.popleft()
            out.append((source, host_s + start.elapsed_time(done) / 1000.0))
        return out

    def wait_ready(self, group: int, slots: list[int]) -> None:
        """Order the current (compute) stream after the copies that filled ``slots``."""
        if not self.is_cuda:
            return
        stream = torch.cuda.current_stream(self.device)
        events = self._ready_events[group]
        for slot in dict.fromkeys(slots):
            event = events[slot]
            if event is not None:
                stream.wait_event(event)

    def record_release(self, group: int, slots: list[int]) -> None:
        """Remember where the compute stream is when ``slots`` are released: a later copy into
        them must wait for the kernels already queued that read them."""
        if not self.is_cuda or not slots:
            return
        event = _cuda_event()
        event.record(torch.cuda.current_stream(self.device))
        for slot in slots:
            self._release_events[group][slot] = event

    def slot_ids(self, slots: list[int]) -> torch.Tensor:
        """``slots`` as int64 on the device, without stalling the compute stream on CUDA."""
        ids = torch.tensor(slots, dtype=torch.int64)
        if not self.is_cuda:
            return ids
        return ids.pin_memory().to(self.device, non_blocking=True)

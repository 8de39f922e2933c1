"""AsyncPinner: pins on loader threads, hands pins over exactly once, an abandoned load releases
its own pins whenever it lands, failures come back to the caller, and the read hook sees every
disk read. Against the real tiered cache; reads are held on an event, never timed."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from expert_cache import ExpertKey, TieredExpertCache
from expert_cache.async_loads import AsyncPinner
from expert_cache.errors import CheckpointError
from tests.expert_cache.helpers import expected_parts, hand_catalog, same_bits, write_checkpoint

LAYERS, EXPERTS = 2, 6


class Gate:
    def __init__(self) -> None:
        self.opened, self.held = threading.Event(), threading.Event()
        self.opened.set()
        self.reads: list[ExpertKey] = []
        self.fail: set[ExpertKey] = set()

    def __call__(self, key: ExpertKey) -> None:
        self.reads.append(key)
        if key in self.fail:
            raise OSError(5, "injected")
        if not self.opened.is_set():
            self.held.set()
            assert self.opened.wait(60)


def cache(tmp_path: Path, gate: Gate) -> tuple[TieredExpertCache, dict[str, torch.Tensor]]:
    tensors = write_checkpoint(tmp_path, layers=LAYERS, experts=EXPERTS, dtype=torch.float32, hidden=8,
                               inter=4)
    catalog = hand_catalog(tmp_path, torch.float32)
    eb = catalog.expert_bytes(0)
    return TieredExpertCache(catalog, device="cpu", device_budget_bytes=8 * eb, host_budget_bytes=0,
                             before_disk_read=gate), tensors


def test_pin_hands_over_resident_pinned_experts(tmp_path: Path) -> None:
    gate = Gate()
    store, tensors = cache(tmp_path, gate)
    woken = threading.Event()
    pinner = AsyncPinner(store, threads=2, on_done=woken.set)
    keys = [(0, 1), (0, 4)]
    load = pinner.pin(keys)
    assert woken.wait(60) and load.done() and pinner.in_flight == 0
    assert load.take() == keys and store.stats().pinned_slots == 2
    slots = store.acquire_slots(keys)
    for key, slot in zip(keys, slots, strict=True):
        for part, want in expected_parts(tensors, key, torch.float32).items():
            assert same_bits(store.slab(0)[part][slot], want)
    store.release(keys)
    store.release(keys)
    assert store.stats().pinned_slots == 0 and gate.reads == keys
    pinner.close()
    store.close()


def test_abandoned_loads_release_their_pins_when_they_land(tmp_path: Path) -> None:
    gate = Gate()
    store, _ = cache(tmp_path, gate)
    pinner = AsyncPinner(store, threads=1)
    gate.opened.clear()
    running = pinner.pin([(1, 0), (1, 2)])
    assert gate.held.wait(60)
    queued = pinner.pin([(0, 3)])  # the one thread is busy: this one has not started
    pinner.abandon(queued)
    pinner.abandon(running)
    assert pinner.in_flight >= 1
    gate.opened.set()
    pinner.close()
    assert pinner.in_flight == 0 and store.stats().pinned_slots == 0
    assert (0, 3) not in gate.reads  # cancelled before it started
    finished = AsyncPinner(store, threads=1)
    done = finished.pin([(0, 5)])
    finished.close()
    finished.abandon(done)  # abandoned after it finished: released at once
    assert store.stats().pinned_slots == 0
    store.close()


def test_a_failed_read_comes_back_and_pins_nothing(tmp_path: Path) -> None:
    gate = Gate()
    store, _ = cache(tmp_path, gate)
    gate.fail = {(0, 2)}
    pinner = AsyncPinner(store)
    load = pinner.pin([(0, 1), (0, 2)])
    pinner.close()
    with pytest.raises(CheckpointError, match="injected"):
        load.take()
    assert store.stats().pinned_slots == 0 and not store.is_resident((0, 2))
    warm = AsyncPinner(store)
    w = warm.warm([(1, 1), (0, 2), (1, 3)])  # best effort: the failure is left to the compute
    warm.close()
    assert w.take() == [] and store.stats().pinned_slots == 0
    assert store.is_resident((1, 1)) and store.tier_of((1, 1)) == "device" and store.tier_of((0, 2)) == "disk"
    store.close()

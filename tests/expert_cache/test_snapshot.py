"""snapshot(): which experts sit where, as the tables say, through misses, pins, a fill in
flight, evictions, and the host tier keeping what the device tier dropped."""

from __future__ import annotations

from pathlib import Path

import torch

from expert_cache import LayerResidency, TieredExpertCache
from tests.expert_cache.helpers import hand_catalog, write_checkpoint
from tests.expert_cache.test_threads import _GatedReads

LAYERS, EXPERTS = 2, 4


def by_layer(cache: TieredExpertCache) -> dict[int, LayerResidency]:
    return {layer.layer: layer for layer in cache.snapshot().layers}


def test_snapshot_follows_misses_pins_fills_and_evictions(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, layers=LAYERS, experts=EXPERTS, dtype=torch.float32)
    catalog = hand_catalog(tmp_path, torch.float32)
    eb = catalog.expert_bytes(0)
    with TieredExpertCache(catalog, device="cpu", device_budget_bytes=3 * eb, host_budget_bytes=8 * eb,
                           background_prefetch=True) as cache:
        fresh = by_layer(cache)
        assert list(fresh) == [0, 1]
        for layer in fresh.values():  # both layers have the same shapes: one shared slab
            assert (layer.slab, layer.experts, layer.device_capacity, layer.host_capacity) == (
                0, (0, 1, 2, 3), 3, 8)
            assert layer.resident == layer.pinned == layer.loading == layer.host_resident == ()

        cache.acquire([(0, 2), (0, 1)])
        layers = by_layer(cache)
        assert (layers[0].resident, layers[0].pinned, layers[0].host_resident) == ((1, 2), (1, 2), (1, 2))
        assert layers[1].resident == layers[1].pinned == ()
        assert cache.snapshot().stats.device.misses == 2

        cache.release([(0, 2), (0, 1)])
        layers = by_layer(cache)
        assert (layers[0].resident, layers[0].pinned) == ((1, 2), ())

        gate = _GatedReads(cache, (1, 3))
        cache.prefetch([(1, 3)])
        assert gate.started.wait(timeout=30)
        layers = by_layer(cache)
        assert (layers[1].loading, layers[1].resident, layers[1].pinned) == ((3,), (), ())
        gate.go.set()
        assert cache.wait_for_prefetch(timeout=30)
        layers = by_layer(cache)
        assert (layers[1].loading, layers[1].resident) == ((), (3,))

        cache.acquire([(1, 0)])  # three slots, all taken: (0, 2), released first, goes
        snap = cache.snapshot()
        layers = {layer.layer: layer for layer in snap.layers}
        assert (layers[0].resident, layers[1].resident, layers[1].pinned) == ((1,), (0, 3), (0,))
        assert layers[0].host_resident == (1, 2)  # the host tier still holds the evicted expert
        assert (snap.stats.device.evictions, snap.stats.pinned_slots) == (1, 1)
        cache.release([(1, 0)])

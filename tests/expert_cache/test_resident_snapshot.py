"""ResidentExpertStore.snapshot(): everything resident, pins as held, no host tier."""

from __future__ import annotations

from pathlib import Path

import torch

from expert_cache.resident import ResidentExpertStore
from tests.expert_cache.helpers import hand_catalog, write_checkpoint


def test_resident_snapshot_lists_every_expert_and_the_pins(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, layers=2, experts=3, dtype=torch.float32)
    store = ResidentExpertStore(hand_catalog(tmp_path, torch.float32), "cpu")
    store.acquire([(1, 2), (1, 0), (1, 2)])
    snap = store.snapshot()
    assert [layer.layer for layer in snap.layers] == [0, 1]
    for layer in snap.layers:
        assert layer.experts == layer.resident == (0, 1, 2)
        assert (layer.slab, layer.device_capacity, layer.host_capacity) == (0, 6, 0)
        assert layer.loading == layer.host_resident == ()
    assert (snap.layers[0].pinned, snap.layers[1].pinned) == ((), (0, 2))
    assert (snap.stats.pinned_slots, snap.stats.device.hits) == (2, 3)

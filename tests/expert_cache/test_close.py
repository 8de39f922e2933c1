"""close() may be called more than once, on every ExpertStore (see the contract in base.py)."""

from __future__ import annotations

import threading
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry, generate_latest

from expert_cache import TieredExpertCache
from expert_cache.resident import ResidentExpertStore
from tests.expert_cache.helpers import hand_catalog, write_checkpoint


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "emo-expert-prefetch"]


def test_tiered_cache_closes_twice_and_leaves_a_successor_alone(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, experts=4)
    catalog = hand_catalog(tmp_path, torch.bfloat16)
    registry = CollectorRegistry()

    def make() -> TieredExpertCache:
        return TieredExpertCache(catalog, device="cpu", device_budget_bytes=10**6,
                                 host_budget_bytes=10**6, registry=registry)

    before = set(_prefetch_threads())
    with make() as cache:  # __exit__ closes once more after the explicit close
        cache.prefetch([(0, 1)])  # starts the loader thread that close() must stop
        assert cache.wait_for_prefetch(timeout=30)
        cache.close()
        assert set(_prefetch_threads()) <= before
    cache.close()
    successor = make()  # the registry is free again: close() took the metrics off it
    cache.close()  # a late close of the old cache must not take the successor's metrics off
    assert "emo_serve_expert_cache_hits_total" in generate_latest(registry).decode()
    successor.close()
    successor.close()
    assert "emo_serve_expert_cache_" not in generate_latest(registry).decode()


def test_resident_store_closes_twice(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, layers=1, experts=2, dtype=torch.float32)
    store = ResidentExpertStore(hand_catalog(tmp_path, torch.float32), "cpu")
    store.close()
    store.close()
    assert store.slab(0)["down"].shape == (2, 8, 4)  # slabs handed out stay readable

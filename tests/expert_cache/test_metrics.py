"""The Prometheus exposition agrees with stats() and follows the naming conventions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from expert_cache import TieredExpertCache
from tests.expert_cache.helpers import hand_catalog, write_checkpoint

P = "emo_serve_expert_cache_"


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_exposition_matches_stats(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, experts=4)
    catalog = hand_catalog(tmp_path, torch.bfloat16)
    eb = catalog.expert_bytes(0)
    registry = CollectorRegistry()
    cache = TieredExpertCache(
        catalog, device="cpu", device_budget_bytes=2 * eb, host_budget_bytes=3 * eb, registry=registry
    )
    for keys in ([(0, 0), (0, 1)], [(0, 2)], [(0, 0)], [(0, 3), (0, 1)], [(0, 0)]):
        cache.acquire(keys)
        cache.release(keys)
    s = cache.stats()
    m = _samples(registry)

    def tier(name: str, t: str) -> float:
        return m[(P + name, (("tier", t),))]

    for t, ts in (("device", s.device), ("host", s.host)):
        assert tier("hits_total", t) == ts.hits and tier("misses_total", t) == ts.misses
        assert tier("evictions_total", t) == ts.evictions
        assert tier("resident_experts", t) == ts.resident and tier("resident_bytes", t) == ts.resident_bytes
        assert tier("capacity_bytes", t) == ts.capacity_bytes
    assert tier("capacity_experts", "device") == 2 and tier("capacity_experts", "host") == 3
    assert (s.device.misses, s.host.hits, s.host.misses, s.host.evictions) == (7, 2, 5, 2)  # traced by hand
    assert m[(P + "loaded_bytes_total", (("source", "disk"),))] == s.bytes_loaded_from_disk == 5 * eb
    assert m[(P + "loaded_bytes_total", (("source", "host"),))] == s.bytes_loaded_from_host == 2 * eb
    assert m[(P + "pinned_experts", ())] == 0
    assert m[(P + "load_latency_seconds_count", (("source", "disk"),))] == 5
    assert m[(P + "load_latency_seconds_count", (("source", "host"),))] == 2
    cache.acquire([(0, 1)])
    assert _samples(registry)[(P + "pinned_experts", ())] == 1
    cache.release([(0, 1)])
    # close() takes the metrics off the registry so that a new cache can use it
    cache.close()
    assert not any(name.startswith(P) for name, _ in _samples(registry))
    TieredExpertCache(
        catalog, device="cpu", device_budget_bytes=eb, host_budget_bytes=0, registry=registry
    ).close()


def test_private_registries_do_not_clash(tmp_path: Path) -> None:
    write_checkpoint(tmp_path)
    catalog = hand_catalog(tmp_path, torch.bfloat16)

    def make(registry: CollectorRegistry | None) -> TieredExpertCache:
        return TieredExpertCache(
            catalog, device="cpu", device_budget_bytes=10**6, host_budget_bytes=0, registry=registry
        )

    a, b = make(None), make(None)
    assert a.registry is not b.registry
    shared = CollectorRegistry()
    c = TieredExpertCache(
        catalog, device="cpu", device_budget_bytes=10**6, host_budget_bytes=0, registry=shared
    )
    with pytest.raises(ValueError, match="Duplicated"):
        TieredExpertCache(
            catalog, device="cpu", device_budget_bytes=10**6, host_budget_bytes=0, registry=shared
        )
    for cache in (a, b, c):
        cache.close()


def test_promql_for_hit_rate_is_documented() -> None:
    import expert_cache.metrics as metrics

    doc = " ".join((metrics.__doc__ or "").split())
    assert 'sum(rate(emo_serve_expert_cache_hits_total{tier="device"}[5m]))' in doc
    assert 'sum(rate(emo_serve_expert_cache_misses_total{tier="device"}[5m]))' in doc

"""Prometheus metrics of the expert cache (``emo_serve_expert_cache_`` prefix).

Counters and gauges are read from one ``CacheStats`` snapshot at scrape time (a custom
collector), so the exposition always agrees with ``stats()``; the load latency is a histogram
observed as loads complete.

    emo_serve_expert_cache_hits_total{tier="device"|"host"}       acquire lookups served by the tier
    emo_serve_expert_cache_misses_total{tier}                     lookups the tier could not serve
    emo_serve_expert_cache_evictions_total{tier}                  experts evicted to make room
    emo_serve_expert_cache_loaded_bytes_total{source="host"|"disk"}  bytes moved into the device tier
                                                                  (disk: bytes read from the files)
    emo_serve_expert_cache_load_latency_seconds{source}           one expert: read + copy into its slot
    emo_serve_expert_cache_resident_experts{tier}, _resident_bytes{tier}
    emo_serve_expert_cache_capacity_experts{tier}, _capacity_bytes{tier}
    emo_serve_expert_cache_pinned_experts                         device slots pinned now

Device-tier hit rate over 5 minutes (PromQL):

    sum(rate(emo_serve_expert_cache_hits_total{tier="device"}[5m]))
      / (sum(rate(emo_serve_expert_cache_hits_total{tier="device"}[5m]))
         + sum(rate(emo_serve_expert_cache_misses_total{tier="device"}[5m])))

Host->device paging bandwidth: ``rate(emo_serve_expert_cache_loaded_bytes_total[1m])`` by source.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from expert_cache.base import CacheStats, TierStats

PREFIX = "emo_serve_expert_cache_"
LATENCY_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class _StatsCollector(Collector):
    def __init__(self, snapshot: Callable[[], CacheStats], capacity_experts: Callable[[], dict[str, int]]):
        self._snapshot, self._capacity_experts = snapshot, capacity_experts

    def describe(self) -> Iterable[Metric]:
        return self._families(None, None)

    def collect(self) -> Iterable[Metric]:
        return self._families(self._snapshot(), self._capacity_experts())

    def _families(self, s: CacheStats | None, cap: dict[str, int] | None) -> list[Metric]:
        def tiers(family: CounterMetricFamily | GaugeMetricFamily, get: Callable[[TierStats], int]) -> Metric:
            if s is not None:
                family.add_metric(["device"], get(s.device))
                family.add_metric(["host"], get(s.host))
            return family

        def counter(name: str, doc: str, label: str = "tier") -> CounterMetricFamily:
            return CounterMetricFamily(PREFIX + name, doc, labels=[label])

        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(PREFIX + name, doc, labels=["tier"])

        loaded = counter("loaded_bytes", "Bytes loaded into the device tier, by source", "source")
        experts = gauge("capacity_experts", "Experts the tier can hold")
        if s is not None and cap is not None:
            loaded.add_metric(["host"], s.bytes_loaded_from_host)
            loaded.add_metric(["disk"], s.bytes_loaded_from_disk)
            experts.add_metric(["device"], cap["device"])
            experts.add_metric(["host"], cap["host"])
        pinned = GaugeMetricFamily(PREFIX + "pinned_experts", "Device slots pinned now")
        if s is not None:
            pinned.add_metric([], s.pinned_slots)
        return [
            tiers(counter("hits", "Expert lookups served by the tier"), lambda t: t.hits),
            tiers(counter("misses", "Expert lookups the tier could not serve"), lambda t: t.misses),
            tiers(counter("evictions", "Experts evicted from the tier"), lambda t: t.evictions),
            loaded,
            tiers(gauge("resident_experts", "Experts held by the tier"), lambda t: t.resident),
            tiers(gauge("resident_bytes", "Bytes of experts held by the tier"), lambda t: t.resident_bytes),
            tiers(gauge("capacity_bytes", "Bytes the tier may hold"), lambda t: t.capacity_bytes),
            experts,
            pinned,
        ]


class CacheMetrics:
    """Registers the cache's metrics on ``registry`` (a private one when None)."""

    def __init__(
        self,
        registry: CollectorRegistry | None,
        snapshot: Callable[[], CacheStats],
        capacity_experts: Callable[[], dict[str, int]],
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self._collector = _StatsCollector(snapshot, capacity_experts)
        self.registry.register(self._collector)
        self.load_latency = Histogram(
            PREFIX + "load_latency_seconds",
            "Seconds to load one expert into a device slot (read + copy), by source",
            labelnames=["source"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def observe_load(self, source: str, seconds: float) -> None:
        self.load_latency.labels(source=source).observe(seconds)

    def unregister(self) -> None:
        self.registry.unregister(self._collector)
        self.registry.unregister(self.load_latency)

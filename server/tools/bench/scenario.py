"""One benchmark scenario (a routing on a device tier), served through the Engine.

Order of a tiered scenario: warm the host tier (page every expert once), run the TTFT prompt
once to learn its experts, flush them off the device tier (page every other expert through),
then measure: cold TTFT, warm TTFT, batch-1 decode, N concurrent requests over the domains.
Cache counters are deltas over the measured phases only.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry

from expert_cache.base import ExpertCatalog, ExpertKey, ExpertStore
from expert_cache.cache import TieredExpertCache
from expert_cache.errors import CheckpointError
from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.request import GenerationRequest, RequestError
from server.model.dtypes import DTYPE_NAMES
from server.model.kv_cache import KVCache
from server.runtime import Settings, open_engine
from server.tools.bench.config import DecodeBenchConfig, Scenario
from server.tools.bench.tiers import header_catalog, tier_budget, whole_host_budget
from server.tools.bench.workload import Recorder, Track, decode_rate, domain_prompt, greedy, ttft

WAIT_S = 1800.0
HOST_LATENCY = "emo_serve_expert_cache_load_latency_seconds_sum"


@dataclass
class ScenarioResult:
    name: str
    routing: int | str
    tier: float
    device_slots: int
    decode_tps_b1: float = math.nan
    decode_tps_concurrent: float = math.nan  # all requests' tokens / makespan
    ttft_cold_s: float | None = None
    ttft_warm_s: float = math.nan
    cold_paged_bytes: int | None = None  # paged in while serving the cold request (prefetch included)
    hit_rate: float = math.nan  # device tier, over the measured phases
    bytes_paged: int = 0
    h2d_gb_s: float | None = None  # bytes paged from host / seconds those loads took
    peak_device_bytes: int | None = None  # CUDA: max_memory_allocated; CPU: None, no allocator to ask
    budget_bytes: int = 0  # trunk + device tier budget + KV slots
    skipped: str | None = None
    notes: list[str] = field(default_factory=list)


@torch.inference_mode()  # like the model: buffers the cache allocated there stay writable
def page_through(store: ExpertStore, keys: list[ExpertKey]) -> None:
    """Acquire and release ``keys`` layer by layer, as many at a time as the slab has room for."""
    by_layer: dict[int, list[ExpertKey]] = {}
    for key in keys:
        by_layer.setdefault(key[0], []).append(key)
    for layer, group in sorted(by_layer.items()):
        step = max(1, store.free_slots(layer))
        for i in range(0, len(group), step):
            store.acquire(group[i : i + step])
            store.release(group[i : i + step])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Counters:
    """Device hits/misses, bytes paged and host-load seconds of a store, as deltas."""

    def __init__(self, store: ExpertStore, registry: CollectorRegistry) -> None:
        self.store, self.registry = store, registry
        self.start = self.read()

    def read(self) -> tuple[int, int, int, int, float]:
        s = self.store.stats()
        host_s = self.registry.get_sample_value(HOST_LATENCY, {"source": "host"}) or 0.0
        return (s.device.hits, s.device.misses, s.bytes_loaded_from_host, s.bytes_loaded_from_disk, host_s)

    def delta(self) -> tuple[int, int, int, int, float]:
        now = self.read()
        return tuple(b - a for a, b in zip(self.start, now, strict=True))  # type: ignore[return-value]


def _settings(cfg: DecodeBenchConfig, sc: Scenario, model_dir: Path, catalog: ExpertCatalog) -> Settings:
    """The scenario as server settings: its tier as the device budget, a host tier that holds
    every expert (so the measured misses are host -> device copies), its routing as the default
    pool, one KV slot per concurrent request."""
    engine = EngineConfig(max_num_seqs=cfg.concurrency, max_model_len=cfg.max_model_len,
                          pool_size=sc.routing)
    if sc.resident:
        return Settings(model=model_dir, device=cfg.device, dtype=cfg.dtype, engine=engine,
                        expert_cache="all")
    pinned = torch.device(cfg.device).type == "cuda"
    return Settings(model=model_dir, device=cfg.device, dtype=cfg.dtype, engine=engine,
                    expert_cache=tier_budget(catalog, sc.tier)[1],
                    host_cache=whole_host_budget(catalog, pinned))


def run_scenario(
    cfg: DecodeBenchConfig, sc: Scenario, model_dir: Path, log: Callable[[str], None]
) -> ScenarioResult:
    device = torch.device(cfg.device)
    registry = CollectorRegistry()
    dtype = DTYPE_NAMES[cfg.dtype]
    catalog = header_catalog(model_dir, dtype)
    slots = len(catalog.chunks) if sc.resident else tier_budget(catalog, sc.tier)[0]
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    result = ScenarioResult(sc.name, sc.routing, sc.tier, slots)
    try:
        runtime = open_engine(_settings(cfg, sc, model_dir, catalog), registry=registry)
    except CheckpointError:
        raise
    except ValueError as e:  # does not fit the device (PlanError), or the tier cannot hold the pool
        result.skipped = str(e).splitlines()[0]
        return result
    engine, store = runtime.engine, runtime.store
    with runtime:
        try:
            _measure(cfg, sc, engine, store, registry, result, log)
        except RequestError as e:
            result.skipped = f"rejected by the engine: {e}"
    loaded = runtime.loaded
    trunk = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    kv = KVCache.bytes_per_slot(loaded.config, cfg.max_model_len, loaded.model.dtype) * engine.num_kv_slots
    result.budget_bytes = trunk + store.stats().device.capacity_bytes + kv
    if device.type == "cuda":  # on CPU, summing our own sizes would equal the budget by construction
        result.peak_device_bytes = torch.cuda.max_memory_allocated(device)
    del engine, store, loaded, runtime
    gc.collect()
    return result


def _submit(engine: Engine, rec: Recorder, rid: str, ids: list[int], n: int, pool_keys: bool = False) -> str:
    req = GenerationRequest(rid, ids, greedy(n), return_expert_pool=pool_keys)
    rec.submitted(req)
    engine.submit(req, rec)
    return rid


def _measure(cfg: DecodeBenchConfig, sc: Scenario, engine: Engine, store: ExpertStore,
             registry: CollectorRegistry, r: ScenarioResult, log: Callable[[str], None]) -> None:
    device, rec = torch.device(cfg.device), Recorder()
    tok = engine.tokenizer
    prompt = domain_prompt(tok, 0, cfg.prompt_tokens, cfg.seed)
    all_keys = sorted(engine.loaded.catalog.chunks)
    if not sc.resident:
        log(f"{sc.name}: warming the host tier ({len(all_keys)} experts)")
        page_through(store, all_keys)
    log(f"{sc.name}: probe + flush, then TTFT cold / warm ({cfg.prompt_tokens}-token prompt)")
    probe = rec.wait([_submit(engine, rec, "probe", prompt, 1, pool_keys=True)], WAIT_S)[0]
    report = probe.output.expert_pool if probe.output else None
    layers: list[list[int]] = report["experts"] if report is not None else []  # [] for full routing
    used: set[ExpertKey] = {(layer, e) for layer, ids in enumerate(layers) for e in ids}
    if isinstance(store, TieredExpertCache):
        store.wait_for_prefetch(WAIT_S)  # the probe's prefetches must not land after the flush
        page_through(store, [k for k in all_keys if k not in used])
    _sync(device)
    counters = _Counters(store, registry)
    cold = rec.wait([_submit(engine, rec, "cold", prompt, 1)], WAIT_S)[0]
    if not sc.resident:
        r.ttft_cold_s = ttft(cold)
        _sync(device)
        paged = counters.delta()
        r.cold_paged_bytes = paged[2] + paged[3]
    r.ttft_warm_s = min(ttft(rec.wait([_submit(engine, rec, f"warm{i}", prompt, 1)], WAIT_S)[0])
                        for i in range(cfg.repeats))
    log(f"{sc.name}: batch-1 decode ({cfg.decode_tokens} tokens, best of {cfg.repeats})")
    other = domain_prompt(tok, 1, cfg.prompt_tokens, cfg.seed + 1)
    r.decode_tps_b1 = max(decode_rate(rec.wait([_submit(engine, rec, f"b1-{i}", other, cfg.decode_tokens)],
                                               WAIT_S)[0]) for i in range(cfg.repeats))
    log(f"{sc.name}: {cfg.concurrency} concurrent requests over {cfg.domains} domains")
    prompts = [domain_prompt(tok, i % cfg.domains, cfg.prompt_tokens, cfg.seed + 10 + i)
               for i in range(cfg.concurrency)]
    ids = [_submit(engine, rec, f"c{i}", p, cfg.decode_tokens) for i, p in enumerate(prompts)]
    r.decode_tps_concurrent = _throughput(rec.wait(ids, WAIT_S))
    _sync(device)
    hits, misses, from_host, from_disk, host_s = counters.delta()
    r.hit_rate = hits / (hits + misses) if hits + misses else math.nan
    r.bytes_paged = from_host + from_disk
    r.h2d_gb_s = from_host / host_s / 1e9 if host_s > 0 else None
    if from_disk:
        r.notes.append(f"{from_disk} bytes came from disk (host tier too small?)")


def _throughput(tracks: list[Track]) -> float:
    start = min(t.submitted for t in tracks)
    end = max(t.token_times[-1] for t in tracks)
    tokens = sum(len(t.token_times) for t in tracks)
    return tokens / (end - start) if end > start else math.nan

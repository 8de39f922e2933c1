"""open_engine: Settings in, a built engine out, the one way every command gets there.

Order: device and dtype resolved (once, here) -> memory plan from config.json, logged and
checked before any weight is read -> expert store chosen (``--expert-cache all``: every
expert resident; otherwise the tiered cache with the plan's budgets, its host tier pinned now)
-> model loaded onto that store -> engine built (and started unless the caller starts it).
``Runtime.close`` shuts the engine down, then the store: the reverse order, so no request can
ask for an expert after the store's loader threads are gone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry

from expert_cache import TieredExpertCache
from expert_cache.base import ExpertCatalog, ExpertKey, ExpertStore
from expert_cache.resident import ResidentExpertStore
from server.engine.engine import Engine
from server.model.dtypes import torch_name
from server.model.loader import LoadedModel, load_model
from server.runtime.memory_plan import MemoryPlan, plan_memory
from server.runtime.settings import Settings, resolved_placement

log = logging.getLogger("emo_serve.runtime")


@dataclass
class Runtime:
    """A loaded model, its expert store and its engine, with the settings that made them."""

    settings: Settings
    model_dir: Path
    device: torch.device
    dtype: torch.dtype
    plan: MemoryPlan
    engine: Engine
    _closed: bool = field(default=False, repr=False)

    @property
    def loaded(self) -> LoadedModel:
        return self.engine.loaded

    @property
    def store(self) -> ExpertStore:
        return self.engine.loaded.model.expert_store

    @property
    def registry(self) -> CollectorRegistry:
        """The one Prometheus registry: the engine's and the expert cache's metrics."""
        return self.engine.registry

    def start(self) -> None:
        self.engine.start()

    def close(self, grace_s: float = 0.0) -> None:
        """Drain the engine (running requests get ``grace_s`` seconds), then close the store.
        Idempotent, so an error path and a ``with`` block may both call it."""
        if self._closed:
            return
        self._closed = True
        try:
            self.engine.shutdown(grace_s)
        finally:
            self.store.close()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_engine(settings: Settings, *, start: bool = True, registry: CollectorRegistry | None = None,
                before_disk_read: Callable[[ExpertKey], None] | None = None) -> Runtime:
    """Build the engine ``settings`` describe. ``settings.model`` must be set (the commands fill
    in the default model first). ``start`` False leaves the engine's thread to the caller (the
    HTTP app starts it in its lifespan, after pinning named pools). ``before_disk_read``: called
    before each expert read from the checkpoint (benchmarks emulate a slower disk with it).
    Raises PlanError (does not fit), CheckpointError, ValueError, OSError; nothing stays
    allocated when it raises."""
    if settings.model is None:
        raise ValueError("model: no checkpoint directory given")
    device, dtype = resolved_placement(settings)
    plan = plan_memory(settings, settings.model, device, dtype)
    log.info("%s", plan.describe())
    plan.check()
    registry = registry if registry is not None else CollectorRegistry()

    def make_store(catalog: ExpertCatalog) -> ExpertStore:
        if settings.resident_experts:
            return ResidentExpertStore(catalog, device)
        store = TieredExpertCache(catalog, device=device, device_budget_bytes=plan.expert_slot_bytes,
                                  host_budget_bytes=plan.host_cache_bytes, registry=registry,
                                  load_timeout_s=settings.engine.expert_load_timeout,
                                  before_disk_read=before_disk_read)
        try:
            # pin the host tier now: pinning GiB-sized blocks lazily would stall the first
            # requests on the engine thread
            store.allocate_host_tier()
        except BaseException:
            store.close()
            raise
        return store

    loaded = load_model(settings.model, device=device, dtype=dtype, expert_store_factory=make_store)
    try:
        engine = Engine(loaded, settings.engine, registry)
    except BaseException:
        loaded.model.expert_store.close()
        raise
    runtime = Runtime(settings, settings.model, device, dtype, plan, engine)
    mc = loaded.config
    log.info("loaded %s: %d layers, %s experts per layer, top-%d, vocab %d, %s on %s; default expert "
             "pool %s; max_model_len %d", settings.model, mc.num_layers, sorted(set(mc.num_experts)),
             mc.top_k, mc.vocab_size, torch_name(dtype), device, engine.default_pool, engine.max_model_len)
    if start:
        runtime.start()
    return runtime

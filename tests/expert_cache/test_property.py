"""Random acquire/release/prefetch sequences against a plain model of the two LRU tiers."""

from __future__ import annotations

from collections import Counter, OrderedDict
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from expert_cache import ExpertCatalog, ExpertKey, SlotsExhausted, TieredExpertCache
from tests.expert_cache.helpers import expected_parts, hand_catalog, same_bits, write_checkpoint

LAYERS, EXPERTS = 2, 4
KEYS = [(layer, e) for layer in range(LAYERS) for e in range(EXPERTS)]


class LruModel:
    """The cache's intended behaviour, written as plainly as possible."""

    def __init__(self, device_slots: int, host_slots: int) -> None:
        self.device_slots, self.host_slots = device_slots, host_slots
        self.resident: set[ExpertKey] = set()
        self.pins: Counter[ExpertKey] = Counter()
        self.lru: list[ExpertKey] = []  # resident unpinned keys, next victim first
        self.host: OrderedDict[ExpertKey, None] = OrderedDict()  # next host victim first
        self.counts = Counter[str]()

    def _load(self, key: ExpertKey) -> None:  # the host tier's side of a device load
        if key in self.host:
            self.counts["host_hits"] += 1
            self.host.move_to_end(key)
            return
        self.counts["host_misses"] += 1
        if self.host_slots:
            if len(self.host) == self.host_slots:
                self.host.popitem(last=False)
                self.counts["host_evictions"] += 1
            self.host[key] = None

    def _take_slot(self, protect: set[ExpertKey]) -> bool:
        if len(self.resident) < self.device_slots:
            return True
        victim = next((k for k in self.lru if k not in protect), None)
        if victim is None:
            return False
        self.lru.remove(victim)
        self.resident.discard(victim)
        self.counts["device_evictions"] += 1
        return True

    def acquire(self, keys: list[ExpertKey]) -> bool:
        distinct = list(dict.fromkeys(keys))
        if sum(k not in self.pins for k in distinct) > self.device_slots - len(self.pins):
            return False
        misses = [k for k in distinct if k not in self.resident]
        for k in distinct:
            if k in self.resident:
                self.counts["device_hits"] += 1
                if k in self.lru:
                    self.lru.remove(k)
        for k in misses:
            self.counts["device_misses"] += 1
            assert self._take_slot(set())
            self.resident.add(k)
        self.pins.update(keys)
        for k in misses:
            self._load(k)
        return True

    def release(self, keys: list[ExpertKey]) -> None:
        for k in keys:
            self.pins[k] -= 1
            if self.pins[k] == 0:
                del self.pins[k]
                self.lru.append(k)

    def prefetch(self, keys: list[ExpertKey]) -> None:
        distinct = list(dict.fromkeys(keys))
        loaded = []
        for k in distinct:
            if k in self.resident:
                if k in self.lru:
                    self.lru.remove(k)
                    self.lru.append(k)
                continue
            if not self._take_slot(set(distinct)):
                break
            self.resident.add(k)
            self.lru.append(k)
            loaded.append(k)
        for k in loaded:
            self._load(k)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[ExpertCatalog, dict[str, torch.Tensor]]:
    directory: Path = tmp_path_factory.mktemp("ckpt")
    tensors = write_checkpoint(directory, layers=LAYERS, experts=EXPERTS, dtype=torch.float16, shards=2)
    return hand_catalog(directory, torch.float16), tensors


key_lists = st.lists(st.sampled_from(KEYS), min_size=1, max_size=5)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("acquire"), key_lists),
        st.tuples(st.just("release"), st.integers(0, 10)),
        st.tuples(st.just("prefetch"), key_lists),
    ),
    max_size=25,
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    device_slots=st.integers(1, len(KEYS) + 2),
    host_slots=st.integers(0, len(KEYS) + 1),
    slack=st.floats(0, 0.99),
    ops=operations,
)
def test_cache_matches_lru_model(
    checkpoint: tuple[ExpertCatalog, dict[str, torch.Tensor]],
    device_slots: int,
    host_slots: int,
    slack: float,
    ops: list[tuple[str, object]],
) -> None:
    catalog, tensors = checkpoint
    eb = catalog.expert_bytes(0)
    device_budget, host_budget = int((device_slots + slack) * eb), int((host_slots + slack) * eb)
    cache = TieredExpertCache(
        catalog,
        device="cpu",
        device_budget_bytes=device_budget,
        host_budget_bytes=host_budget,
        background_prefetch=False,
    )
    try:
        cap = cache.capacity(0)
        assert cap == min(device_slots, len(KEYS)) and cache.stats().device.capacity_bytes <= device_budget
        assert cache.host_capacity(0) == min(host_slots, len(KEYS))
        model = LruModel(cap, cache.host_capacity(0))
        held: list[tuple[list[ExpertKey], list[int]]] = []
        for op, arg in ops:
            if op == "acquire":
                keys: list[ExpertKey] = arg  # type: ignore[assignment]
                should_fit = model.acquire(keys)
                try:
                    slots = cache.acquire(keys).tolist()
                except SlotsExhausted:
                    assert not should_fit, f"SlotsExhausted for {keys} though they fit"
                else:
                    assert should_fit, f"acquire {keys} succeeded though it cannot fit"
                    assert len(set(slots)) == len(set(keys)) and all(0 <= s < cap for s in slots)
                    held.append((keys, slots))
            elif op == "release" and held:
                keys, _ = held.pop(arg % len(held))  # type: ignore[operator]
                cache.release(keys)
                model.release(keys)
            elif op == "prefetch":
                cache.prefetch(arg)  # type: ignore[arg-type]
                model.prefetch(arg)  # type: ignore[arg-type]
            _check(cache, model, held, tensors, catalog)
    finally:
        cache.close()


def _check(
    cache: TieredExpertCache,
    model: LruModel,
    held: list[tuple[list[ExpertKey], list[int]]],
    tensors: dict[str, torch.Tensor],
    catalog: ExpertCatalog,
) -> None:
    s, eb, c = cache.stats(), catalog.expert_bytes(0), model.counts
    assert (s.device.hits, s.device.misses, s.device.evictions) == (
        c["device_hits"],
        c["device_misses"],
        c["device_evictions"],
    )
    assert (s.host.hits, s.host.misses, s.host.evictions) == (
        c["host_hits"],
        c["host_misses"],
        c["host_evictions"],
    )
    assert (
        s.bytes_loaded_from_disk == c["host_misses"] * eb and s.bytes_loaded_from_host == c["host_hits"] * eb
    )
    assert s.device.resident == len(model.resident) <= cache.capacity(0)
    assert s.pinned_slots == len(model.pins) and cache.free_slots(0) == cache.capacity(0) - len(model.pins)
    assert s.host.resident == len(model.host)
    assert {k for k in model.resident} == {k for k in KEYS if cache.is_resident(k)}
    assert cache.lru_order(0) == model.lru
    for keys, slots in held:  # pinned experts stay where they were, intact
        for key, slot in zip(keys, slots, strict=True):
            for part, want in expected_parts(tensors, key, catalog.dtype).items():
                assert same_bits(cache.slab(key[0])[part][slot], want), f"pinned {key} was overwritten"

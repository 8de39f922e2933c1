"""Engine-like threads acquiring and releasing while others read stats, scrape metrics and
prefetch: no exception, pinned experts intact, counters consistent."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry, generate_latest

from expert_cache import ExpertKey, SlotsExhausted, TieredExpertCache
from tests.expert_cache.helpers import expected_parts, hand_catalog, same_bits, write_checkpoint

LAYERS, EXPERTS = 3, 8


def _run_threads(targets: list[Callable[[], None]]) -> list[BaseException]:
    errors: list[BaseException] = []

    def wrap(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as e:  # reported by the test, not lost in the thread
                errors.append(e)

        return run

    threads = [threading.Thread(target=wrap(t)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
        assert not t.is_alive(), "a thread hung: deadlock?"
    return errors


def test_concurrent_engine_stats_and_prefetch(tmp_path: Path) -> None:
    tensors = write_checkpoint(
        tmp_path, layers=LAYERS, experts=EXPERTS, dtype=torch.bfloat16, hidden=16, inter=8
    )
    catalog = hand_catalog(tmp_path, torch.bfloat16)
    eb = catalog.expert_bytes(0)
    registry = CollectorRegistry()
    cache = TieredExpertCache(
        catalog, device="cpu", device_budget_bytes=6 * eb, host_budget_bytes=10 * eb, registry=registry
    )
    expected = {k: expected_parts(tensors, k, torch.bfloat16) for k in catalog.chunks}
    stop = threading.Event()
    acquired = {"engine": 0, "second": 0}
    exhausted = [0]

    def acquirer(name: str, seed: int, steps: int, pool_max: int) -> Callable[[], None]:
        def run() -> None:
            rng = random.Random(seed)
            for _ in range(steps):
                layer = rng.randrange(LAYERS)
                keys: list[ExpertKey] = [
                    (layer, rng.randrange(EXPERTS)) for _ in range(rng.randint(1, pool_max))
                ]
                try:
                    slots = cache.acquire(keys).tolist()
                except SlotsExhausted:
                    exhausted[0] += 1
                    continue
                acquired[name] += len(set(keys))
                slab = cache.slab(layer)
                for key, slot in zip(keys, slots, strict=True):
                    for part, want in expected[key].items():
                        assert same_bits(slab[part][slot], want), f"{name}: {key} wrong in slot {slot}"
                cache.release(keys)
            stop.set()

        return run

    def reader() -> None:
        last = 0
        while not stop.is_set():
            s = cache.stats()
            assert s.device.resident <= s.capacity_slots and s.pinned_slots <= s.capacity_slots
            assert s.device.resident_bytes <= s.device.capacity_bytes <= 6 * eb
            assert s.host.resident_bytes <= s.host.capacity_bytes <= 10 * eb
            assert s.device.hits + s.device.misses >= last
            last = s.device.hits + s.device.misses
            assert b"emo_serve_expert_cache_hits_total" in generate_latest(registry)

    def prefetcher() -> None:
        rng = random.Random(7)
        while not stop.is_set():
            layer = rng.randrange(LAYERS)
            cache.prefetch([(layer, rng.randrange(EXPERTS)) for _ in range(rng.randint(1, 6))])
            cache.wait_for_prefetch(timeout=10)

    errors = _run_threads([acquirer("engine", 1, 300, 4), acquirer("second", 2, 300, 3), reader, prefetcher])
    assert not errors, errors
    # SlotsExhausted is a legal answer under contention, not a way through: both threads got
    # most of their acquires (6 slots, at most 4 + 3 distinct keys pinned at once)
    assert acquired["engine"] > 0 and acquired["second"] > 0
    assert exhausted[0] < 300, f"{exhausted[0]} of 600 acquires raised SlotsExhausted"
    assert cache.wait_for_prefetch(timeout=30)
    s = cache.stats()
    assert s.pinned_slots == 0 and cache.free_slots(0) == cache.capacity(0) == 6
    assert s.device.hits + s.device.misses == acquired["engine"] + acquired["second"]
    device_loads = s.host.hits + s.host.misses  # every device load asked the host tier once
    assert device_loads >= s.device.misses
    assert s.device.resident == device_loads - s.device.evictions
    assert s.bytes_loaded_from_disk == s.host.misses * eb and s.bytes_loaded_from_host == s.host.hits * eb
    assert s.host.resident == s.host.misses - s.host.evictions
    cache.close()


class _GatedReads:
    """Wraps DiskReader.read_into: the first read of ``key`` blocks until released, then
    either proceeds or fails."""

    def __init__(self, cache: TieredExpertCache, key: ExpertKey) -> None:
        self.key, self.started, self.go = key, threading.Event(), threading.Event()
        self.fail_first = False
        reader = cache._loader.disk  # the one object that touches the files
        self._read = reader.read_into
        self._gated = False
        reader.read_into = self  # type: ignore[method-assign]

    def __call__(
        self, key: ExpertKey, dest: dict[str, torch.Tensor], raw: Callable[[int], torch.Tensor]
    ) -> int:
        if key == self.key and not self._gated:
            self._gated = True
            self.started.set()
            assert self.go.wait(timeout=30)
            if self.fail_first:
                raise OSError("injected read failure")
        return self._read(key, dest, raw)


def _wait_until(cond: Callable[[], bool]) -> None:
    for _ in range(3000):
        if cond():
            return
        threading.Event().wait(0.01)
    raise AssertionError("condition never became true")


def _acquire_in_thread(cache: TieredExpertCache, key: ExpertKey, out: list[object]) -> threading.Thread:
    def run() -> None:
        try:
            out.append(cache.acquire([key]).tolist())
        except BaseException as e:
            out.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_acquire_waits_for_a_slot_a_prefetch_is_filling(tmp_path: Path) -> None:
    tensors = write_checkpoint(tmp_path, dtype=torch.float32)
    catalog = hand_catalog(tmp_path, torch.float32)
    key = (1, 3)
    with TieredExpertCache(
        catalog, device="cpu", device_budget_bytes=3 * catalog.expert_bytes(0), host_budget_bytes=0
    ) as cache:
        gate = _GatedReads(cache, key)
        cache.prefetch([key])
        assert gate.started.wait(timeout=30)
        assert not cache.is_resident(key)  # mapped, but not readable yet
        out: list[object] = []
        thread = _acquire_in_thread(cache, key, out)
        _wait_until(lambda: cache.stats().pinned_slots == 1)  # pinned, now waiting for the fill
        assert not out
        gate.go.set()
        thread.join(timeout=30)
        assert isinstance(out[0], list), out
        slot = out[0][0]
        for part, want in expected_parts(tensors, key, torch.float32).items():
            assert same_bits(cache.slab(1)[part][slot], want)
        s = cache.stats()
        assert (s.device.hits, s.device.misses, s.host.misses) == (1, 0, 1)
        cache.release([key])


def test_failed_prefetch_is_refilled_by_the_waiting_acquire(tmp_path: Path) -> None:
    tensors = write_checkpoint(tmp_path, dtype=torch.float16)
    catalog = hand_catalog(tmp_path, torch.float16)
    key = (0, 2)
    with TieredExpertCache(
        catalog, device="cpu", device_budget_bytes=2 * catalog.expert_bytes(0), host_budget_bytes=0
    ) as cache:
        gate = _GatedReads(cache, key)
        gate.fail_first = True
        cache.prefetch([key])
        assert gate.started.wait(timeout=30)
        out: list[object] = []
        thread = _acquire_in_thread(cache, key, out)
        _wait_until(lambda: cache.stats().pinned_slots == 1)
        gate.go.set()  # the prefetch's read fails; the pinned slot goes STALE and is refilled
        thread.join(timeout=30)
        assert isinstance(out[0], list), out
        for part, want in expected_parts(tensors, key, torch.float16).items():
            assert same_bits(cache.slab(0)[part][out[0][0]], want)
        cache.release([key])
        assert cache.is_resident(key) and cache.stats().pinned_slots == 0


def test_failed_unpinned_prefetch_frees_its_slot(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, dtype=torch.float16)
    catalog = hand_catalog(tmp_path, torch.float16)
    with TieredExpertCache(
        catalog, device="cpu", device_budget_bytes=2 * catalog.expert_bytes(0), host_budget_bytes=0
    ) as cache:
        gate = _GatedReads(cache, (0, 1))
        gate.fail_first = True
        gate.go.set()
        cache.prefetch([(0, 1)])  # fails in the loader thread: logged, not raised
        assert cache.wait_for_prefetch(timeout=30)
        assert not cache.is_resident((0, 1)) and cache.stats().device.resident == 0
        cache.acquire([(0, 1), (0, 2)])  # both slots are usable again
        cache.release([(0, 1), (0, 2)])

"""Scheduler: admission by KV slots and by device expert slots, preference for resident pools,
bounded wait, prefill/decode interleaving, back-off and the loading states.

Sequences are built from token ids alone: no model, no tokenizer, no sampler. The expert store
is a real tiered cache over a tiny per-expert checkpoint written to tmp (4 MoE layers of 31
routable experts, as the tiny EMO preset has), and pins are taken on it as the model runner
would take them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from expert_cache import TieredExpertCache
from expert_cache.base import ExpertKey
from expert_cache.catalog import per_expert_catalog
from expert_cache.safetensors_index import SafetensorsIndex
from server.engine.kv_slots import KVSlotAllocator
from server.engine.pool_budget import PoolBudget, PoolPredictor
from server.engine.scheduler import Decode, Prefill, Scheduler, SchedulerConfig, Step
from server.engine.sequence import SeqStatus, Sequence
from tests.expert_cache.helpers import write_checkpoint

LAYERS = 4
EXPERTS = 31  # routable experts per layer: 124 in all
CAPACITY = 24  # device expert slots shared by the 4 MoE layers
RESERVE = 3  # what full routing keeps free (the tiny preset's top_k 4 minus 1 shared expert)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("experts")
    write_checkpoint(directory, layers=LAYERS, experts=EXPERTS, hidden=8, inter=4, dtype=torch.float32,
                     extra=False)
    return directory


@pytest.fixture()
def store(checkpoint: Path) -> Iterator[TieredExpertCache]:
    catalog = per_expert_catalog(SafetensorsIndex.from_directory(checkpoint))
    cache = TieredExpertCache(catalog, device=torch.device("cpu"),
                              device_budget_bytes=CAPACITY * catalog.expert_bytes(0),
                              host_budget_bytes=0, background_prefetch=False)
    yield cache
    cache.close()


def budget_of(store: TieredExpertCache) -> PoolBudget:
    return PoolBudget(store, range(LAYERS), RESERVE, LAYERS * EXPERTS)


def make(store: TieredExpertCache, kv_slots: int = 8, max_seqs: int = 8, max_wait: int = 100) -> Scheduler:
    assert store.capacity(0) == CAPACITY
    return Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_wait_steps=max_wait),
                     KVSlotAllocator(kv_slots), budget_of(store))


def seq(rid: str, pool: int | None, predicted: list[ExpertKey] | None = None) -> Sequence:
    s = Sequence(rid, [5, 6, 7], max_tokens=4, pool_size=pool)
    s.predicted_keys = predicted
    return s


def step(sch: Scheduler) -> Step | None:
    """``schedule()``, with a prefill it picks run to completion at once (the core does it over
    several steps, then calls ``prefilled``)."""
    picked = sch.schedule()
    if isinstance(picked, Prefill):
        sch.prefilled(picked.seq)
    return picked


def pool_keys(first: int, size: int) -> list[ExpertKey]:
    return [(layer, e) for layer in range(LAYERS) for e in range(first, first + size)]


def pin(store: TieredExpertCache, s: Sequence, first: int) -> None:
    """What prefill with pin_pool=True does: pin the sequence's pool for its lifetime."""
    assert s.pool_size is not None
    s.pinned = pool_keys(first, s.pool_size)
    for layer in range(LAYERS):
        store.acquire([k for k in s.pinned if k[0] == layer])


def unpin(store: TieredExpertCache, s: Sequence) -> None:
    for layer in range(LAYERS):
        store.release([k for k in s.pinned if k[0] == layer])
    s.pinned = []


def test_admission_is_bounded_by_kv_slots(store: TieredExpertCache) -> None:
    sch = make(store, kv_slots=2)
    a, b, c = (seq(r, None) for r in "abc")
    for s in (a, b, c):
        sch.add(s)
    assert step(sch) == Prefill(a)
    assert step(sch) == Decode([a])  # never two prefills in a row while decoding
    assert step(sch) == Prefill(b)
    for _ in range(3):
        assert step(sch) == Decode([a, b])  # c waits: no KV slot
    assert sch.kv.usage == 1.0 and sch.waiting == [c]
    sch.finish(a)
    assert step(sch) == Prefill(c)
    assert sch.kv.num_used == 2


def test_admission_is_bounded_by_max_num_seqs(store: TieredExpertCache) -> None:
    sch = make(store, kv_slots=8, max_seqs=1)
    a, b = seq("a", None), seq("b", None)
    sch.add(a)
    sch.add(b)
    assert step(sch) == Prefill(a)
    assert [step(sch) for _ in range(2)] == [Decode([a]), Decode([a])]


def test_pool_admission_needs_free_expert_slots(store: TieredExpertCache) -> None:
    sch = make(store)
    a, b, full = seq("a", 4), seq("b", 3), seq("full", None)
    sch.add(a)
    assert step(sch) == Prefill(a)
    pin(store, a, 0)  # 16 of 24 slots pinned
    assert store.free_slots(0) == 8
    sch.add(b)  # needs 12
    sch.add(full)  # needs the reserve only
    assert step(sch) == Decode([a])
    assert step(sch) == Prefill(full)
    for _ in range(4):
        assert step(sch) == Decode([a, full])
    unpin(store, a)
    sch.finish(a)
    # 24 free; b needs 12 and keeps the reserve for the running full-routing request
    assert step(sch) == Prefill(b)


def test_predicted_experts_already_pinned_cost_no_free_slot(store: TieredExpertCache) -> None:
    """Pins are shared per key: a request predicted to reuse a running request's pool is
    admitted although the free slots alone could not hold a disjoint pool."""
    sch = make(store)
    a = seq("a", 4)
    sch.add(a)
    assert step(sch) == Prefill(a)
    pin(store, a, 0)  # 16 of 24 pinned, 8 free: a disjoint pool of 4 x 4 layers cannot fit
    same = seq("same", 4, predicted=pool_keys(0, 4))
    other = seq("other", 4, predicted=pool_keys(8, 4))
    sch.add(other)
    assert step(sch) == Decode([a])
    assert step(sch) == Decode([a])  # other waits: its pool is disjoint
    sch.add(same)
    assert step(sch) == Prefill(same)


def test_full_routing_keeps_a_reserve(store: TieredExpertCache) -> None:
    sch = make(store)
    big = seq("big", 6)  # 24 slots: all of them
    sch.add(big)
    assert step(sch) == Prefill(big)
    pin(store, big, 0)
    full = seq("full", None)
    sch.add(full)
    assert [step(sch) for _ in range(3)] == [Decode([big])] * 3
    unpin(store, big)
    sch.finish(big)
    assert step(sch) == Prefill(full)
    sch.add(seq("big2", 6))  # 24 would leave no reserve for the running full request
    assert [step(sch) for _ in range(3)] == [Decode([full])] * 3


def test_pool_that_can_never_fit_is_named_with_numbers(store: TieredExpertCache) -> None:
    budget = budget_of(store)
    assert budget.misfit(6) is None
    why = budget.misfit(7)
    assert why is not None and "28" in why and "24" in why and "pool <= 6" in why


def test_resident_predicted_pool_goes_first(store: TieredExpertCache) -> None:
    warm = pool_keys(0, 3)
    for layer in range(LAYERS):  # load then unpin: resident, evictable
        keys = [k for k in warm if k[0] == layer]
        store.acquire(keys)
        store.release(keys)
    assert all(store.is_resident(k) for k in warm)
    sch = make(store)
    cold = seq("cold", 3, predicted=pool_keys(10, 3))
    hot = seq("hot", 3, predicted=warm)
    unknown = seq("unknown", 3)
    for s in (cold, unknown, hot):
        sch.add(s)
    assert step(sch) == Prefill(hot)
    step(sch)
    # no prediction: scored by the mean residency (12 of 124 experts), which beats a cold pool
    assert step(sch) == Prefill(unknown)
    step(sch)
    assert step(sch) == Prefill(cold)


def test_waiting_is_bounded(store: TieredExpertCache) -> None:
    sch = make(store, max_wait=2)
    x = seq("x", 3)
    sch.add(x)
    assert step(sch) == Prefill(x)
    pin(store, x, 0)  # 12 pinned
    big = seq("big", 6)  # needs all 24
    sch.add(big)
    s1 = seq("s1", 3)
    sch.add(s1)
    step(sch)  # decode
    assert step(sch) == Prefill(s1)  # big does not fit yet; s1 does and is not held back
    pin(store, s1, 20)
    step(sch)
    unpin(store, s1)
    sch.finish(s1)
    s2 = seq("s2", 3)
    sch.add(s2)
    steps = [step(sch) for _ in range(8)]
    assert all(isinstance(st, Decode) for st in steps)  # big is overdue: s2 may not overtake it
    assert big.waited_steps > 2 and s2 in sch.waiting
    unpin(store, x)
    sch.finish(x)
    assert step(sch) == Prefill(big)


def test_requeue_pauses_pool_admission_until_a_finish(store: TieredExpertCache) -> None:
    sch = make(store)
    a, b = seq("a", 3), seq("b", 3)
    sch.add(a)
    sch.add(b)
    assert step(sch) == Prefill(a)
    step(sch)
    assert step(sch) == Prefill(b)
    sch.requeue(b, block_pools=True)  # its prefill hit SlotsExhausted
    assert b.slot is None and sch.waiting == [b] and sch.kv.num_used == 1
    assert [step(sch) for _ in range(3)] == [Decode([a])] * 3
    sch.finish(a)
    assert step(sch) == Prefill(b)


def test_predictor_uses_the_most_similar_recent_prompt() -> None:
    p = PoolPredictor(min_similarity=0.3)
    p.observe([1, 2, 3, 4, 5], [[7, 8], [9]])
    p.observe([10, 11, 12, 13], [[1, 2], [3]])
    assert p.predict([1, 2, 3, 4, 6]) == [(0, 7), (0, 8), (1, 9)]
    assert p.predict([10, 11, 12, 99]) == [(0, 1), (0, 2), (1, 3)]
    assert p.predict([50, 51, 52]) is None


def test_loading_prefills_are_skipped_and_decoding_goes_on(store: TieredExpertCache) -> None:
    sch = make(store)
    a, b = seq("a", 3), seq("b", 3)
    sch.add(a)
    assert step(sch) == Prefill(a)
    sch.add(b)
    assert sch.schedule() == Decode([a])
    assert sch.schedule() == Prefill(b)  # admitted; its first piece
    b.status = SeqStatus.LOADING  # what the core does while a loader thread pins its layer
    assert sch.num_loading == 1 and sch.num_running == 2
    assert [sch.schedule() for _ in range(4)] == [Decode([a])] * 4
    sch.finish(a)
    assert sch.schedule() is None  # b is loading and nothing else can run
    b.status = SeqStatus.PREFILLING
    assert sch.schedule() == Prefill(b)


def test_admission_counts_the_layers_prefilling_requests_will_pin(store: TieredExpertCache) -> None:
    sch = make(store)
    a, b = seq("a", 4), seq("b", 3)
    sch.add(a)
    assert sch.schedule() == Prefill(a)  # prefilling: nothing pinned yet, 16 slots to come
    a.status = SeqStatus.LOADING
    sch.add(b)  # needs 12: 24 free on the store, but only 8 once a's layers are counted
    assert sch.schedule() is None and sch.waiting == [b]
    a.pinned = pool_keys(0, 4)[:4]  # a's layer 0 pinned (as the loader would): 12 still to come
    store.acquire(a.pinned)
    assert sch.schedule() is None and sch.waiting == [b]
    a.status = SeqStatus.PREFILLING
    assert sch.schedule() == Prefill(a)  # a goes on; b still waits
    a.status = SeqStatus.LOADING
    store.release(a.pinned)
    a.pinned = []
    sch.finish(a)
    assert sch.schedule() == Prefill(b)


def test_full_rows_decode_apart_when_the_tier_can_miss(store: TieredExpertCache) -> None:
    budget = budget_of(store)
    assert budget.can_miss
    sch = Scheduler(SchedulerConfig(separate_full_rows=True), KVSlotAllocator(8), budget)
    p, f = seq("p", 3), seq("f", None)
    for s in (p, f):
        sch.add(s)
    step(sch)
    step(sch)
    step(sch)
    assert sch.running == [p, f]
    steps = [sch.schedule() for _ in range(4)]
    assert steps in ([Decode([f]), Decode([p])] * 2, [Decode([p]), Decode([f])] * 2)


def test_a_sequence_is_token_ids_and_limits() -> None:
    s = Sequence("r", [11, 12, 13], max_tokens=2, pool_size=None)
    assert (s.status, s.slot, s.is_pool) == (SeqStatus.WAITING, None, False)
    assert (s.num_tokens, s.last_token) == (3, 13)
    s.output_ids.append(40)  # what the core appends after sampling
    assert (s.num_tokens, s.last_token) == (4, 40)  # decode feeds token 40 at position 3
    assert s.pool_lists() == []
    s.pools = [torch.tensor([3, 1]), None]
    assert Sequence("p", [1], 1, pool_size=2).is_pool and s.pool_lists() == [[3, 1], []]


def test_a_backed_off_prefill_frees_its_kv_slot_and_goes_first(store: TieredExpertCache) -> None:
    """A requeued prefill (its pool did not fit) gives its KV slot back and is next in line;
    the pause of pool admission does not hold back full-routing requests."""
    sch = make(store, kv_slots=2)
    a, b, c = seq("a", None), seq("b", 3), seq("c", None)
    for s in (a, b, c):
        sch.add(s)
    assert step(sch) == Prefill(a)
    step(sch)
    assert sch.schedule() == Prefill(b)  # admitted; its prefill starts
    assert sch.kv.num_free == 0 and b.slot is not None
    assert sch.schedule() == Decode([a])
    assert sch.schedule() == Prefill(b) and sch.waiting == [c]  # b's next piece; c: no KV slot
    sch.requeue(b, block_pools=True)
    assert (b.slot, b.status, sch.kv.num_free, sch.waiting) == (None, SeqStatus.WAITING, 1, [b, c])
    assert sch.schedule() == Decode([a])  # decode between two prefill pieces
    assert sch.schedule() == Prefill(c)  # b is a pool request: paused; c is not
    assert sch.kv.num_free == 0 and sch.waiting == [b]
    sch.prefilled(c)
    sch.finish(a)  # a running request ends: its pins may have been what b lacked
    assert sch.schedule() == Decode([c])
    assert sch.schedule() == Prefill(b)


def test_a_loading_prefill_holds_its_kv_slot_until_it_finishes(store: TieredExpertCache) -> None:
    sch = make(store, kv_slots=1)
    a, b = seq("a", 3), seq("b", 3)
    sch.add(a)
    sch.add(b)
    assert sch.schedule() == Prefill(a)
    a.status = SeqStatus.LOADING
    assert [sch.schedule() for _ in range(3)] == [None] * 3  # b: no KV slot; a: loading
    assert sch.waiting == [b] and sch.num_loading == 1 and b.waited_steps == 4
    sch.finish(a)  # e.g. aborted while loading
    assert (a.status, a.slot, sch.num_loading) == (SeqStatus.FINISHED, None, 0)
    assert sch.schedule() == Prefill(b)
    assert b.slot == 0


def test_finishing_a_waiting_sequence_takes_no_kv_slot(store: TieredExpertCache) -> None:
    sch = make(store, kv_slots=1)
    a, b = seq("a", None), seq("b", None)
    sch.add(a)
    sch.add(b)
    assert step(sch) == Prefill(a)
    sch.finish(b)  # aborted before admission
    assert (b.status, b.slot, sch.waiting, sch.kv.num_used, a.slot) == (SeqStatus.FINISHED, None, [], 1, 0)
    sch.finish(a)
    assert sch.kv.num_free == 1 and sch.schedule() is None


def test_pools_pinned_for_the_servers_life_count_for_pools_that_share_them(store: TieredExpertCache) -> None:
    """--pin-pools: slots held by a resident pool are not free for anyone, but a request whose
    pool is (predicted to be) that pool needs no slot for it."""
    sch = make(store)
    resident = pool_keys(0, 4)  # 16 of 24 slots
    for layer in range(LAYERS):
        store.acquire([k for k in resident if k[0] == layer])
    sch.budget.resident = frozenset(resident)
    other = seq("other", 4, predicted=pool_keys(8, 4))  # 16 more: only 8 free
    named = seq("named", 4, predicted=resident)
    sch.add(other)
    assert [sch.schedule() for _ in range(2)] == [None, None]
    sch.add(named)
    assert sch.schedule() == Prefill(named)
    why = sch.budget.misfit(4, pool_keys(8, 4))
    assert why is not None and "16 of them held by pinned pools" in why and "pool <= 2" in why
    assert sch.budget.misfit(4, resident) is None

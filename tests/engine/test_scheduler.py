"""Scheduler: admission by KV slots and by device expert slots, preference for resident pools,
bounded wait, prefill/decode interleaving. Runs against the real tiered expert cache over the
tiny synthetic checkpoint (pins are taken on it as the model runner would)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from expert_cache import TieredExpertCache
from expert_cache.base import ExpertKey
from server.engine.detokenizer import Detokenizer
from server.engine.kv_slots import KVSlotAllocator
from server.engine.pool_budget import PoolBudget, PoolPredictor
from server.engine.request import GenerationRequest, SamplingParams
from server.engine.sampler import SamplingState
from server.engine.scheduler import Decode, Prefill, Scheduler, SchedulerConfig, Step
from server.engine.sequence import SeqStatus, Sequence
from server.model.loader import LoadedModel, load_model

CAPACITY = 24  # device expert slots shared by the 4 MoE layers of the tiny preset
RESERVE = 3  # top_k 4 minus 1 shared expert


@pytest.fixture(scope="module")
def loaded(tiny_emo_checkpoint: Path) -> LoadedModel:
    return load_model(tiny_emo_checkpoint, device="cpu", dtype="fp32")


@pytest.fixture()
def store(loaded: LoadedModel) -> Iterator[TieredExpertCache]:
    cache = TieredExpertCache(loaded.catalog, device=torch.device("cpu"),
                              device_budget_bytes=CAPACITY * loaded.catalog.expert_bytes(0),
                              host_budget_bytes=0, background_prefetch=False)
    yield cache
    cache.close()


def make(loaded: LoadedModel, store: TieredExpertCache, kv_slots: int = 8, max_seqs: int = 8,
         max_wait: int = 100) -> Scheduler:
    assert store.capacity(0) == CAPACITY
    budget = PoolBudget(store, loaded.config.moe_layers, RESERVE, len(loaded.catalog.chunks))
    return Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_wait_steps=max_wait),
                     KVSlotAllocator(kv_slots), budget)


def seq(loaded: LoadedModel, rid: str, pool: int | None,
        predicted: list[ExpertKey] | None = None) -> Sequence:
    req = GenerationRequest(rid, [5, 6, 7], SamplingParams(max_tokens=4, temperature=0.0),
                            expert_pool=pool if pool is not None else "full")
    s = Sequence(request=req, on_output=lambda out: None, pool_size=pool,
                 sampling=SamplingState(req.sampling, req.prompt_token_ids, 2048, torch.device("cpu")),
                 detok=Detokenizer(loaded.tokenizer.tokenizer, [], skip_special_tokens=True, stop=()))
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
    return [(layer, e) for layer in range(4) for e in range(first, first + size)]


def pin(store: TieredExpertCache, s: Sequence, first: int) -> None:
    """What prefill with pin_pool=True does: pin the sequence's pool for its lifetime."""
    assert s.pool_size is not None
    s.pinned = pool_keys(first, s.pool_size)
    for layer in range(4):
        store.acquire([k for k in s.pinned if k[0] == layer])


def unpin(store: TieredExpertCache, s: Sequence) -> None:
    for layer in range(4):
        store.release([k for k in s.pinned if k[0] == layer])
    s.pinned = []


def test_admission_is_bounded_by_kv_slots(loaded: LoadedModel, store: TieredExpertCache) -> None:
    sch = make(loaded, store, kv_slots=2)
    a, b, c = (seq(loaded, r, None) for r in "abc")
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


def test_admission_is_bounded_by_max_num_seqs(loaded: LoadedModel, store: TieredExpertCache) -> None:
    sch = make(loaded, store, kv_slots=8, max_seqs=1)
    a, b = seq(loaded, "a", None), seq(loaded, "b", None)
    sch.add(a)
    sch.add(b)
    assert step(sch) == Prefill(a)
    assert [step(sch) for _ in range(2)] == [Decode([a]), Decode([a])]


def test_pool_admission_needs_free_expert_slots(loaded: LoadedModel, store: TieredExpertCache) -> None:
    sch = make(loaded, store)
    a, b, full = seq(loaded, "a", 4), seq(loaded, "b", 3), seq(loaded, "full", None)
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


def test_predicted_experts_already_pinned_cost_no_free_slot(loaded: LoadedModel,
                                                          store: TieredExpertCache) -> None:
    """Pins are shared per key: a request predicted to reuse a running request's pool is
    admitted although the free slots alone could not hold a disjoint pool."""
    sch = make(loaded, store)
    a = seq(loaded, "a", 4)
    sch.add(a)
    assert step(sch) == Prefill(a)
    pin(store, a, 0)  # 16 of 24 pinned, 8 free: a disjoint pool of 4 x 4 layers cannot fit
    same = seq(loaded, "same", 4, predicted=pool_keys(0, 4))
    other = seq(loaded, "other", 4, predicted=pool_keys(8, 4))
    sch.add(other)
    assert step(sch) == Decode([a])
    assert step(sch) == Decode([a])  # other waits: its pool is disjoint
    sch.add(same)
    assert step(sch) == Prefill(same)


def test_full_routing_keeps_a_reserve(loaded: LoadedModel, store: TieredExpertCache) -> None:
    sch = make(loaded, store)
    big = seq(loaded, "big", 6)  # 24 slots: all of them
    sch.add(big)
    assert step(sch) == Prefill(big)
    pin(store, big, 0)
    full = seq(loaded, "full", None)
    sch.add(full)
    assert [step(sch) for _ in range(3)] == [Decode([big])] * 3
    unpin(store, big)
    sch.finish(big)
    assert step(sch) == Prefill(full)
    sch.add(seq(loaded, "big2", 6))  # 24 would leave no reserve for the running full request
    assert [step(sch) for _ in range(3)] == [Decode([full])] * 3


def test_pool_that_can_never_fit_is_named_with_numbers(loaded: LoadedModel, store: TieredExpertCache) -> None:
    budget = PoolBudget(store, loaded.config.moe_layers, RESERVE, len(loaded.catalog.chunks))
    assert budget.misfit(6) is None
    why = budget.misfit(7)
    assert why is not None and "28" in why and "24" in why and "pool <= 6" in why


def test_resident_predicted_pool_goes_first(loaded: LoadedModel, store: TieredExpertCache) -> None:
    warm = pool_keys(0, 3)
    for layer in range(4):  # load then unpin: resident, evictable
        keys = [k for k in warm if k[0] == layer]
        store.acquire(keys)
        store.release(keys)
    assert all(store.is_resident(k) for k in warm)
    sch = make(loaded, store)
    cold = seq(loaded, "cold", 3, predicted=pool_keys(10, 3))
    hot = seq(loaded, "hot", 3, predicted=warm)
    unknown = seq(loaded, "unknown", 3)
    for s in (cold, unknown, hot):
        sch.add(s)
    assert step(sch) == Prefill(hot)
    step(sch)
    # no prediction: scored by the mean residency (12 of 124 experts), which beats a cold pool
    assert step(sch) == Prefill(unknown)
    step(sch)
    assert step(sch) == Prefill(cold)


def test_waiting_is_bounded(loaded: LoadedModel, store: TieredExpertCache) -> None:
    sch = make(loaded, store, max_wait=2)
    x = seq(loaded, "x", 3)
    sch.add(x)
    assert step(sch) == Prefill(x)
    pin(store, x, 0)  # 12 pinned
    big = seq(loaded, "big", 6)  # needs all 24
    sch.add(big)
    s1 = seq(loaded, "s1", 3)
    sch.add(s1)
    step(sch)  # decode
    assert step(sch) == Prefill(s1)  # big does not fit yet; s1 does and is not held back
    pin(store, s1, 20)
    step(sch)
    unpin(store, s1)
    sch.finish(s1)
    s2 = seq(loaded, "s2", 3)
    sch.add(s2)
    steps = [step(sch) for _ in range(8)]
    assert all(isinstance(st, Decode) for st in steps)  # big is overdue: s2 may not overtake it
    assert big.waited_steps > 2 and s2 in sch.waiting
    unpin(store, x)
    sch.finish(x)
    assert step(sch) == Prefill(big)


def test_requeue_pauses_pool_admission_until_a_finish(loaded: LoadedModel, store: TieredExpertCache) -> None:
    sch = make(loaded, store)
    a, b = seq(loaded, "a", 3), seq(loaded, "b", 3)
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


def test_loading_prefills_are_skipped_and_decoding_goes_on(loaded: LoadedModel,
                                                           store: TieredExpertCache) -> None:
    sch = make(loaded, store)
    a, b = seq(loaded, "a", 3), seq(loaded, "b", 3)
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


def test_admission_counts_the_layers_prefilling_requests_will_pin(loaded: LoadedModel,
                                                                 store: TieredExpertCache) -> None:
    sch = make(loaded, store)
    a, b = seq(loaded, "a", 4), seq(loaded, "b", 3)
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


def test_full_rows_decode_apart_when_the_tier_can_miss(loaded: LoadedModel, store: TieredExpertCache) -> None:
    budget = PoolBudget(store, loaded.config.moe_layers, RESERVE, len(loaded.catalog.chunks))
    assert budget.can_miss
    sch = Scheduler(SchedulerConfig(separate_full_rows=True), KVSlotAllocator(8), budget)
    p, f = seq(loaded, "p", 3), seq(loaded, "f", None)
    for s in (p, f):
        sch.add(s)
    step(sch)
    step(sch)
    step(sch)
    assert sch.running == [p, f]
    steps = [sch.schedule() for _ in range(4)]
    assert steps in ([Decode([f]), Decode([p])] * 2, [Decode([p]), Decode([f])] * 2)

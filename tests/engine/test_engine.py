"""The engine on the tiny synthetic model: batching does not change results, stops, logprobs,
pools, usage, paging through a small device tier, metrics."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry

from expert_cache import TieredExpertCache
from expert_cache.base import ExpertCatalog, ExpertStore
from server.engine.engine import Engine
from server.engine.request import GenerationRequest, SamplingParams, TokenLogprob
from server.model.loader import LoadedModel, load_model
from server.tools.synth import planted_experts
from tests.engine.conftest import Collector, EngineFactory, greedy, prompt_ids, run_all

POOLS: list[int | str | None] = [3, 8, "full", 16, None, 31]
MAX_TOKENS = [5, 14, 20, 9, 17, 11]


def mixed_requests(loaded: LoadedModel, tag: str) -> list[GenerationRequest]:
    return [GenerationRequest(f"{tag}{i}", prompt_ids(loaded, i % 4, 3 + 4 * i, seed=i), greedy(n),
                              expert_pool=pool, return_expert_pool=True)  # type: ignore[arg-type]
            for i, (pool, n) in enumerate(zip(POOLS, MAX_TOKENS, strict=True))]


def test_batched_decode_equals_one_at_a_time(loaded: LoadedModel, make_engine: EngineFactory) -> None:
    alone = run_all(make_engine(max_num_seqs=1), mixed_requests(loaded, "a"))
    batched_engine = make_engine(max_num_seqs=8)
    batched = run_all(batched_engine, mixed_requests(loaded, "b"))
    for i, n in enumerate(MAX_TOKENS):
        assert len(alone.tokens(f"a{i}")) == n
        assert batched.tokens(f"b{i}") == alone.tokens(f"a{i}")
        assert batched.text(f"b{i}") == alone.text(f"a{i}")
        assert batched.last(f"b{i}").expert_pool == alone.last(f"a{i}").expert_pool
        assert batched.last(f"b{i}").finish_reason == "length"
    pools = {i: batched.last(f"b{i}").expert_pool for i in range(len(POOLS))}
    assert pools[0] is not None and [len(ids) for ids in pools[0]["experts"]] == [3, 3, 3, 3]  # type: ignore[arg-type,index]
    assert pools[4] is not None and pools[4]["size"] == 8  # the model default: ceil(31 / 4)
    assert pools[2] == {"size": "full", "experts": []}
    assert batched_engine.kv_usage == 0.0 and loaded.model.expert_store.stats().pinned_slots == 0


def test_seeded_sampling_does_not_depend_on_the_batch(loaded: LoadedModel,
                                                      make_engine: EngineFactory) -> None:
    def req(rid: str, seed: int, i: int = 0) -> GenerationRequest:
        sp = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=seed, ignore_eos=True)
        return GenerationRequest(rid, prompt_ids(loaded, i % 4, 6 + i, seed=i), sp, expert_pool=8)

    alone = run_all(make_engine(max_num_seqs=1), [req("x", 42)])
    crowd = [req(f"o{i}", 100 + i, i) for i in range(1, 4)]
    together = run_all(make_engine(max_num_seqs=4), [crowd[0], req("x", 42), *crowd[1:]])
    assert together.tokens("x") == alone.tokens("x")
    other_seed = run_all(make_engine(max_num_seqs=1), [req("x", 43)])
    assert other_seed.tokens("x") != alone.tokens("x")


def test_stop_token_stop_string_and_eos(loaded: LoadedModel, make_engine: EngineFactory) -> None:
    engine = make_engine(max_num_seqs=4)
    ids = prompt_ids(loaded, 1, 8, seed=3)
    ref = run_all(engine, [GenerationRequest("ref", ids, greedy(12))])
    tokens, text = ref.tokens("ref"), ref.text("ref")
    stop_tok = tokens[4]
    k = tokens.index(stop_tok)
    words = text.split(" ")
    stop_str = " " + words[3]
    out = run_all(engine, [
        GenerationRequest("tok", ids, greedy(12, stop_token_ids=(stop_tok,))),
        GenerationRequest("str", ids, greedy(12, stop=(stop_str,))),
    ])
    assert out.tokens("tok") == tokens[: k + 1] and out.last("tok").finish_reason == "stop"
    assert out.last("tok").stop_reason == stop_tok
    assert out.text("tok") == loaded.tokenizer.decode(tokens[:k], skip_special_tokens=True)
    assert out.text("str") == text[: text.index(stop_str)] and out.last("str").stop_reason == stop_str
    assert out.last("str").finish_reason == "stop"
    # the same token as the model's EOS: stops unless ignore_eos, and no stop_reason (vLLM)
    tok = dataclasses.replace(loaded.tokenizer, eos_token_ids=[stop_tok])
    eos_engine = make_engine(model=dataclasses.replace(loaded, tokenizer=tok), max_num_seqs=2)
    out = run_all(eos_engine, [
        GenerationRequest("eos", ids, SamplingParams(max_tokens=12, temperature=0.0)),
        GenerationRequest("ignore", ids, greedy(12)),
    ])
    assert out.tokens("eos") == tokens[: k + 1] and out.last("eos").finish_reason == "stop"
    assert out.last("eos").stop_reason is None
    assert out.tokens("ignore") == tokens and out.last("ignore").finish_reason == "length"


def test_logprobs_prompt_logprobs_and_usage(loaded: LoadedModel, make_engine: EngineFactory) -> None:
    engine = make_engine(max_num_seqs=2)
    ids = prompt_ids(loaded, 2, 6, seed=5)
    sp = greedy(6, logprobs=3, prompt_logprobs=2)
    out = run_all(engine, [GenerationRequest("lp", ids, sp, expert_pool=4),
                           GenerationRequest("echo", ids, SamplingParams(max_tokens=0, prompt_logprobs=1),
                                             expert_pool=4)])
    outs = out.outputs["lp"]
    entries = [e for o in outs for e in (o.logprobs or [])]
    assert [e.token_id for e in entries] == out.tokens("lp")
    for e in entries:  # greedy: the chosen token is the most likely one
        assert len(e.top) == 3 and e.top[0][0] == e.token_id and math.isclose(e.top[0][2], e.logprob)
        assert e.top[0][2] >= e.top[1][2] >= e.top[2][2] and e.token == e.top[0][1]
    prompt_lp = outs[0].prompt_logprobs
    assert prompt_lp is not None and len(prompt_lp) == len(ids) and prompt_lp[0] is None
    assert [p.token_id for p in prompt_lp[1:]] == ids[1:]  # type: ignore[union-attr]
    assert all(o.prompt_logprobs is None for o in outs[1:])
    usage = out.last("lp").usage
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (len(ids), 6)
    assert usage.expert_hits > 0 and usage.expert_misses == 0
    echo = out.last("echo")
    assert echo.finish_reason == "length" and out.tokens("echo") == []
    assert echo.prompt_logprobs is not None and len(echo.prompt_logprobs) == len(ids)
    first = prompt_lp[1]
    assert first is not None
    assert echo.prompt_logprobs[1] == TokenLogprob(first.token_id, first.token, first.logprob, first.top[:1])


def test_small_device_tier_serialises_pools_and_keeps_results(tiny_emo_checkpoint: object,
                                                              loaded: LoadedModel,
                                                              make_engine: EngineFactory) -> None:
    caches: list[TieredExpertCache] = []

    def factory(catalog):  # type: ignore[no-untyped-def]
        caches.append(TieredExpertCache(catalog, device=torch.device("cpu"),
                                        device_budget_bytes=20 * catalog.expert_bytes(0),
                                        host_budget_bytes=64 * catalog.expert_bytes(0)))
        return caches[0]

    paged = load_model(tiny_emo_checkpoint, device="cpu", dtype="fp32", expert_store_factory=factory)  # type: ignore[arg-type]
    try:
        def reqs(tag: str) -> list[GenerationRequest]:  # 12 slots per pool-3 request: one at a time
            return [GenerationRequest(f"{tag}{i}", prompt_ids(loaded, i, 5 + i, seed=10 + i), greedy(8),
                                      expert_pool=pool) for i, pool in enumerate([3, 3, "full", 4])]

        ref = run_all(make_engine(max_num_seqs=1), reqs("r"))
        engine = make_engine(model=paged, max_num_seqs=4)
        out = run_all(engine, reqs("p"))
        for i in range(4):
            assert out.tokens(f"p{i}") == ref.tokens(f"r{i}")
            assert out.last(f"p{i}").finish_reason == "length"
        usage = [out.last(f"p{i}").usage for i in range(4)]
        assert sum(u.expert_misses for u in usage if u) > 0
        assert sum(u.expert_bytes_loaded for u in usage if u) > 0
        assert caches[0].stats().pinned_slots == 0 and engine.kv_usage == 0.0
    finally:
        for c in caches:
            c.close()


def test_request_metrics(loaded: LoadedModel, make_engine: EngineFactory) -> None:
    registry = CollectorRegistry()
    engine = make_engine(max_num_seqs=2, registry=registry)
    reqs = [GenerationRequest(f"m{i}", prompt_ids(loaded, i, 4, seed=i), greedy(3 + i)) for i in range(3)]
    run_all(engine, reqs)

    def value(name: str, **labels: str) -> float:
        v = registry.get_sample_value(name, labels)
        assert v is not None, name
        return v

    assert value("emo_serve_request_success_total", finish_reason="length") == 3
    assert value("emo_serve_generation_tokens_total") == 3 + 4 + 5
    assert value("emo_serve_prompt_tokens_total") == sum(len(r.prompt_token_ids) for r in reqs)
    assert value("emo_serve_time_to_first_token_seconds_count") == 3
    assert value("emo_serve_inter_token_latency_seconds_count") == 2 + 3 + 4
    assert value("emo_serve_e2e_request_latency_seconds_count") == 3
    assert value("emo_serve_request_queue_time_seconds_count") == 3
    assert value("emo_serve_num_requests_running") == 0 and value("emo_serve_kv_cache_usage_perc") == 0
    assert value("emo_serve_device_memory_allocated_bytes") > 0  # CPU: the process RSS


def test_cache_usage_belongs_to_the_request_that_missed(tiny_emo_checkpoint: Path, loaded: LoadedModel,
                                                        make_engine: EngineFactory) -> None:
    """Two pool requests with disjoint pools (the planted experts of domains 0 and 1) and a
    full-routing request that keeps paging: each pool request's misses are its pool's cold
    misses, exactly what it has alone on a cold cache; the full-routing request's decode misses
    are its own, not split over the batch."""
    pools = [planted_experts(tiny_emo_checkpoint, d) for d in (0, 1)]
    assert not set(pools[0]) & set(pools[1])
    stores: list[TieredExpertCache] = []

    def cold_engine() -> Engine:
        def factory(catalog: ExpertCatalog) -> ExpertStore:
            # both pools pinned (2 x 7 x 4 layers) leave 6 slots: full routing misses every step;
            # prefetch in the calling thread, so that what it loads is the same on every run
            budget = 62 * catalog.expert_bytes(0)
            stores.append(TieredExpertCache(catalog, device="cpu", device_budget_bytes=budget,
                                            host_budget_bytes=0, background_prefetch=False))
            return stores[-1]

        return make_engine(model=load_model(tiny_emo_checkpoint, device="cpu", dtype="fp32",
                                            expert_store_factory=factory), max_num_seqs=3)

    def pool_request(domain: int) -> GenerationRequest:
        ids = prompt_ids(loaded, domain, 12, seed=20 + domain)
        return GenerationRequest(f"pool{domain}", ids, greedy(24), expert_pool=len(pools[domain]),
                                 return_expert_pool=True)

    try:
        alone = [run_all(cold_engine(), [pool_request(d)]).last(f"pool{d}") for d in (0, 1)]
        engine, c = cold_engine(), Collector()
        for d in (0, 1):
            engine.submit(pool_request(d), c)
        # both prefilled before the full-routing request arrives: it then decodes alongside them
        assert c.events["pool0"].wait(60) and c.events["pool1"].wait(60)
        full = GenerationRequest("full", prompt_ids(loaded, 2, 12, seed=22), greedy(16), expert_pool="full")
        engine.submit(full, c)
        c.wait(["pool0", "pool1", "full"])
        totals = stores[-1].stats().device
        for d in (0, 1):
            got, ref = c.last(f"pool{d}"), alone[d]
            assert got.expert_pool is not None and ref.expert_pool is not None and ref.usage and got.usage
            assert got.expert_pool["experts"] == [pools[d]] * 4
            assert got.usage.expert_misses == ref.usage.expert_misses > 0, d
            assert got.usage.expert_bytes_loaded == ref.usage.expert_bytes_loaded, d
        usage = [c.last(r).usage for r in ("pool0", "pool1", "full")]
        assert sum(u.expert_misses for u in usage if u) == totals.misses
        assert sum(u.expert_hits for u in usage if u) == totals.hits
    finally:
        for store in stores:
            store.close()

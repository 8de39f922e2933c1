"""Engine lifecycle: validation at submit, queue bound, cancel, failure isolation, shutdown,
and that KV slots and expert pins always come back."""

from __future__ import annotations

import threading

import pytest
import torch

from expert_cache import SlotsExhausted, TieredExpertCache
from server.engine.config import EngineConfig
from server.engine.request import EngineShutdown, GenerationRequest, QueueFull, RequestError, SamplingParams
from server.model.kv_cache import KVCache
from server.model.loader import LoadedModel, load_model
from tests.engine.conftest import Collector, EngineFactory, greedy, prompt_ids, run_all


def pins(loaded: LoadedModel) -> int:
    return loaded.model.expert_store.stats().pinned_slots


def test_invalid_requests_raise_request_error(loaded: LoadedModel, make_engine: EngineFactory,
                                              tiny_emo_checkpoint: object) -> None:
    engine = make_engine(start=False, max_model_len=64)
    ids = prompt_ids(loaded, 0, 5, seed=0)
    cases = [
        (GenerationRequest("long", ids * 20, greedy(4)), "prompt", "context_length_exceeded"),
        (GenerationRequest("mt", ids, greedy(64)), "max_tokens", "context_length_exceeded"),
        (GenerationRequest("empty", [], greedy(4)), "prompt", "invalid_value"),
        (GenerationRequest("vocab", [*ids, 10**6], greedy(4)), "prompt", "invalid_value"),
        (GenerationRequest("small", ids, greedy(4), expert_pool=2), "expert_pool", "invalid_value"),
        (GenerationRequest("big", ids, greedy(4), expert_pool=32), "expert_pool", "invalid_value"),
    ]
    for req, param, code in cases:
        with pytest.raises(RequestError) as info:
            engine.submit(req, Collector())
        assert (info.value.param, info.value.code) == (param, code), req.request_id
    engine.submit(GenerationRequest("ok", ids, greedy(4)), Collector())
    with pytest.raises(RequestError) as info:
        engine.submit(GenerationRequest("ok", ids, greedy(4)), Collector())
    assert info.value.code == "duplicate_request_id"

    def factory(catalog):  # type: ignore[no-untyped-def]
        return TieredExpertCache(catalog, device=torch.device("cpu"), host_budget_bytes=0,
                                 device_budget_bytes=10 * catalog.expert_bytes(0), background_prefetch=False)

    small = load_model(tiny_emo_checkpoint, device="cpu", dtype="fp32", expert_store_factory=factory)  # type: ignore[arg-type]
    try:
        with pytest.raises(RequestError) as info:
            make_engine(model=small, start=False).submit(
                GenerationRequest("fit", ids, greedy(4), expert_pool=3), Collector())
        assert info.value.code == "expert_pool_too_large" and "12" in info.value.message
    finally:
        small.model.expert_store.close()  # type: ignore[attr-defined]


def test_queue_full(loaded: LoadedModel, make_engine: EngineFactory) -> None:
    engine = make_engine(start=False, max_queue=2)
    ids = prompt_ids(loaded, 0, 5, seed=0)
    engine.submit(GenerationRequest("a", ids, greedy(2)), Collector())
    engine.submit(GenerationRequest("b", ids, greedy(2)), Collector())
    assert engine.num_waiting == 2
    with pytest.raises(QueueFull):
        engine.submit(GenerationRequest("c", ids, greedy(2)), Collector())


def test_cancel_frees_kv_and_pins(loaded: LoadedModel, make_engine: EngineFactory) -> None:
    engine = make_engine(max_num_seqs=4)
    c = Collector()
    ids = prompt_ids(loaded, 1, 8, seed=1)
    engine.submit(GenerationRequest("long", ids, greedy(1500), expert_pool=8), c)
    engine.submit(GenerationRequest("short", ids, greedy(5), expert_pool=3), c)
    assert c.events["long"].wait(60)
    engine.cancel("long")
    c.wait(["long", "short"])
    last = c.last("long")
    assert last.finish_reason == "abort" and last.usage is not None
    assert 0 < last.usage.completion_tokens < 1500
    assert c.last("short").finish_reason == "length"
    assert engine.kv_usage == 0.0 and pins(loaded) == 0 and engine.num_running == 0
    engine.cancel("long")  # finished: a no-op
    assert run_all(engine, [GenerationRequest("long", ids, greedy(3))]).last("long").finish_reason == "length"


def test_exception_in_a_step_fails_only_that_step(loaded: LoadedModel, make_engine: EngineFactory,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    model = loaded.model
    real_prefill, real_decode = model.prefill_start, model.decode
    poison = prompt_ids(loaded, 3, 9, seed=99)
    decode_bomb = threading.Event()

    def prefill(input_ids: torch.Tensor, *args: object, **kw: object) -> object:
        if input_ids.tolist() == poison:
            raise RuntimeError("injected prefill failure")
        return real_prefill(input_ids, *args, **kw)  # type: ignore[arg-type]

    def decode(*args: object, **kw: object) -> torch.Tensor:
        if decode_bomb.is_set():
            decode_bomb.clear()
            raise torch.cuda.OutOfMemoryError("injected decode failure")
        return real_decode(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(model, "prefill_start", prefill)
    monkeypatch.setattr(model, "decode", decode)
    good = [GenerationRequest(f"g{i}", prompt_ids(loaded, i, 5 + i, seed=i), greedy(10), expert_pool=pool)
            for i, pool in enumerate([3, "full", 8])]
    ref = run_all(make_engine(max_num_seqs=1), good)  # the poison is not among them
    engine = make_engine(max_num_seqs=4)
    c = Collector()
    for r in good[:2]:
        engine.submit(GenerationRequest("b" + r.request_id, r.prompt_token_ids, r.sampling,
                                        expert_pool=r.expert_pool), c)
    engine.submit(GenerationRequest("poison", poison, greedy(10), expert_pool=4), c)
    c.wait(["bg0", "bg1", "poison"])
    assert c.last("poison").finish_reason == "error" and "injected prefill" in (c.last("poison").error or "")
    for i in range(2):
        assert c.tokens(f"bg{i}") == ref.tokens(f"g{i}") and c.last(f"bg{i}").finish_reason == "length"
    # a failing decode fails the requests of that step, then the engine serves the next one
    engine.submit(GenerationRequest("victim", good[2].prompt_token_ids, greedy(10), expert_pool=8), c)
    assert c.events["victim"].wait(60)
    decode_bomb.set()
    c.wait(["victim"])
    assert c.last("victim").finish_reason == "error" and "OutOfMemoryError" in (c.last("victim").error or "")
    assert engine.kv_usage == 0.0 and pins(loaded) == 0
    after = run_all(engine, [GenerationRequest("after", good[2].prompt_token_ids, greedy(10), expert_pool=8)])
    assert after.tokens("after") == ref.tokens("g2") and engine.ready


def test_shutdown_drains_within_grace(loaded: LoadedModel, make_engine: EngineFactory) -> None:
    engine = make_engine(max_num_seqs=2)
    c = Collector()
    reqs = [GenerationRequest(f"s{i}", prompt_ids(loaded, i, 5, seed=i), greedy(8)) for i in range(4)]
    for r in reqs:
        engine.submit(r, c)
    assert engine.ready
    engine.shutdown(grace_s=60.0)
    assert all(c.last(r.request_id).finish_reason == "length" for r in reqs)
    assert not engine.ready and engine.kv_usage == 0.0 and pins(loaded) == 0
    with pytest.raises(EngineShutdown):
        engine.submit(GenerationRequest("late", reqs[0].prompt_token_ids, greedy(2)), c)


def test_shutdown_after_grace_aborts_the_rest(loaded: LoadedModel, make_engine: EngineFactory) -> None:
    engine = make_engine(max_num_seqs=1)
    c = Collector()
    ids = prompt_ids(loaded, 2, 5, seed=2)
    engine.submit(GenerationRequest("run", ids, greedy(1500), expert_pool=8), c)
    engine.submit(GenerationRequest("queued", ids, greedy(5)), c)
    assert c.events["run"].wait(60)
    engine.shutdown(grace_s=0.0)
    assert c.last("run").finish_reason == "abort" and c.last("queued").finish_reason == "abort"
    assert engine.kv_usage == 0.0 and pins(loaded) == 0


def test_unstarted_engine_aborts_on_shutdown(loaded: LoadedModel, make_engine: EngineFactory) -> None:
    engine = make_engine(start=False)
    c = Collector()
    engine.submit(GenerationRequest("q", prompt_ids(loaded, 0, 3, seed=0), SamplingParams(max_tokens=2)), c)
    assert not engine.ready
    engine.shutdown(grace_s=1.0)
    assert c.last("q").finish_reason == "abort"


def test_slots_exhausted_backs_off_without_losing_anything(loaded: LoadedModel, make_engine: EngineFactory,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    model = loaded.model
    real_prefill, real_decode = model.prefill_start, model.decode
    fired = {"prefill": 0, "decode": 0}

    def prefill(input_ids: torch.Tensor, kv: object, slot: int, **kw: object) -> object:
        if kw.get("pool_size") == 4 and fired["prefill"] < 2:  # as if another pool held the slots
            fired["prefill"] += 1
            raise SlotsExhausted(0, 4, 0, 124)
        return real_prefill(input_ids, kv, slot, **kw)  # type: ignore[arg-type]

    def decode(ids: torch.Tensor, pos: torch.Tensor, kv: object, slots: torch.Tensor,
               mask: torch.Tensor | None, slot_tables: torch.Tensor | None = None) -> torch.Tensor:
        full_rows = mask is None or bool(mask.all(dim=(1, 2)).any())
        if full_rows and ids.shape[0] > 1 and fired["decode"] < 3:
            fired["decode"] += 1
            raise SlotsExhausted(1, 3, 0, 124)
        return real_decode(ids, pos, kv, slots, mask, slot_tables)  # type: ignore[arg-type]

    reqs = [GenerationRequest(f"x{i}", prompt_ids(loaded, i, 6, seed=i), greedy(12), expert_pool=pool)
            for i, pool in enumerate([8, "full", 4])]
    ref = run_all(make_engine(max_num_seqs=1), reqs)
    monkeypatch.setattr(model, "prefill_start", prefill)
    monkeypatch.setattr(model, "decode", decode)
    monkeypatch.setattr(model, "fast_decode", False)  # full rows page (and can run out) on this path
    engine = make_engine(max_num_seqs=4)
    out = run_all(engine, reqs)
    assert fired == {"prefill": 2, "decode": 3}
    for r in reqs:
        assert out.tokens(r.request_id) == ref.tokens(r.request_id)
        assert out.last(r.request_id).finish_reason == "length"
    assert engine.kv_usage == 0.0 and pins(loaded) == 0
    fired["prefill"] = 0  # alone, the back-off has nothing to wait for: the request fails
    alone = run_all(engine, [GenerationRequest("alone", reqs[2].prompt_token_ids, greedy(3), expert_pool=4)])
    assert alone.last("alone").finish_reason == "error"
    assert "does not fit" in (alone.last("alone").error or "")


def test_dead_engine_thread_is_not_ready(loaded: LoadedModel, make_engine: EngineFactory,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    engine = make_engine()
    assert engine.ready

    def broken() -> None:
        raise AssertionError("scheduler bug")

    monkeypatch.setattr(engine._core.scheduler, "schedule", broken)
    c = Collector()
    engine.submit(GenerationRequest("d", prompt_ids(loaded, 0, 3, seed=0), greedy(3)), c)
    c.wait(["d"])
    assert c.last("d").finish_reason == "error" and "scheduler bug" in (c.last("d").error or "")
    engine._thread.join(10)  # type: ignore[union-attr]
    assert not engine.ready
    with pytest.raises(EngineShutdown):
        engine.submit(GenerationRequest("e", prompt_ids(loaded, 0, 3, seed=0), greedy(3)), c)


def test_engine_config_validation_and_kv_budget(loaded: LoadedModel, make_engine: EngineFactory) -> None:
    for bad in (dict(max_num_seqs=0), dict(max_queue=-1), dict(pool_size="most"),
                dict(max_model_len=1), dict(kv_cache_bytes=0), dict(dtype="int8")):
        name = next(iter(bad))
        with pytest.raises(ValueError, match=name):
            EngineConfig(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_model_len"):
        make_engine(start=False, max_model_len=4096)  # the tiny model has 2048 positions
    per_slot = KVCache.bytes_per_slot(loaded.config, 256, torch.float32)
    engine = make_engine(start=False, max_model_len=256, kv_cache_bytes=3 * per_slot + 1)
    assert engine.num_kv_slots == 3 and engine.max_model_len == 256
    with pytest.raises(ValueError, match="kv_cache_bytes"):
        make_engine(start=False, max_model_len=256, kv_cache_bytes=per_slot - 1)

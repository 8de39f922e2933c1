"""Paging never stalls the running streams: a cold request waits in LOADING while loader threads
read its pool, and the running streams keep decoding meanwhile.

The store is the real tiered cache with no host tier (every miss is a disk read) and a
``before_disk_read`` hook that counts reads and can hold them on an event or make them fail.
Progress is asserted by counting tokens while a read is held, never by timing.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry

from expert_cache import TieredExpertCache
from expert_cache.base import ExpertCatalog, ExpertKey
from server.engine.engine import Engine
from server.engine.request import GenerationRequest, SamplingParams
from server.engine.sampler import prompt_logprobs
from server.model.kv_cache import KVCache
from server.model.loader import LoadedModel, load_model
from tests.engine.conftest import Collector, EngineFactory, greedy, prompt_ids, run_all

DEVICE_SLOTS = 64  # 16 per MoE layer of the tiny preset: room for several pools of 3


class ReadGate:
    """``before_disk_read``: counts reads per expert; while closed, reads wait for it to open;
    while ``failing``, reads raise."""

    def __init__(self) -> None:
        self.reads: Counter[ExpertKey] = Counter()
        self.opened = threading.Event()
        self.opened.set()
        self.held = threading.Event()  # a read is waiting at the closed gate
        self.failing = False
        self._lock = threading.Lock()

    def __call__(self, key: ExpertKey) -> None:
        with self._lock:
            self.reads[key] += 1
        if self.failing:
            raise OSError(5, "injected read failure")
        if not self.opened.is_set():
            self.held.set()
            assert self.opened.wait(120), "the test never opened the read gate"

    def close(self) -> None:
        self.held.clear()
        self.opened.clear()


class Paged:
    def __init__(self, model: LoadedModel, store: TieredExpertCache, gate: ReadGate) -> None:
        self.model, self.store, self.gate = model, store, gate


@pytest.fixture()
def paged(tiny_emo_checkpoint: Path) -> Iterator[Paged]:
    gate = ReadGate()
    stores: list[TieredExpertCache] = []

    def factory(catalog: ExpertCatalog) -> TieredExpertCache:
        stores.append(TieredExpertCache(catalog, device=torch.device("cpu"),
                                        device_budget_bytes=DEVICE_SLOTS * catalog.expert_bytes(0),
                                        host_budget_bytes=0, before_disk_read=gate))
        return stores[0]

    model = load_model(tiny_emo_checkpoint, device="cpu", dtype="fp32", expert_store_factory=factory)  # type: ignore[arg-type]
    yield Paged(model, stores[0], gate)
    gate.opened.set()  # never leave a loader thread waiting
    stores[0].close()


def wait_until(check: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
    """Poll ``check`` (a liveness timeout, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def gauge(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    assert value is not None, name
    return value


def wait_tokens(c: Collector, rid: str, n: int) -> None:
    wait_until(lambda: len(c.tokens(rid)) >= n or c.finished(rid), f"{n} tokens of {rid}")
    assert len(c.tokens(rid)) >= n, f"{rid} finished after {len(c.tokens(rid))} tokens"


def start_stream(engine: Engine, p: Paged, c: Collector, max_tokens: int = 1500) -> None:
    """Stream "A" (domain 0, pool 3) decoding, its prefetches done, its pool pinned."""
    engine.submit(GenerationRequest("A", prompt_ids(p.model, 0, 12, seed=1), greedy(max_tokens),
                                    expert_pool=3), c)
    wait_tokens(c, "A", 2)
    assert p.store.wait_for_prefetch(60)


def cold_request(loaded: LoadedModel, rid: str, domain: int = 2, words: int = 10,
                 **kw: object) -> GenerationRequest:
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, **kw)  # type: ignore[arg-type]
    return GenerationRequest(rid, prompt_ids(loaded, domain, words, seed=7), sp, expert_pool=3,
                             return_expert_pool=True)


def test_running_stream_decodes_while_a_pool_loads(paged: Paged, loaded: LoadedModel,
                                                   make_engine: EngineFactory) -> None:
    registry = CollectorRegistry()
    engine = make_engine(model=paged.model, registry=registry, max_num_seqs=4, prefill_chunk_tokens=4)
    c = Collector()
    start_stream(engine, paged, c)
    paged.gate.close()
    engine.submit(cold_request(paged.model, "B", prompt_logprobs=3), c)
    assert paged.gate.held.wait(60)  # B's pool read is in flight, held at the gate
    wait_until(lambda: gauge(registry, "emo_serve_num_requests_loading") == 1, "B to be LOADING")
    before = len(c.tokens("A"))
    wait_tokens(c, "A", before + 10)  # A keeps decoding: 10 steps while B's read cannot finish
    assert not c.outputs.get("B") and gauge(registry, "emo_serve_num_requests_loading") == 1
    paged.gate.opened.set()
    c.wait(["B"])
    engine.cancel("A")
    c.wait(["A"])
    # bit-identical to the one-shot (blocking) prefill, and the same tokens as a resident engine
    b = cold_request(paged.model, "B", prompt_logprobs=3)
    kv = KVCache(loaded.config, 1, 64, "cpu", torch.float32)
    ref = loaded.model.prefill(torch.tensor(b.prompt_token_ids), kv, 0, pool_size=3, all_logits=True)
    assert ref.pools is not None
    assert c.last("B").expert_pool == {"size": 3, "experts": [p.tolist() for p in ref.pools]}  # type: ignore[union-attr]
    got = next(o.prompt_logprobs for o in c.outputs["B"] if o.prompt_logprobs is not None)
    want = prompt_logprobs(ref.logits, b.prompt_token_ids, 3)
    assert [None if g is None else (g.token_id, g.logprob, [(t, v) for t, _, v in g.top]) for g in got] == \
        [None if w is None else (w[0], w[1], w[2]) for w in want]
    resident = run_all(make_engine(max_num_seqs=1), [cold_request(loaded, "R")])
    assert c.tokens("B") == resident.tokens("R")
    assert gauge(registry, "emo_serve_pool_load_seconds_count", source="disk") == 2  # A's and B's
    assert gauge(registry, "emo_serve_time_to_first_token_seconds_count") == 2
    assert paged.store.stats().pinned_slots == 0 and engine.kv_usage == 0.0


def test_long_prompt_is_prefilled_in_pieces_between_decode_steps(paged: Paged, loaded: LoadedModel,
                                                                 make_engine: EngineFactory,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    engine = make_engine(model=paged.model, max_num_seqs=4, prefill_chunk_tokens=32)
    c = Collector()
    start_stream(engine, paged, c)
    # For each call of the model's layer-wise prefill (on the engine thread, in step order): how
    # many tokens A had streamed then. Calls that saw the same count ran with no decode step of
    # A between them: one piece. Counting A's tokens from the test thread instead (from before
    # the submit to "long"'s first token) depends on whether a decode step happens to be in
    # flight at the submit, which load decides.
    a_tokens_at_work: list[int] = []
    model = paged.model.model
    for name in ("prefill_attend", "prefill_mlp"):
        real = getattr(model, name)

        def recorded(*args: object, real: Callable[..., object] = real) -> object:
            a_tokens_at_work.append(len(c.tokens("A")))
            return real(*args)

        monkeypatch.setattr(model, name, recorded)
    ids = prompt_ids(loaded, 3, 400, seed=5)[:600]
    assert len(ids) > 300
    engine.submit(GenerationRequest("long", ids, greedy(3), expert_pool=8), c)
    c.wait(["long"])
    engine.cancel("A")
    c.wait(["A"])
    # each layer's attention is a piece, then each expert its tokens route to (the 7 planted for
    # the prompt's domain; the pool's 8th gets no rows) serves more than 32 of the rows, so is a
    # piece of its own: 4 layers x (1 + 7) pieces, with a decode step of A between any two of
    # them, where a prefill in one step would show a single piece
    assert len(set(a_tokens_at_work)) >= 4 * 8, a_tokens_at_work
    resident = run_all(make_engine(max_num_seqs=1), [GenerationRequest("R", ids, greedy(3), expert_pool=8)])
    assert c.tokens("long") == resident.tokens("R")


def test_two_cold_requests_for_one_domain_read_its_pool_once(paged: Paged,
                                                             make_engine: EngineFactory) -> None:
    registry = CollectorRegistry()
    engine = make_engine(model=paged.model, registry=registry, max_num_seqs=4)
    c = Collector()
    paged.gate.close()
    engine.submit(cold_request(paged.model, "B1"), c)
    engine.submit(cold_request(paged.model, "B2"), c)
    wait_until(lambda: gauge(registry, "emo_serve_num_requests_loading") == 2, "both to be LOADING")
    paged.gate.opened.set()
    c.wait(["B1", "B2"])
    assert c.tokens("B1") == c.tokens("B2") and c.last("B1").expert_pool == c.last("B2").expert_pool
    pool = c.last("B1").expert_pool
    assert pool is not None
    keys = {(layer, e) for layer, ids in enumerate(pool["experts"]) for e in ids}
    assert keys <= set(paged.gate.reads) and max(paged.gate.reads.values()) == 1
    assert paged.store.stats().pinned_slots == 0 and engine.kv_usage == 0.0


def test_cancelling_a_loading_request_leaks_nothing(paged: Paged, make_engine: EngineFactory) -> None:
    registry = CollectorRegistry()
    engine = make_engine(model=paged.model, registry=registry, max_num_seqs=4)
    c = Collector()
    start_stream(engine, paged, c)
    pinned_by_a = paged.store.stats().pinned_slots
    paged.gate.close()
    engine.submit(cold_request(paged.model, "B"), c)
    assert paged.gate.held.wait(60)
    wait_until(lambda: gauge(registry, "emo_serve_num_requests_loading") == 1, "B to be LOADING")
    engine.cancel("B")
    c.wait(["B"])
    assert c.last("B").finish_reason == "abort" and not c.tokens("B")
    wait_until(lambda: gauge(registry, "emo_serve_num_requests_loading") == 0, "the gauge to drop")
    n = len(c.tokens("A"))
    wait_tokens(c, "A", n + 3)  # the held read does not hold A either
    paged.gate.opened.set()  # the abandoned load lands now and must release its own pins
    wait_until(lambda: engine._core.pinner.in_flight == 0, "the abandoned load to finish")
    assert paged.store.stats().pinned_slots == pinned_by_a
    assert engine.num_running == 1 and engine.kv_usage == 1 / engine.num_kv_slots
    engine.cancel("A")
    c.wait(["A"])
    assert paged.store.stats().pinned_slots == 0 and engine.kv_usage == 0.0


def test_a_failed_read_fails_that_request_alone(paged: Paged, make_engine: EngineFactory) -> None:
    engine = make_engine(model=paged.model, max_num_seqs=4)
    c = Collector()
    start_stream(engine, paged, c, max_tokens=40)
    paged.gate.failing = True
    engine.submit(cold_request(paged.model, "B"), c)
    c.wait(["B"])
    paged.gate.failing = False
    last = c.last("B")
    assert last.finish_reason == "error" and not c.tokens("B")
    assert (last.error or "").startswith("CheckpointError")
    assert "while loading the experts of layer 0" in (last.error or "")
    assert "injected read failure" in (last.error or "")
    c.wait(["A"])
    assert c.last("A").finish_reason == "length" and len(c.tokens("A")) == 40
    wait_until(lambda: engine._core.pinner.in_flight == 0, "loads to finish")
    assert paged.store.wait_for_prefetch(60)
    assert paged.store.stats().pinned_slots == 0 and engine.kv_usage == 0.0
    again = run_all(engine, [cold_request(paged.model, "B again")])  # the failed slots were not kept
    assert again.last("B again").finish_reason == "length"


def test_a_hung_read_times_out_its_request_and_the_engine_goes_on(paged: Paged,
                                                                   make_engine: EngineFactory) -> None:
    """The loader thread's own read never returns (a stalled disk): after expert_load_timeout the
    request that waits for it fails with ExpertLoadTimeout, its KV slot is free at once, the
    running stream never stops, and requests whose experts are resident are still served."""
    registry = CollectorRegistry()
    engine = make_engine(model=paged.model, registry=registry, max_num_seqs=4, expert_load_timeout=0.3)
    c = Collector()
    start_stream(engine, paged, c)
    paged.gate.close()  # opened only below, once the outcome is checked (and by the fixture)
    engine.submit(cold_request(paged.model, "B"), c)
    assert paged.gate.held.wait(60)
    c.wait(["B"])
    last = c.last("B")
    assert last.finish_reason == "error" and not c.tokens("B")
    error = last.error or ""
    assert error.startswith("ExpertLoadTimeout") and "while loading the experts of layer" in error
    assert gauge(registry, "emo_serve_num_requests_loading") == 0
    assert engine.kv_usage == 1 / engine.num_kv_slots  # A's slot alone
    n = len(c.tokens("A"))
    wait_tokens(c, "A", n + 3)  # the hung read does not hold A
    warm = run_all(engine, [GenerationRequest("A2", prompt_ids(paged.model, 0, 12, seed=1), greedy(4),
                                              expert_pool=3)])  # A's pool is resident: no read
    assert warm.last("A2").finish_reason == "length" and len(warm.tokens("A2")) == 4
    paged.gate.opened.set()  # the abandoned load lands now and releases its own pins
    wait_until(lambda: engine._core.pinner.in_flight == 0, "the abandoned load to finish")
    engine.cancel("A")
    c.wait(["A"])
    assert paged.store.stats().pinned_slots == 0 and engine.kv_usage == 0.0

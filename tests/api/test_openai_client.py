"""The official `openai` client against a live server: shapes, sampling features, extensions
(through extra_body) and the client's exception class for each error status."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from expert_cache import TieredExpertCache
from server.tools.synth import sample_prompt
from tests.api.live_server import LiveServer, live_server, serve_config, wait_for

KEY = "test-key-123"
LAW = sample_prompt("law", 12, random.Random(1))
CODE = sample_prompt("code", 12, random.Random(2))


@pytest.fixture(scope="module")
def live(checkpoint: Path) -> Iterator[LiveServer]:
    with live_server(serve_config(checkpoint, api_key=KEY)) as server:
        yield server


@pytest.fixture(scope="module")
def client(live: LiveServer) -> OpenAI:
    return OpenAI(base_url=f"{live.url}/v1", api_key=KEY, max_retries=0, timeout=60)


def test_completion_shape(client: OpenAI) -> None:
    r = client.completions.create(model="tiny", prompt=LAW, max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == "tiny"
    (choice,) = r.choices
    assert choice.index == 0 and choice.finish_reason in ("stop", "length") and choice.text
    assert r.usage is not None and r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_and_stream_with_usage_agree(client: OpenAI) -> None:
    messages = [{"role": "user", "content": CODE}]
    full = client.chat.completions.create(model="tiny-alias", messages=messages, max_tokens=10,
                                          temperature=0)
    assert full.object == "chat.completion" and full.model == "tiny-alias"
    assert full.choices[0].message.role == "assistant" and full.choices[0].message.content
    chunks = list(client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == full.usage.completion_tokens  # type: ignore[union-attr]
    assert all(c.usage is None for c in chunks[:-1])


def test_n_choices_and_seed_reproducibility(client: OpenAI) -> None:
    def sample(n: int) -> list[str]:
        r = client.completions.create(model="tiny", prompt=LAW, max_tokens=12, temperature=1.0, n=n,
                                      seed=1234)
        assert [c.index for c in r.choices] == list(range(n))
        return [c.text for c in r.choices]

    three = sample(3)
    assert sample(3) == three
    assert sample(1) == three[:1]  # choice i uses seed + i, so choice 0 is the n=1 request


def test_stop_string_ends_the_text(client: OpenAI) -> None:
    base = client.completions.create(model="tiny", prompt=LAW, max_tokens=16, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    words = base.split()
    assert len(words) >= 3, base
    stop = " " + words[2]
    cut = client.completions.create(model="tiny", prompt=LAW, max_tokens=16, temperature=0,
                                    stop=[stop], extra_body={"ignore_eos": True}).choices[0]
    assert cut.finish_reason == "stop" and cut.text == base[: base.index(stop)]


def test_completion_logprobs_with_echo(client: OpenAI, live: LiveServer) -> None:
    prompt_ids = httpx.post(f"{live.url}/tokenize", json={"prompt": LAW},
                            headers={"Authorization": f"Bearer {KEY}"}).json()["tokens"]
    r = client.completions.create(model="tiny", prompt=LAW, max_tokens=4, temperature=0, logprobs=2,
                                  echo=True)
    choice = r.choices[0]
    assert choice.text.startswith(LAW)
    lp = choice.logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None
    n_completion = r.usage.completion_tokens  # type: ignore[union-attr]
    assert len(lp.tokens) == len(prompt_ids) + n_completion
    assert lp.token_logprobs[0] is None and all(x is not None for x in lp.token_logprobs[1:])
    assert lp.text_offset == sorted(lp.text_offset)
    for top, chosen, value in zip(lp.top_logprobs[1:], lp.tokens[1:], lp.token_logprobs[1:], strict=True):  # type: ignore[index]
        assert 1 <= len(top) <= 3 and top[chosen] == value
    greedy = lp.top_logprobs[-1]  # type: ignore[index]
    assert lp.token_logprobs[-1] == max(greedy.values())


def test_chat_logprobs(client: OpenAI) -> None:
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": LAW}],
                                       max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == r.usage.completion_tokens  # type: ignore[union-attr]
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for token in content:
        assert len(token.top_logprobs) == 3 and token.bytes == list(token.token.encode())
        assert token.logprob == max(t.logprob for t in token.top_logprobs)  # greedy picks the best


def _traffic(live: LiveServer) -> tuple[int, int, int]:
    """Device hits, misses and bytes paged in so far, once queued prefetches have landed."""
    store = live.store
    if isinstance(store, TieredExpertCache):
        assert store.wait_for_prefetch(30)
    s = store.stats()
    return s.device.hits, s.device.misses, s.bytes_loaded_from_host + s.bytes_loaded_from_disk


def test_extension_fields_through_extra_body(client: OpenAI, live: LiveServer) -> None:
    live.wait_idle()
    before = _traffic(live)
    r = client.completions.create(model="tiny", prompt=CODE, max_tokens=6, temperature=0.7,
                                  extra_body={"expert_pool": 8, "return_expert_pool": True, "top_k": 5,
                                              "min_p": 0.05, "repetition_penalty": 1.2, "seed": 3})
    pool = r.model_extra["expert_pool"]  # type: ignore[index]
    mc = live.engine.model_config
    assert pool["size"] == 8 and len(pool["experts"]) == mc.num_layers
    for layer, experts in enumerate(pool["experts"]):
        assert len(experts) == 8 and set(experts) <= set(mc.routable_experts(layer))
    assert r.choices[0].model_extra["expert_pool"] == pool  # type: ignore[index]
    usage = r.usage.model_extra  # type: ignore[union-attr]
    live.wait_idle()
    hits, misses, loaded = (b - a for a, b in zip(before, _traffic(live), strict=True))
    # the only request in flight: its usage is the cache's own counting over the request
    assert usage["expert_cache_hits"] + usage["expert_cache_misses"] > 0
    assert (usage["expert_cache_hits"], usage["expert_cache_misses"]) == (hits, misses)
    expert_bytes = live.engine.loaded.catalog.expert_bytes(0)
    assert misses * expert_bytes <= usage["expert_cache_bytes_loaded"] <= loaded
    full = client.completions.create(model="tiny", prompt=CODE, max_tokens=2,
                                     extra_body={"expert_pool": "full", "return_expert_pool": True})
    assert full.model_extra["expert_pool"]["size"] == "full"  # type: ignore[index]
    chunks = list(client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": CODE}], max_tokens=3, stream=True,
        extra_body={"return_expert_pool": True}))
    last_pool = chunks[-1].model_extra["expert_pool"]  # type: ignore[index]
    assert last_pool["size"] == mc.default_pool_size()
    assert all("expert_pool" not in c.model_extra for c in chunks[:-1])  # type: ignore[operator]
    # the choice carries the pool from its first token on (the playground outlines it while streaming)
    with_pool = [i for i, c in enumerate(chunks) if c.choices and "expert_pool" in c.choices[0].model_extra]  # type: ignore[operator]
    assert with_pool == [1, len(chunks) - 1]  # the role chunk, the first token's, ..., the last
    assert all(chunks[i].choices[0].model_extra["expert_pool"] == last_pool for i in with_pool)  # type: ignore[index]
    text_chunks = list(client.completions.create(model="tiny", prompt=CODE, max_tokens=3, stream=True, n=2,
                                                 extra_body={"return_expert_pool": True}))
    pools = [(c.choices[0].index, c.choices[0].model_extra["expert_pool"]) for c in text_chunks  # type: ignore[index]
             if c.choices and "expert_pool" in c.choices[0].model_extra]  # type: ignore[operator]
    assert [i for i, _ in sorted(pools, key=lambda ip: ip[0])] == [0, 0, 1, 1]
    assert all(p == pools[0][1] and p["size"] == mc.default_pool_size() for _, p in pools)  # one prompt
    first_of_0 = next(i for i, c in enumerate(text_chunks) if c.choices and c.choices[0].index == 0)
    assert "expert_pool" in text_chunks[first_of_0].choices[0].model_extra  # type: ignore[operator]


def test_exception_classes(client: OpenAI, live: LiveServer) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="tiny", prompt=LAW, max_tokens=10**6)
    assert bad.value.code == "context_length_exceeded" and bad.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as pool:
        client.completions.create(model="tiny", prompt=LAW, max_tokens=2, extra_body={"expert_pool": 1})
    assert pool.value.param == "expert_pool"
    wrong = OpenAI(base_url=f"{live.url}/v1", api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.code == "model_not_found"
    assert [m.id for m in client.models.list()] == ["tiny", "tiny-alias"]


def test_rate_limit_when_queue_is_full(checkpoint: Path) -> None:
    # The first request decodes ~2000 tokens (seconds); the check below takes milliseconds.
    with live_server(serve_config(checkpoint, max_num_seqs=1, max_queue=1, max_model_len=2048)) as live:
        http = httpx.Client(base_url=live.url, timeout=60)
        long = {"model": "tiny", "prompt": LAW, "max_tokens": 2000, "stream": True, "ignore_eos": True}
        with http.stream("POST", "/v1/completions", json=long) as running:
            lines = running.iter_lines()  # kept: a dropped iterator closes the response
            next(lines)  # the first token: this request holds the only KV slot
            with http.stream("POST", "/v1/completions", json=long) as waiting:
                assert waiting.status_code == 200  # submitted, queued behind the first
                wait_for(lambda: live.engine.num_waiting == 1, what="the second request to queue")
                client = OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
                with pytest.raises(openai.RateLimitError) as limited:
                    client.completions.create(model="tiny", prompt=LAW, max_tokens=2)
                assert limited.value.response.headers["retry-after"] == "1"
        live.wait_idle()

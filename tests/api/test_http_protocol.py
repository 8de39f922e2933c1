"""Raw HTTP against a live server: SSE framing, every bad-input path answered in OpenAI's error
shape with the right status, the server still serving afterwards, and the small routes."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from server.tools.synth import sample_prompt
from tests.api.live_server import LiveServer, live_server, serve_config, sse_events

PROMPT = sample_prompt("medicine", 10, random.Random(5))
MAX_BODY = 64 * 1024


def add_failing_route(app: FastAPI) -> None:
    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret internal detail")


@pytest.fixture(scope="module")
def live(checkpoint: Path) -> Iterator[LiveServer]:
    with live_server(serve_config(checkpoint, max_body_bytes=MAX_BODY, max_n=4, max_stop=2,
                                  max_stop_len=8), customize=add_failing_route) as server:
        yield server


@pytest.fixture(scope="module")
def http(live: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live.url, timeout=60) as client:
        yield client


def assert_error(r: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> None:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error


def still_serves(http: httpx.Client) -> None:
    r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
    assert r.status_code == 200 and r.json()["choices"][0]["text"]


def test_completion_stream_framing_and_usage(http: httpx.Client) -> None:
    body = {"model": "tiny", "prompt": [PROMPT, PROMPT], "n": 2, "max_tokens": 5, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    texts = {i: "" for i in range(4)}
    for c in chunks[:-1]:
        (choice,) = c["choices"]
        texts[choice["index"]] += choice["text"]
        assert c["usage"] is None
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] <= 4 * 5
    assert len({texts[0], texts[1], texts[2], texts[3]}) == 1  # greedy: every choice alike
    finished = [c["choices"][0]["index"] for c in chunks[:-1] if c["choices"][0]["finish_reason"]]
    assert sorted(finished) == [0, 1, 2, 3]


def test_stream_without_usage_has_no_usage_field(http: httpx.Client) -> None:
    with http.stream("POST", "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 3, "stream": True}) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]" and all("usage" not in json.loads(e) for e in events[:-1])


@pytest.mark.parametrize(("payload", "param"), [
    ({"prompt": PROMPT, "max_tokens": "five"}, "max_tokens"),
    ({"prompt": PROMPT, "temperature": 3}, "temperature"),
    ({"prompt": PROMPT, "stream": 1}, "stream"),
    ({"prompt": 42}, "prompt"),
    ({"prompt": [[1, 2], "mixed"]}, "prompt"),
    ({"max_tokens": 3}, "prompt"),
    ({"prompt": PROMPT, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": PROMPT, "logprobs": 6}, "logprobs"),
    ({"prompt": PROMPT, "n": 5}, "n"),
    ({"prompt": [PROMPT] * 3, "n": 2}, "n"),
    ({"prompt": PROMPT, "stop": ["a", "b", "c"]}, "stop"),
    ({"prompt": PROMPT, "stop": "much too long"}, "stop"),
    ({"prompt": PROMPT, "seed": 2**64}, "seed"),
    ({"prompt": PROMPT, "expert_pool": "half"}, "expert_pool"),
    ({"prompt": PROMPT, "expert_pool": 10**6}, "expert_pool"),
    ({"prompt": PROMPT, "logit_bias": {"5": 1.0}}, "logit_bias"),
    ({"prompt": [3, 10**7]}, "prompt"),
])
def test_invalid_completion_fields_are_400(http: httpx.Client, payload: dict[str, object],
                                           param: str) -> None:
    assert_error(http.post("/v1/completions", json=payload), 400, param=param)


@pytest.mark.parametrize(("payload", "param"), [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content"),
])
def test_invalid_chat_fields_are_400(http: httpx.Client, payload: dict[str, object], param: str) -> None:
    assert_error(http.post("/v1/chat/completions", json=payload), 400, param=param)


def test_bad_bodies_are_400_and_the_server_keeps_serving(http: httpx.Client) -> None:
    headers = {"content-type": "application/json"}
    for raw, code in [(b'{"prompt": "x",', "invalid_json"), (b"[1, 2]", "invalid_json"),
                      (b'{"prompt": "\xff\xfe bad"}', "invalid_body"),
                      (b'{"prompt": "\\ud800"}', "invalid_body"),
                      (b'{"prompt": "x", "temperature": NaN}', None),
                      (b"x" * (MAX_BODY + 1), "request_too_large")]:
        assert_error(http.post("/v1/completions", content=raw, headers=headers), 400, code=code)
    chunked = (b"x" * 1024 for _ in range(MAX_BODY // 1024 + 2))  # no content-length: counted
    assert_error(http.post("/v1/completions", content=chunked, headers=headers), 400,
                 code="request_too_large")
    still_serves(http)


def test_length_limits(http: httpx.Client, live: LiveServer) -> None:
    limit = live.engine.max_model_len
    assert_error(http.post("/v1/completions", json={"prompt": "", "max_tokens": 2}), 400, code="empty_prompt")
    assert_error(http.post("/v1/completions", json={"prompt": [], "max_tokens": 2}), 400, code="empty_prompt")
    assert_error(http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 10**9}), 400,
                 param="max_tokens", code="context_length_exceeded")
    assert_error(http.post("/v1/completions", json={"prompt": [5] * (limit + 1)}), 400,
                 param="prompt", code="context_length_exceeded")
    assert_error(http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": PROMPT}], "max_completion_tokens": limit}), 400,
        param="max_completion_tokens", code="context_length_exceeded")
    r = http.post("/v1/completions", json={"prompt": [5] * (limit - 3), "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3  # default: the rest
    still_serves(http)


def test_unknown_model_route_and_method(http: httpx.Client) -> None:
    assert_error(http.post("/v1/completions", json={"model": "other", "prompt": "x"}), 404,
                 param="model", code="model_not_found")
    assert_error(http.get("/v1/nothing-here"), 404)
    assert_error(http.get("/v1/completions"), 405)


def test_request_id_is_echoed_or_generated(http: httpx.Client) -> None:
    r = http.get("/health", headers={"X-Request-Id": "client-id-42"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "client-id-42"
    generated = http.get("/health", headers={"X-Request-Id": "bad id\twith controls"}).headers["x-request-id"]
    assert len(generated) == 32 and generated != http.get("/health").headers["x-request-id"]
    error = http.post("/v1/completions", json={}, headers={"X-Request-Id": "err-7"})
    assert error.status_code == 400 and error.headers["x-request-id"] == "err-7"


def test_small_routes(http: httpx.Client, live: LiveServer) -> None:
    assert http.get("/health").json() == {"status": "ok"}
    assert http.get("/ready").json() == {"status": "ready"}
    assert http.get("/version").json()["version"]
    models = http.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny", "tiny-alias"]
    card = models["data"][0]
    assert card["object"] == "model" and card["owned_by"] and card["created"] > 0
    assert card["max_model_len"] == live.engine.max_model_len
    tokens = http.post("/tokenize", json={"prompt": PROMPT}).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0 and tokens["max_model_len"] == card["max_model_len"]
    assert http.post("/detokenize", json={"tokens": tokens["tokens"]}).json() == {"prompt": PROMPT}
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": PROMPT}]}).json()
    assert chat["count"] > tokens["count"]  # the template adds its role markers
    assert_error(http.post("/detokenize", json={"tokens": [-1]}), 400, param="tokens")
    assert_error(http.post("/tokenize", json={"prompt": "x", "messages": []}), 400)


def test_http_metrics_count_by_endpoint_and_status(http: httpx.Client, live: LiveServer) -> None:
    def count(status: str) -> float:
        return live.metric("emo_serve_http_requests_total", {"endpoint": "/v1/completions", "status": status})

    ok, bad = count("200"), count("400")
    still_serves(http)
    http.post("/v1/completions", json={"prompt": 1})
    assert count("200") == ok + 1 and count("400") == bad + 1
    text = http.get("/metrics").text
    assert 'emo_serve_http_requests_total{endpoint="/v1/completions",status="200"}' in text
    assert "emo_serve_expert_cache_hits_total" in text and "emo_serve_num_requests_running" in text


def test_unexpected_error_is_a_generic_500(http: httpx.Client) -> None:
    r = http.get("/boom", headers={"X-Request-Id": "boom-1"})
    assert_error(r, 500, code="internal_error")
    assert "secret" not in r.text and r.headers["x-request-id"] == "boom-1"
    still_serves(http)


def test_draining_answers_503(http: httpx.Client, live: LiveServer) -> None:
    state = live.app.state.serving
    state.draining = True
    try:
        assert_error(http.get("/ready"), 503, code="server_shutting_down")
        assert_error(http.post("/v1/completions", json={"prompt": PROMPT}), 503, code="server_shutting_down")
        assert http.get("/health").status_code == 200  # alive, just not admitting
    finally:
        state.draining = False
    still_serves(http)

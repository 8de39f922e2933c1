"""A client that goes away cancels its engine request: streaming or not, and also with an extra
user middleware (Starlette's BaseHTTPMiddleware) in front of the app. Afterwards nothing runs,
no KV slot is held and no expert is pinned."""

from __future__ import annotations

import json
import random
import socket
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import Response

from server.tools.synth import sample_prompt
from tests.api.live_server import LOOPBACK, LiveServer, live_server, serve_config, wait_for
from tests.api.slow_steps import slowed_decode_steps

PROMPT = sample_prompt("sports", 10, random.Random(9))
LONG = {"model": "tiny", "prompt": PROMPT, "max_tokens": 1500, "ignore_eos": True}


async def passthrough(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    response = await call_next(request)
    response.headers["x-extra-middleware"] = "1"
    return response


@pytest.fixture(autouse=True)
def slow_steps() -> Iterator[None]:
    """20 ms per decode step: a 1500-token request runs >= 30 s, so it is still running when
    the client leaves, however fast the machine."""
    with slowed_decode_steps(0.02):
        yield


@pytest.fixture(scope="module", params=["plain", "behind-middleware"])
def live(checkpoint: Path, request: pytest.FixtureRequest) -> Iterator[LiveServer]:
    def add_middleware(app: FastAPI) -> None:
        app.add_middleware(BaseHTTPMiddleware, dispatch=passthrough)

    customize = add_middleware if request.param == "behind-middleware" else None
    with live_server(serve_config(checkpoint, max_model_len=2048), customize=customize) as server:
        yield server


def aborted(live: LiveServer) -> float:
    return live.metric("emo_serve_request_success_total", {"finish_reason": "abort"})


def assert_released(live: LiveServer, aborts_before: float) -> None:
    wait_for(lambda: aborted(live) == aborts_before + 1, what="the engine to abort the request")
    live.wait_idle()
    assert live.engine.kv_usage == 0.0 and live.store.stats().pinned_slots == 0
    assert live.metric("emo_serve_num_requests_running") == 0


def test_disconnect_mid_stream_cancels(live: LiveServer) -> None:
    before = aborted(live)
    with (httpx.Client(base_url=live.url, timeout=60) as http,
          http.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r):
        lines = r.iter_lines()
        received = [line for line, _ in zip(lines, range(6), strict=False) if line]
        assert len(received) == 3 and live.engine.num_running == 1
    # leaving the block closed the connection in the middle of the stream
    assert_released(live, before)
    assert httpx.get(f"{live.url}/health").status_code == 200


def test_disconnect_while_waiting_for_a_full_response_cancels(live: LiveServer) -> None:
    before = aborted(live)
    body = json.dumps(LONG).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {LOOPBACK}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    port = int(live.url.rsplit(":", 1)[1])
    with socket.create_connection((LOOPBACK, port), timeout=60) as client:
        client.sendall(head + body)
        wait_for(lambda: live.engine.num_running == 1, what="the request to run")
    # the client closed its connection while the server was still generating the response
    assert_released(live, before)
    r = httpx.post(f"{live.url}/v1/completions", json={**LONG, "max_tokens": 2}, timeout=60)
    assert r.status_code == 200

"""A client that goes away while its request is LOADING (its pool's disk reads held at a gate):
the request is aborted at once, and when the held read lands nothing is left behind: no pin, no
KV slot, no load in flight."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from expert_cache.base import ExpertKey
from server.tools.synth import sample_prompt
from tests.api.live_server import LiveServer, live_server, serve_config, wait_for

PROMPT = sample_prompt("law", 10, random.Random(3))


@pytest.fixture
def live(checkpoint: Path) -> Iterator[LiveServer]:
    with live_server(serve_config(checkpoint, max_model_len=256)) as server:
        yield server


def test_disconnect_while_loading_leaks_nothing(live: LiveServer) -> None:
    store: Any = live.store
    opened, held = threading.Event(), threading.Event()

    def gate(key: ExpertKey) -> None:  # the real read runs after it
        if not opened.is_set():
            held.set()
            assert opened.wait(60)

    store._loader.disk.before_read = gate
    try:
        aborts = live.metric("emo_serve_request_success_total", {"finish_reason": "abort"})
        body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "stream": True}
        with httpx.Client(base_url=live.url, timeout=60) as http:
            # the response's headers come at once; its first token waits for the held read
            stream = http.stream("POST", "/v1/completions", json=body)  # kept: dropping it closes
            assert stream.__enter__().status_code == 200
            assert held.wait(30)
            wait_for(lambda: live.metric("emo_serve_num_requests_loading") == 1, what="the request to load")
        # leaving the block closed the connection (the client is gone); the read is still held
        wait_for(lambda: live.metric("emo_serve_request_success_total", {"finish_reason": "abort"})
                 == aborts + 1, what="the engine to abort the request")
        assert live.metric("emo_serve_num_requests_loading") == 0 and live.engine.kv_usage == 0.0
    finally:
        opened.set()
    wait_for(lambda: live.engine._core.pinner.in_flight == 0, what="the abandoned load to land")
    assert store.wait_for_prefetch(30)
    live.wait_idle()
    assert store.stats().pinned_slots == 0
    ok = httpx.post(f"{live.url}/v1/completions", json={**body, "stream": False}, timeout=60)
    assert ok.status_code == 200

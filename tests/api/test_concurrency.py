"""32 concurrent streams over the four planted domains with a device tier smaller than the union
of their pools: all finish, greedy texts equal the one-at-a-time texts, pins and KV return to
zero, and the per-request usage counters add up to the cache's own statistics."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import httpx

from server.model.config import load_config
from server.tools.synth import planted_experts, sample_prompt
from tests.api.live_server import LiveServer, live_server, serve_config

DOMAINS = ("code", "medicine", "law", "sports")
N_REQUESTS = 32
MAX_TOKENS = 8


def prompts() -> list[str]:
    return [sample_prompt(DOMAINS[i % len(DOMAINS)], 10, random.Random(100 + i)) for i in range(N_REQUESTS)]


async def stream_one(client: httpx.AsyncClient, prompt: str) -> tuple[str, dict[str, int]]:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    text, usage, done = "", None, False
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line:
                continue
            payload = line.removeprefix("data: ")
            if payload == "[DONE]":
                done = True
                continue
            chunk = json.loads(payload)
            assert "error" not in chunk, chunk
            if chunk["choices"]:
                text += chunk["choices"][0]["text"]
            else:
                usage = chunk["usage"]
    assert done and usage is not None
    return text, usage


async def run_all(url: str, texts: list[str]) -> list[tuple[str, dict[str, int]]]:
    limits = httpx.Limits(max_connections=N_REQUESTS)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        return await asyncio.gather(*(stream_one(client, p) for p in texts))


def test_concurrent_streams_share_a_small_device_tier(checkpoint: Path) -> None:
    mc = load_config(checkpoint)
    expert_bytes = 3 * mc.intermediate_size * mc.hidden_size * 4  # fp32 gate_up + down
    union = {(layer, e) for d in DOMAINS for layer in mc.moe_layers for e in planted_experts(checkpoint, d)}
    slots = 80  # two and a half default pools (8 experts x 4 layers each)
    assert slots < len(union), "the device tier must be smaller than the union of the pools"
    config = serve_config(checkpoint, expert_cache=slots * expert_bytes, max_num_seqs=8)
    with live_server(config) as live:
        assert live.store.capacity(0) <= slots
        texts = prompts()
        alone = [_single(live, p) for p in texts]
        before = live.store.stats()
        together = asyncio.run(run_all(live.url, texts))
        live.wait_idle()
        after = live.store.stats()
        assert [t for t, _ in together] == alone
        assert live.engine.kv_usage == 0.0 and after.pinned_slots == 0
        assert live.metric("emo_serve_num_requests_running") == 0
        hits = sum(u["expert_cache_hits"] for _, u in together)
        misses = sum(u["expert_cache_misses"] for _, u in together)
        assert hits == after.device.hits - before.device.hits
        assert misses == after.device.misses - before.device.misses
        assert misses > 0, "a tier smaller than the pools' union must miss"
        loaded = after.bytes_loaded_from_host + after.bytes_loaded_from_disk
        loaded -= before.bytes_loaded_from_host + before.bytes_loaded_from_disk
        assert 0 < sum(u["expert_cache_bytes_loaded"] for _, u in together) <= loaded


def _single(live: LiveServer, prompt: str) -> str:
    r = httpx.post(f"{live.url}/v1/completions", timeout=60,
                   json={"model": "tiny", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0})
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["text"])

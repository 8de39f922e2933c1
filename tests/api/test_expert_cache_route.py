"""GET /v1/expert_cache over HTTP (behind the API key like /v1), and the playground's files
at / and /static: served, and referring to nothing outside the server."""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server.api.routes_playground import STATIC_DIR
from server.model.config import load_config
from server.tools.synth import sample_prompt
from tests.api.live_server import LiveServer, live_server, serve_config, wait_for

KEY = "sk-expert-cache-test"
SLOTS = 48  # of 4 x 32 pageable experts: paging happens


@pytest.fixture(scope="module")
def live(checkpoint: Path) -> Iterator[LiveServer]:
    mc = load_config(checkpoint)
    expert_bytes = 3 * mc.intermediate_size * mc.hidden_size * 4  # fp32 gate, up, down
    with live_server(serve_config(checkpoint, api_key=KEY, expert_cache=SLOTS * expert_bytes)) as server:
        yield server


@pytest.fixture(scope="module")
def http(live: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live.url, timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as client:
        yield client


def test_snapshot_needs_the_key(live: LiveServer) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.get(live.url + "/v1/expert_cache", headers=headers, timeout=30)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["code"] == "invalid_api_key"


def test_snapshot_describes_the_cache_after_a_request(live: LiveServer, http: httpx.Client,
                                                      checkpoint: Path) -> None:
    mc = load_config(checkpoint)
    r = http.post("/v1/completions", json={"prompt": sample_prompt("law", 12, random.Random(3)),
                                           "max_tokens": 4, "expert_pool": 4, "return_expert_pool": True})
    assert r.status_code == 200, r.text
    pool = r.json()["expert_pool"]["experts"]
    live.wait_idle()

    r = http.get("/v1/expert_cache")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    snap = r.json()
    assert snap["object"] == "expert_cache"
    assert [layer["layer"] for layer in snap["layers"]] == mc.moe_layers
    for layer in snap["layers"]:
        n = layer["layer"]
        assert layer["experts"] == mc.routable_experts(n)
        assert layer["slab"] == 0 and layer["device"]["capacity"] == SLOTS  # one shape, one slab
        assert layer["device"]["pinned"] == layer["device"]["loading"] == []  # idle
        # the request's pool was pinned and loaded; nothing since could evict it
        assert set(pool[n]) <= set(layer["device"]["resident"]) <= set(layer["experts"])
        assert set(layer["host"]["resident"]) <= set(layer["experts"])
        assert layer["host"]["capacity"] >= 0
    device, host = snap["device"], snap["host"]
    assert device["resident"] == sum(len(layer["device"]["resident"]) for layer in snap["layers"])
    assert host["resident"] == sum(len(layer["host"]["resident"]) for layer in snap["layers"])
    assert snap["capacity_slots"] == SLOTS and snap["pinned_slots"] == 0
    # a cold cache moved the whole pool in (each move asks the host tier once), from disk
    assert host["hits"] + host["misses"] >= 4 * len(mc.moe_layers) and snap["bytes_loaded_from_disk"] > 0
    for tier in ("device", "host"):  # the same counters /metrics exports
        for counter in ("hits", "misses"):
            exported = live.metric(f"emo_serve_expert_cache_{counter}_total", {"tier": tier})
            assert snap[tier][counter] == exported, (tier, counter)


def test_playground_files_are_served_and_self_contained(live: LiveServer) -> None:
    page = httpx.get(live.url + "/", timeout=30)  # open: the page asks for the key itself
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    linked = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sorted(linked) == ["static/app.js", "static/favicon.svg", "static/style.css"]
    for path, kind in (("static/app.js", "javascript"), ("static/style.css", "text/css"),
                       ("static/favicon.svg", "image/svg+xml")):
        r = httpx.get(f"{live.url}/{path}", timeout=30)
        assert r.status_code == 200 and kind in r.headers["content-type"], (path, r.headers)
        assert r.headers["cache-control"] == "no-cache"  # revalidated: an upgrade is seen at once
        again = httpx.get(f"{live.url}/{path}", timeout=30, headers={"If-None-Match": r.headers["etag"]})
        assert again.status_code == 304
    for file in STATIC_DIR.iterdir():  # no CDN, no web font: deployments often have no internet
        text = file.read_text().replace('xmlns="http://www.w3.org/2000/svg"', "")  # a name, not a fetch
        assert not re.search(r"https?://|url\(|@import|//cdn", text), f"{file.name} refers outside the server"
    assert httpx.get(live.url + "/static/nothing.js", timeout=30).status_code == 404


def test_polling_stays_out_of_the_info_log(http: httpx.Client, caplog: pytest.LogCaptureFixture) -> None:
    """The playground polls the snapshot 4 times a second while it generates."""
    with caplog.at_level(logging.DEBUG, logger="emo_serve.api.access"):
        assert http.get("/v1/expert_cache").status_code == 200 and http.get("/v1/models").status_code == 200

        def levels() -> dict[str, int]:  # the access line is written once the response has gone
            return {r.getMessage().split()[1]: r.levelno for r in caplog.records
                    if r.name == "emo_serve.api.access" and r.getMessage().startswith("GET ")}

        wait_for(lambda: {"/v1/expert_cache", "/v1/models"} <= set(levels()), what="the access log lines")
    assert levels()["/v1/expert_cache"] == logging.DEBUG and levels()["/v1/models"] == logging.INFO

"""A real Prometheus scrapes /metrics every second; PromQL for the device-tier hit rate answers a
number in [0, 1]. Skipped only where the binary is absent and CI is unset (in CI it must run:
Debian's `prometheus` package provides it)."""

from __future__ import annotations

import math
import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server.model.config import load_config
from server.tools.synth import sample_prompt
from tests.api.live_server import LOOPBACK, LiveServer, free_port, live_server, serve_config
from tests.optional import require_binary

HIT_RATE = (
    'sum(rate(emo_serve_expert_cache_hits_total{tier="device"}[1m])) / '
    '(sum(rate(emo_serve_expert_cache_hits_total{tier="device"}[1m])) + '
    'sum(rate(emo_serve_expert_cache_misses_total{tier="device"}[1m])))'
)


def prometheus_binary() -> str:
    return require_binary("prometheus", "apt-get install -y prometheus")


@pytest.fixture
def prometheus(tmp_path: Path, checkpoint: Path) -> Iterator[tuple[LiveServer, str]]:
    binary = prometheus_binary()
    mc = load_config(checkpoint)
    expert_bytes = 3 * mc.intermediate_size * mc.hidden_size * 4
    with live_server(serve_config(checkpoint, expert_cache=48 * expert_bytes)) as live:
        target = live.url.removeprefix("http://")
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: emo-serve\n    metrics_path: /metrics\n"
            f"    static_configs:\n      - targets: ['{target}']\n"
        )
        port = free_port()
        proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address={LOOPBACK}:{port}", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        try:
            yield live, f"http://{LOOPBACK}:{port}"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def query(api: str, promql: str) -> list[dict[str, object]]:
    try:
        r = httpx.get(f"{api}/api/v1/query", params={"query": promql}, timeout=5)
    except httpx.TransportError:
        return []  # not listening yet
    if r.status_code != 200:
        return []
    data = r.json()["data"]
    assert data["resultType"] == "vector"
    return list(data["result"])


def test_promql_device_hit_rate(prometheus: tuple[LiveServer, str]) -> None:
    live, api = prometheus
    rng = random.Random(0)
    domains = ("code", "medicine", "law", "sports")
    deadline = time.monotonic() + 90
    value = math.nan
    while time.monotonic() < deadline:
        # Traffic between scrapes, so the counters move inside the rate() window.
        prompt = sample_prompt(rng.choice(domains), 8, rng)
        r = httpx.post(f"{live.url}/v1/completions", json={"prompt": prompt, "max_tokens": 3}, timeout=60)
        assert r.status_code == 200
        result = query(api, HIT_RATE)
        if result:
            value = float(result[0]["value"][1])  # type: ignore[index]
            if not math.isnan(value):
                break
        time.sleep(0.5)
    assert not math.isnan(value), "Prometheus never answered the hit-rate query with a number"
    assert 0.0 <= value <= 1.0
    up = query(api, 'up{job="emo-serve"}')
    assert up and float(up[0]["value"][1]) == 1.0  # type: ignore[index]

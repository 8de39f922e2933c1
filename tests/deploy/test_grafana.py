"""The Grafana dashboard: well-formed, valid PromQL (through promtool), and built only from
metrics the server exports, covering what an operator of emo-serve needs to see."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from tests.deploy.conftest import DEPLOY, LiveServer, load_yaml_docs
from tests.deploy.promql import metric_names, problems, substitute_grafana
from tests.deploy.test_prometheus import promtool, recorded

DASHBOARD: dict[str, Any] = json.loads((DEPLOY / "grafana/dashboards/emo-serve.json").read_text())
PANELS = [p for p in DASHBOARD["panels"] if p["type"] != "row"]


def expressions() -> dict[str, str]:
    return {f"{panel['title']} / {target['refId']}": target["expr"]
            for panel in PANELS for target in panel["targets"]}


def used_metrics() -> set[str]:
    return set().union(*(metric_names(expr) for expr in expressions().values()))


def test_panels_are_laid_out_without_overlap() -> None:
    cells: set[tuple[int, int]] = set()
    for panel in DASHBOARD["panels"]:
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"panel {panel['title']!r} overlaps another"
        cells |= mine
    ids = [panel["id"] for panel in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))


def test_every_query_uses_the_datasource_variable() -> None:
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    for panel in PANELS:
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
    sources = load_yaml_docs(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")[0]["datasources"]
    assert variables["datasource"]["current"]["value"] in {s["uid"] for s in sources}


def test_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses every query (Grafana variables replaced) as a recording rule."""
    rules = [{"record": f"dashboard:query_{n}", "expr": substitute_grafana(expr)}
             for n, expr in enumerate(expressions().values())]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = promtool("check", "rules", str(path), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


def test_histogram_quantiles_aggregate_buckets_by_le() -> None:
    for where, expr in expressions().items():
        if "histogram_quantile" in expr:
            assert "_bucket" in expr and "by (le" in expr, where


def test_dashboard_shows_what_the_issue_asks_for() -> None:
    want = {
        "emo_serve_expert_cache_hits_total", "emo_serve_expert_cache_misses_total",  # hit rates
        "emo_serve_expert_cache_loaded_bytes_total",  # bytes paged per second
        "emo_serve_expert_cache_load_latency_seconds_bucket",  # load latency quantiles
        "emo_serve_expert_cache_resident_experts", "emo_serve_expert_cache_pinned_experts",
        "emo_serve_time_to_first_token_seconds_bucket", "emo_serve_inter_token_latency_seconds_bucket",
        "emo_serve_generation_tokens_total",  # tokens/s
        "emo_serve_num_requests_running", "emo_serve_num_requests_waiting",
        "emo_serve_kv_cache_usage_perc",
        "emo_serve_device_memory_allocated_bytes", "emo_serve_device_memory_reserved_bytes",
        "emo_serve_num_requests_loading",  # requests parked while their experts page in
        "emo_serve_pool_load_seconds_bucket", "emo_serve_pool_requests_total",  # pools
    }  # fmt: skip
    assert want - used_metrics() == set()
    pool_load = [e for w, e in expressions().items() if "emo_serve_pool_load_seconds_bucket" in e]
    assert {e.split(",")[0] for e in pool_load} == {"histogram_quantile(0.5", "histogram_quantile(0.99"}
    assert all("by (le, source)" in e for e in pool_load), "pool load time per source tier"
    assert any("by (pool)" in e for e in expressions().values() if "emo_serve_pool_requests_total" in e)
    ratio = next(e for w, e in expressions().items() if w.startswith("Expert hit ratio"))
    assert "by (tier)" in ratio, "hit ratio per tier: device and host"


def test_dashboard_reads_only_metrics_the_server_exports(live_server: LiveServer) -> None:
    found = {where: bad for where, expr in expressions().items()
             if (bad := problems(expr, live_server.metrics, recorded()))}
    assert found == {}
    for variable in DASHBOARD["templating"]["list"]:
        if variable["type"] == "query":  # label_values(<selector>, <label>)
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["query"]["query"])
            assert match, variable["query"]["query"]
            assert problems(match.group(1), live_server.metrics, set()) == []
            assert match.group(2) in {"job", "instance"}

"""Prometheus config and rules: promtool accepts them, the alerts fire on the series they are
written for (tests/deploy/alerts_test.yml), and every metric they read is one the server exports."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from tests.deploy.conftest import DEPLOY, LiveServer, load_yaml_docs
from tests.deploy.promql import metric_names, problems
from tests.optional import require_binary

PROMETHEUS = DEPLOY / "prometheus"
RULE_FILES = sorted((PROMETHEUS / "rules").glob("*.yml"))
ALERT_TESTS = Path(__file__).parent / "alerts_test.yml"


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    exe = require_binary("promtool", "Debian package 'prometheus'")
    return subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def rules() -> list[dict[str, Any]]:
    groups = [group for path in RULE_FILES for group in load_yaml_docs(path)[0]["groups"]]
    return [rule for group in groups for rule in group["rules"]]


def recorded() -> set[str]:
    return {rule["record"] for rule in rules() if "record" in rule}


def alerts() -> dict[str, str]:
    return {rule["alert"]: rule["expr"] for rule in rules() if "alert" in rule}


def test_promtool_check_config() -> None:
    done = promtool("check", "config", "prometheus.yml", cwd=PROMETHEUS)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(RULE_FILES)} rule files found" in done.stdout + done.stderr


def test_promtool_check_rules() -> None:
    assert RULE_FILES
    done = promtool("check", "rules", *map(str, RULE_FILES), cwd=PROMETHEUS)
    assert done.returncode == 0, done.stdout + done.stderr


def test_alerts_fire_on_their_series() -> None:
    done = promtool("test", "rules", ALERT_TESTS.name, cwd=ALERT_TESTS.parent)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_has_a_firing_unit_test() -> None:
    tested = {case["alertname"] for test in load_yaml_docs(ALERT_TESTS)[0]["tests"]
              for case in test.get("alert_rule_test", []) if case.get("exp_alerts")}
    assert set(alerts()) == tested


def test_alerts_cover_hit_rate_queue_and_readiness() -> None:
    used = {name: metric_names(expr) for name, expr in alerts().items()}
    assert any("up" in names for names in used.values()), "an alert on up == 0"
    assert any("emo_serve_num_requests_waiting" in names for names in used.values()), "a queue alert"
    hit_ratio = "emo_serve:expert_cache_hit_ratio:rate5m"
    ratio = next(r["expr"] for r in rules() if r.get("record") == hit_ratio)
    assert {"emo_serve_expert_cache_hits_total", "emo_serve_expert_cache_misses_total"} <= metric_names(ratio)
    assert any(hit_ratio in names for names in used.values()), "a hit-rate alert"


def test_rules_read_only_metrics_the_server_exports(live_server: LiveServer) -> None:
    found = {}
    for rule in rules():
        bad = problems(rule["expr"], live_server.metrics, recorded())
        if bad:
            found[rule.get("alert") or rule.get("record")] = bad
    assert found == {}


def test_the_metric_check_catches_mistakes(live_server: LiveServer) -> None:
    """The check above would see a misspelt name, a tier that does not exist, a bad grouping."""
    hits = "emo_serve_expert_cache_hits_total"
    assert problems(f"rate({hits}[5m])", live_server.metrics, set()) == []
    assert problems("rate(emo_serve_expert_cache_hit_total[5m])", live_server.metrics, set())
    assert problems(f'rate({hits}{{tier="gpu"}}[5m])', live_server.metrics, set())
    assert problems(f"sum by (domain) (rate({hits}[5m]))", live_server.metrics, set())
    assert problems("emo_serve_generation_tokens", live_server.metrics, set()), "a counter needs _total"

"""deploy/k8s/: the manifests parse, refer to each other consistently, and agree with the server
(port, probe paths, settings, drain timeout, metric names)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from server.runtime.settings import load_settings
from tests.deploy.conftest import DEPLOY, LiveServer, load_yaml_docs

K8S = DEPLOY / "k8s"
PRESTOP_SLEEP_S = 5


def objects(name: str) -> list[dict[str, Any]]:
    docs = load_yaml_docs(K8S / name)
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(doc), f"{name}: not a Kubernetes object"
    return docs


def one(name: str, kind: str) -> dict[str, Any]:
    found = [d for d in objects(name) if d["kind"] == kind]
    assert len(found) == 1, f"{name}: expected one {kind}"
    return found[0]


DEPLOYMENT = one("deployment.yaml", "Deployment")
POD = DEPLOYMENT["spec"]["template"]
CONTAINER = POD["spec"]["containers"][0]
ENV = {e["name"]: e["value"] for e in CONTAINER["env"] if "value" in e}
PORTS = {p["name"]: p["containerPort"] for p in CONTAINER["ports"]}


def test_every_manifest_parses_and_kustomization_lists_existing_files() -> None:
    for path in K8S.glob("*.yaml"):
        if path.name not in ("kustomization.yaml", "prometheus-adapter-rules.yaml"):
            assert objects(path.name)
    kustomization = load_yaml_docs(K8S / "kustomization.yaml")[0]
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file(), resource


def test_settings_are_cli_variables_that_parse(cli_env_vars: dict[str, str]) -> None:
    names = {e["name"] for e in CONTAINER["env"]}
    assert names <= set(cli_env_vars.values()), names - set(cli_env_vars.values())
    config = load_settings({}, ENV)
    assert config.host == "0.0.0.0"
    assert PORTS["http"] == config.port
    mount = next(m for m in CONTAINER["volumeMounts"] if m["name"] == "models")
    assert str(config.model).startswith(mount["mountPath"] + "/") and mount["readOnly"]


def test_gpu_is_requested() -> None:
    assert int(CONTAINER["resources"]["limits"]["nvidia.com/gpu"]) == 1


@pytest.mark.parametrize("probe, path", [("startupProbe", "/health"), ("livenessProbe", "/health"),
                                         ("readinessProbe", "/ready")])
def test_probes_hit_the_server_routes(probe: str, path: str, live_server: LiveServer) -> None:
    get = CONTAINER[probe]["httpGet"]
    assert get["path"] == path and get["port"] in ("http", PORTS["http"])
    assert path in live_server.openapi_paths
    assert httpx.get(live_server.url + path, timeout=10).status_code == 200


def test_grace_period_covers_prestop_and_the_drain() -> None:
    """SIGTERM comes after preStop; the server then drains for drain_timeout and uvicorn gives
    open connections 5 s more (server/cli/serve.py). The kubelet's period counts all of it."""
    assert CONTAINER["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", str(PRESTOP_SLEEP_S)]
    drain = load_settings({}, ENV).drain_timeout
    grace = POD["spec"]["terminationGracePeriodSeconds"]
    assert PRESTOP_SLEEP_S + drain + 5 <= grace <= PRESTOP_SLEEP_S + drain + 30


def test_runs_as_the_image_user_not_root() -> None:
    security = POD["spec"]["securityContext"]
    assert security["runAsNonRoot"] and security["runAsUser"] == 10001


def test_service_selects_the_pods_on_the_http_port() -> None:
    service = one("service.yaml", "Service")
    labels = POD["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in service["spec"]["selector"].items())
    assert service["spec"]["ports"][0]["targetPort"] in ("http", PORTS["http"])


@pytest.mark.parametrize("name", ["model-pvc.yaml", "model-hostpath.yaml"])
def test_model_volume_alternatives_provide_the_claim(name: str) -> None:
    claim = DEPLOYMENT["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert one(name, "PersistentVolumeClaim")["metadata"]["name"] == claim
    if name == "model-hostpath.yaml":
        volume = one(name, "PersistentVolume")
        assert volume["spec"]["hostPath"]["path"] and volume["metadata"]["name"] == one(
            name, "PersistentVolumeClaim")["spec"]["volumeName"]


def test_scrape_annotations_and_podmonitor_point_at_metrics(live_server: LiveServer) -> None:
    annotations = POD["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == PORTS["http"]
    assert annotations["prometheus.io/path"] == "/metrics" and "/metrics" in live_server.openapi_paths
    monitor = one("podmonitor.yaml", "PodMonitor")
    endpoint = monitor["spec"]["podMetricsEndpoints"][0]
    assert endpoint["port"] in PORTS and endpoint["path"] == "/metrics"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert all(POD["metadata"]["labels"].get(k) == v for k, v in selector.items())
    # The rules select job="emo-serve"; the PodMonitor takes job from this pod label.
    assert POD["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "emo-serve"


def test_hpa_scales_the_deployment_on_exported_gauges(live_server: LiveServer) -> None:
    hpa = one("hpa.yaml", "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == DEPLOYMENT["metadata"]["name"]
    names = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    assert names == {"emo_serve_num_requests_running", "emo_serve_num_requests_waiting"}
    for name in names:
        assert live_server.metrics.types.get(name) == "gauge", name
    adapter = load_yaml_docs(K8S / "prometheus-adapter-rules.yaml")[0]
    series = adapter["rules"]["custom"][0]["seriesQuery"]
    assert "emo_serve_num_requests_(running|waiting)" in series


def test_ingress_hashes_on_the_domain_header_to_the_service(live_server: LiveServer) -> None:
    ingress = one("ingress.yaml", "Ingress")
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/upstream-hash-by"] == "$http_x_emo_domain"
    path = ingress["spec"]["rules"][0]["http"]["paths"][0]
    backend = path["backend"]["service"]
    assert backend["name"] == one("service.yaml", "Service")["metadata"]["name"]
    assert backend["port"]["name"] == "http"
    assert {"/v1/completions", "/v1/chat/completions"} <= {p for p in live_server.openapi_paths
                                                           if p.startswith(path["path"])}

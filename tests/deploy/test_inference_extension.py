"""deploy/k8s/inference-extension/: the InferencePool, its endpoint picker and the named-pool
entries parse, point at each other and at the emo-serve pods, and every metric the picker is
configured to read is one a live emo-serve exports, with the labels the picker parses."""

from __future__ import annotations

import re
from typing import Any

import yaml

from server.runtime.settings import POOL_NAME_PATTERN, load_settings
from tests.deploy.conftest import DEPLOY, LiveServer, load_yaml_docs

GIE = DEPLOY / "k8s" / "inference-extension"
API_VERSIONS = {  # the versions current upstream serves (InferencePool v1 GA; the picker's own APIs)
    "InferencePool": "inference.networking.k8s.io/v1",
    "InferenceObjective": "llm-d.ai/v1alpha2",
    "InferenceModelRewrite": "llm-d.ai/v1alpha2",
    "HTTPRoute": "gateway.networking.k8s.io/v1",
}
LORA_LABELS = {"running_lora_adapters", "waiting_lora_adapters", "max_lora"}


def every_object() -> list[dict[str, Any]]:
    kustomization = load_yaml_docs(GIE / "kustomization.yaml")[0]
    objects = [doc for name in kustomization["resources"] for doc in load_yaml_docs(GIE / name)]
    for doc in objects:
        assert {"apiVersion", "kind", "metadata"} <= set(doc), doc
    return objects


OBJECTS = every_object()


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [o for o in OBJECTS if o["kind"] == kind]


def one(kind: str) -> dict[str, Any]:
    (found,) = of_kind(kind)
    return found


def picker_config() -> dict[str, Any]:
    config_map = one("ConfigMap")
    deployment = one("Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    path = args[args.index("--config-file") + 1]
    mount = deployment["spec"]["template"]["spec"]["containers"][0]["volumeMounts"][0]
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    assert path.startswith(mount["mountPath"] + "/")
    config = yaml.safe_load(config_map["data"][path.removeprefix(mount["mountPath"] + "/")])
    assert isinstance(config, dict)
    return config


def engine_config() -> dict[str, Any]:
    plugins = picker_config()["plugins"]
    extractor = next(p for p in plugins if p["type"] == "core-metrics-extractor")["parameters"]
    (engine,) = [e for e in extractor["engineConfigs"] if e["name"] == extractor["defaultEngine"]]
    return dict(engine)


def test_api_versions_are_the_current_ones() -> None:
    for kind, version in API_VERSIONS.items():
        assert of_kind(kind), kind
        assert {o["apiVersion"] for o in of_kind(kind)} == {version}, kind


def test_the_pool_selects_the_emo_serve_pods_and_names_the_picker() -> None:
    deployment = load_yaml_docs(DEPLOY / "k8s" / "deployment.yaml")[0]
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    pool = one("InferencePool")["spec"]
    assert pool["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert [p["number"] for p in pool["targetPorts"]] == [p["containerPort"] for p in container["ports"]]
    service = one("Service")
    ref = pool["endpointPickerRef"]
    assert ref["name"] == service["metadata"]["name"] and ref["failureMode"] in ("FailOpen", "FailClose")
    assert ref["port"]["number"] in [p["port"] for p in service["spec"]["ports"]]
    picker = one("Deployment")["spec"]["template"]
    assert service["spec"]["selector"].items() <= picker["metadata"]["labels"].items()
    args = picker["spec"]["containers"][0]["args"]
    assert args[args.index("--pool-name") + 1] == one("InferencePool")["metadata"]["name"]
    assert args[args.index("--pool-group") + 1] == "inference.networking.k8s.io"
    assert picker["spec"]["serviceAccountName"] == one("ServiceAccount")["metadata"]["name"]
    route = one("HTTPRoute")["spec"]["rules"][0]["backendRefs"][0]
    assert route["kind"] == "InferencePool" and route["name"] == one("InferencePool")["metadata"]["name"]


def test_the_picker_scores_queue_kv_and_adapter_affinity() -> None:
    config = picker_config()
    assert config["kind"] == "EndpointPickerConfig"
    declared = {p["type"] for p in config["plugins"]}
    used = {ref["pluginRef"] for profile in config["schedulingProfiles"] for ref in profile["plugins"]}
    assert used <= declared
    assert {"queue-scorer", "kv-cache-utilization-scorer", "lora-affinity-scorer"} <= used


def test_every_metric_the_picker_reads_is_exported(live_server: LiveServer) -> None:
    engine = engine_config()
    specs = {key: value for key, value in engine.items() if key.endswith("Spec") and value}
    assert set(specs) == {"queuedRequestsSpec", "runningRequestsSpec", "kvUsageSpec", "loraSpec"}
    exposition = live_server.metrics
    for key, spec in specs.items():
        name = spec.split("{")[0]
        assert exposition.types.get(name) == "gauge", (key, spec)
        assert exposition.samples.get(name), f"{name} has no sample on a live server"
    lora = specs["loraSpec"]
    (labels,) = exposition.samples[lora]  # one series: the latest state
    assert set(labels) == LORA_LABELS
    assert int(labels["max_lora"]) >= 0


def test_one_model_and_objective_entry_per_named_pool() -> None:
    deployment = load_yaml_docs(DEPLOY / "k8s" / "deployment.yaml")[0]
    env = {e["name"]: e["value"] for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
           if "value" in e}
    served = load_settings({}, env).model.name  # the served name: the model folder's
    pool_name = one("InferencePool")["metadata"]["name"]
    (rewrite,) = of_kind("InferenceModelRewrite")
    assert rewrite["spec"]["poolRef"]["name"] == pool_name
    rewritten = {}
    for rule in rewrite["spec"]["rules"]:
        (match,) = rule["matches"]
        (target,) = rule["targets"]
        rewritten[match["model"]["value"]] = target["modelRewrite"]
    assert rewritten and all(target == f"{served}:{name}" for name, target in rewritten.items())
    assert all(re.fullmatch(POOL_NAME_PATTERN, name) for name in rewritten)
    objectives = {o["metadata"]["name"]: o["spec"] for o in of_kind("InferenceObjective")}
    assert set(objectives) == set(rewritten)
    assert all(spec["poolRef"]["name"] == pool_name and isinstance(spec["priority"], int)
               for spec in objectives.values())

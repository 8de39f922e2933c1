"""deploy/docker-compose.yml and the Grafana provisioning it mounts."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from server.runtime.settings import load_settings
from tests.deploy.conftest import DEPLOY, ROOT, load_yaml_docs
from tests.deploy.dockerfile import env_of, parse_dockerfile, stages


class ComposeLoader(yaml.SafeLoader):
    """Compose's merge tags: ``!reset`` drops a value from the files before, ``!override``
    replaces it."""


def _tagged(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    value: Any = node.value
    if isinstance(node, yaml.MappingNode):
        value = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    return {"__compose_tag__": node.tag, "value": value}


ComposeLoader.add_constructor("!reset", _tagged)
ComposeLoader.add_constructor("!override", _tagged)


def load_compose(name: str) -> dict[str, Any]:
    with (DEPLOY / name).open() as f:
        return yaml.load(f, Loader=ComposeLoader)  # noqa: S506 - a SafeLoader subclass


COMPOSE: dict[str, Any] = load_compose("docker-compose.yml")
SERVICES: dict[str, Any] = COMPOSE["services"]


def interpolate(value: str) -> str:
    """Compose's ${VAR:-default} / ${VAR} with nothing set in the environment."""
    return re.sub(r"\$\{[A-Z_][A-Z0-9_]*(?::?-([^}]*))?\}", lambda m: m.group(1) or "", value)


def compose_env(service: str) -> dict[str, str]:
    env = SERVICES[service].get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: interpolate(str(v)) for k, v in env.items()}


def seconds(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text))


def host_path(mount: str) -> Path:
    return DEPLOY / interpolate(mount).split(":")[0]


def test_three_services() -> None:
    assert {"emo-serve", "prometheus", "grafana"} <= set(SERVICES)


def test_emo_serve_builds_the_top_level_dockerfile() -> None:
    build = SERVICES["emo-serve"]["build"]
    assert (DEPLOY / build["context"]).resolve() == ROOT
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == ROOT / "Dockerfile"


def test_gpu_reservation() -> None:
    devices = SERVICES["emo-serve"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)


def test_settings_are_cli_variables_that_parse(cli_env_vars: dict[str, str]) -> None:
    env = compose_env("emo-serve")
    assert set(env) <= set(cli_env_vars.values()), set(env) - set(cli_env_vars.values())
    image = env_of(stages(parse_dockerfile(ROOT / "Dockerfile"))[-1])
    config = load_settings({}, {**image, **env})
    assert config.host == "0.0.0.0"
    assert str(config.model).startswith("/models/")
    published = [str(p) for p in SERVICES["emo-serve"]["ports"]]
    assert f"8000:{config.port}" in published


def test_model_volume_is_mounted_read_only_at_models() -> None:
    mounts = SERVICES["emo-serve"]["volumes"]
    assert any(interpolate(m).split(":")[1:] == ["/models", "ro"] for m in mounts)


def test_stop_grace_covers_the_drain() -> None:
    """uvicorn gives open connections drain_timeout + 5 s (server/cli/serve.py) after the drain."""
    image = env_of(stages(parse_dockerfile(ROOT / "Dockerfile"))[-1])
    drain = load_settings({}, {**image, **compose_env("emo-serve")}).drain_timeout
    assert seconds(SERVICES["emo-serve"]["stop_grace_period"]) >= drain + 5


def test_prometheus_and_grafana_mount_files_that_exist() -> None:
    for service in ("prometheus", "grafana"):
        for mount in SERVICES[service]["volumes"]:
            if mount.startswith("./"):
                assert host_path(mount).exists(), mount
    config_arg = next(a for a in SERVICES["prometheus"]["command"] if a.startswith("--config.file="))
    target = config_arg.split("=", 1)[1]
    assert any(m.split(":")[1] == target and host_path(m).name == "prometheus.yml"
               for m in SERVICES["prometheus"]["volumes"])


def test_prometheus_scrapes_the_compose_service_on_the_server_port() -> None:
    prom = load_yaml_docs(DEPLOY / "prometheus" / "prometheus.yml")[0]
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "emo-serve")
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    assert targets == [f"emo-serve:{compose_env('emo-serve')['EMO_SERVE_PORT']}"]


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard() -> None:
    sources = load_yaml_docs(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")[0]["datasources"]
    prometheus = next(s for s in sources if s["type"] == "prometheus")
    assert prometheus["url"] == "http://prometheus:9090"
    providers = load_yaml_docs(DEPLOY / "grafana/provisioning/dashboards/emo-serve.yml")[0]["providers"]
    mounted = {m.split(":")[1]: host_path(m) for m in SERVICES["grafana"]["volumes"] if m.startswith("./")}
    path = providers[0]["options"]["path"]
    assert path in mounted and list(mounted[path].glob("*.json"))
    dashboard = json.loads((mounted[path] / "emo-serve.json").read_text())
    datasource_var = next(v for v in dashboard["templating"]["list"] if v["type"] == "datasource")
    assert datasource_var["current"]["value"] == prometheus["uid"]
    home = compose_env("grafana")["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(path + "/") and (mounted[path] / Path(home).name).is_file()


def test_cpu_override_drops_the_gpu_and_picks_the_cpu_wheel(cli_env_vars: dict[str, str]) -> None:
    cpu = load_compose("docker-compose.cpu.yml")["services"]["emo-serve"]
    assert cpu["deploy"]["__compose_tag__"] == "!reset"
    assert cpu["build"]["args"]["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    assert set(cpu["environment"]) <= set(cli_env_vars.values())
    image = env_of(stages(parse_dockerfile(ROOT / "Dockerfile"))[-1])
    assert load_settings({}, {**image, **compose_env("emo-serve"), **cpu["environment"]}).device == "cpu"
    assert cpu["image"] != SERVICES["emo-serve"]["image"], "the CPU image must not overwrite the GPU tag"

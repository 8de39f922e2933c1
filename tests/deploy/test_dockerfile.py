"""The Dockerfile and .dockerignore against what the code really does (no Docker engine here)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest

from server.runtime.settings import Settings, load_settings
from tests.deploy.conftest import ROOT, LiveServer, clean_env
from tests.deploy.dockerfile import DockerIgnore, Instruction, env_of, parse_dockerfile, stages

INSTRUCTIONS = parse_dockerfile(ROOT / "Dockerfile")
FINAL = stages(INSTRUCTIONS)[-1]


def only(stage: list[Instruction], keyword: str) -> Instruction:
    found = [ins for ins in stage if ins.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword} in the final stage, found {len(found)}"
    return found[0]


def image_env() -> dict[str, str]:
    return env_of(FINAL)


def test_base_is_a_build_arg_and_torch_index_selects_the_cpu_variant() -> None:
    args = {ins.args.split("=", 1)[0]: ins.args.split("=", 1)[1] for ins in INSTRUCTIONS
            if ins.keyword == "ARG" and "=" in ins.args}
    assert args["BASE"].startswith("python:3.11"), "the suite runs Python 3.11"
    froms = [ins.args.split()[0] for ins in INSTRUCTIONS if ins.keyword == "FROM"]
    assert froms and all(f == "${BASE}" for f in froms)
    torch_runs = [ins.args for ins in INSTRUCTIONS if ins.keyword == "RUN" and "torch==" in ins.args]
    assert len(torch_runs) == 1 and "${TORCH_INDEX}" in torch_runs[0] and "${TORCH_VERSION}" in torch_runs[0]
    assert "TORCH_INDEX" in args and "TORCH_VERSION" in args


def pip_installs() -> list[list[str]]:
    out = []
    for ins in INSTRUCTIONS:
        if ins.keyword == "RUN":
            for command in re.split(r"&&|;", ins.args):
                words = shlex.split(command)
                if words[:2] == ["pip", "install"] or words[1:4] == ["-m", "pip", "install"]:
                    out.append(words)
    return out


def test_the_package_is_installed_from_the_checkout_without_extras() -> None:
    project = [w for words in pip_installs() for w in words if w.startswith("./src") or w == "."]
    assert project == ["./src"], f"one non-editable install of the checkout, got {project}"
    for words in pip_installs():
        assert "-e" not in words and "--editable" not in words
        assert not any("[" in w and "src" in w for w in words), "no extras ([test]) in the image"
    copies = [ins.args for ins in INSTRUCTIONS if ins.keyword == "COPY" and "--from" not in ins.args]
    copied = {src for args in copies for src in args.split()[:-1]}
    assert {"pyproject.toml", "server", "expert_cache"} <= copied


def test_runtime_user_is_not_root() -> None:
    user = only(FINAL, "USER").args
    assert user not in ("root", "0") and not user.startswith(("root:", "0:"))
    assert any(ins.keyword == "RUN" and "useradd" in ins.args and user in ins.args for ins in FINAL)


def test_port_volume_and_entrypoint() -> None:
    env = image_env()
    assert only(FINAL, "EXPOSE").args == env["EMO_SERVE_PORT"] == "8000"
    assert only(FINAL, "VOLUME").exec_form() == ["/models"]
    assert env["EMO_SERVE_MODEL"].startswith("/models/")
    assert only(FINAL, "ENTRYPOINT").exec_form() == ["emo-serve", "serve"]
    assert only(FINAL, "STOPSIGNAL").args == "SIGTERM"


def test_image_env_names_are_read_by_the_cli_and_parse(cli_env_vars: dict[str, str]) -> None:
    env = image_env()
    ours = {k for k in env if k.startswith("EMO_SERVE_")}
    assert ours, "the image configures the server through EMO_SERVE_* variables"
    unknown = ours - set(cli_env_vars.values())
    assert not unknown, f"not read by emo-serve serve: {unknown}"
    config = load_settings({}, env)
    assert config.host == "0.0.0.0" and config.port == 8000
    assert config.drain_timeout == float(env["EMO_SERVE_DRAIN_TIMEOUT"])


def test_cli_help_lists_the_same_variables(cli_env_vars: dict[str, str]) -> None:
    """The variables documented by `emo-serve serve --help` are the ones the table maps."""
    done = subprocess.run([sys.executable, "-m", "server", "serve", "--help"], cwd=ROOT, env=clean_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"emo-serve serve --help failed:\n{done.stderr[-3000:]}"
    text = " ".join(done.stdout.split())  # argparse wraps lines anywhere between words
    pairs, start = {}, 0
    for match in re.finditer(r"\[env (EMO_SERVE_[A-Z0-9_]+)\]", text):
        flags = [f for f in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text[start : match.start()])
                 if f != "--help"]
        pairs[flags[0]] = match.group(1)
        start = match.end()
    assert pairs == cli_env_vars


def test_healthcheck_command_passes_against_a_real_server(live_server: LiveServer) -> None:
    health = only(FINAL, "HEALTHCHECK")
    assert "--start-period=" in health.args
    command = health.exec_form()
    assert command[0] == "python" and "curl" not in " ".join(command), "python urllib, no curl in the image"
    assert "/health" in command[-1]
    env = clean_env(EMO_SERVE_PORT=str(live_server.port))
    ok = subprocess.run([sys.executable, *command[1:]], env=env, timeout=30)
    assert ok.returncode == 0
    env["EMO_SERVE_PORT"] = "1"  # nothing listens there: the check must fail
    assert subprocess.run([sys.executable, *command[1:]], env=env, timeout=30,
                          capture_output=True).returncode != 0


def test_default_port_agrees_with_the_cli() -> None:
    assert Settings().port == int(image_env()["EMO_SERVE_PORT"])


def context_files() -> list[str]:
    """Files of the checkout as git sees them (tracked + untracked, not ignored), plus ones the
    ignore rules must handle even when git ignores them (caches, wheels, checkpoints)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60, check=True).stdout.split()
    return [path for path in listed if (ROOT / path).is_file()]


@pytest.mark.parametrize("path", [
    ".git/config", "tests/conftest.py", "tests/deploy/test_dockerfile.py",
    "checkpoints/emo/model.safetensors",
    ".whl/torch-2.13.0-cp311-cp311-linux_x86_64.whl", "torch-2.13.0-cp311-cp311-linux_x86_64.whl",
    "server/__pycache__/cli.cpython-311.pyc", "server/api/__pycache__/app.cpython-311.pyc",
    "expert_cache/.pytest_cache/v/cache/nodeids", ".venv/bin/python", "bench-out/run.json",
    "emo_serve.egg-info/PKG-INFO", "deploy/docker-compose.yml", ".hypothesis/examples/x",
])  # fmt: skip
def test_dockerignore_keeps_out(path: str) -> None:
    assert DockerIgnore.read(ROOT / ".dockerignore").excluded(path)


def test_dockerignore_keeps_everything_pip_install_needs() -> None:
    ignore = DockerIgnore.read(ROOT / ".dockerignore")
    needed = [p for p in context_files() if p in ("pyproject.toml", "README.md")
              or (p.startswith(("server/", "expert_cache/")) and "__pycache__" not in p)]
    assert "pyproject.toml" in needed and any(p.endswith(".py") for p in needed)
    assert [p for p in needed if ignore.excluded(p)] == []
    assert [p for p in context_files() if p.startswith("tests/") and not ignore.excluded(p)] == []


def test_readme_exists_for_the_build() -> None:
    """The image COPYs README.md because pyproject.toml names it as the readme: without it both
    `docker build` and `pip install .` fail."""
    assert 'readme = "README.md"' in (ROOT / "pyproject.toml").read_text()
    assert (ROOT / "README.md").is_file(), "README.md is missing: the image cannot be built"


def dockerfile_pip_steps() -> list[str]:
    """What the image pip-installs, in order: the requirement or path of each `pip install`."""
    steps = [[w for w in words[2:] if not w.startswith("-") and "INDEX" not in w] for words in pip_installs()]
    return [step[-1] for step in steps]


def test_image_installs_torch_then_the_checkout() -> None:
    """test_install.py repeats exactly these two steps in a fresh venv."""
    assert dockerfile_pip_steps() == ["torch==${TORCH_VERSION}", "./src"]

"""Fixtures for the deployment checks: the files under deploy/, the settings the CLI really
reads, and one real `emo-serve serve` process (the checkout's) that answered a completion."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.deploy.promql import Exposition

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
LOOPBACK = "127.0.0.1"


def load_yaml_docs(path: Path) -> list[Any]:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    """The test process' environment without any EMO_SERVE_* setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMO_SERVE_")}
    env.update(extra)
    return env


def wait_ready(proc: subprocess.Popen[bytes], url: str, log: Path, timeout: float = 180.0) -> None:
    """Until /health and /ready answer 200; fails with the server's log if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"emo-serve exited with {proc.returncode} before it was ready:\n"
                                 f"{log.read_text()[-4000:]}")
        try:
            if (httpx.get(url + "/health", timeout=2).status_code == 200
                    and httpx.get(url + "/ready", timeout=2).status_code == 200):
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"emo-serve not ready after {timeout}s:\n{log.read_text()[-4000:]}")


def stop(proc: subprocess.Popen[bytes], timeout: float = 60.0) -> int:
    """SIGTERM (what Docker and the kubelet send), then the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"emo-serve did not exit within {timeout}s of SIGTERM") from None


@dataclass(frozen=True)
class LiveServer:
    url: str
    port: int
    metrics: Exposition  # scraped after one completion
    openapi_paths: frozenset[str]


@pytest.fixture(scope="session")
def cli_env_vars() -> dict[str, str]:
    """flag -> EMO_SERVE_* variable, from the table `emo-serve serve` parses its settings with."""
    from server.runtime.settings import OPTIONS

    return {opt.flag: opt.env for opt in OPTIONS}


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory, tiny_emo_checkpoint: Path) -> Iterator[LiveServer]:
    port = free_port()
    url = f"http://{LOOPBACK}:{port}"
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    cmd = [sys.executable, "-m", "server", "serve", "--host", LOOPBACK, "--port", str(port),
           "--model", str(tiny_emo_checkpoint), "--max-model-len", "256", "--drain-timeout", "2",
           "--pools-dir", str(tmp_path_factory.mktemp("pools"))]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=clean_env())
    try:
        wait_ready(proc, url, log)
        name = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
        reply = httpx.post(url + "/v1/completions", timeout=60,
                           json={"model": name, "prompt": "hello world", "max_tokens": 4})
        assert reply.status_code == 200, reply.text
        # and one on a named pool: its labelled metrics (pool="...") get a series
        pool = httpx.post(url + "/v1/pools", timeout=60,
                          json={"name": "greetings", "examples": ["hello world"]})
        assert pool.status_code == 200, pool.text
        reply = httpx.post(url + "/v1/completions", timeout=60,
                           json={"model": f"{name}:greetings", "prompt": "hello there", "max_tokens": 4})
        assert reply.status_code == 200, reply.text
        metrics = Exposition.parse(httpx.get(url + "/metrics", timeout=10).text)
        paths = frozenset(httpx.get(url + "/openapi.json", timeout=10).json()["paths"])
        yield LiveServer(url, port, metrics, paths)
    finally:
        stop(proc)

"""A real emo-serve HTTP server for tests: built by the same code as `emo-serve serve`
(server.cli.serve.build_app) and run by uvicorn in a thread, on 127.0.0.1 only, on a socket
bound to a free port before uvicorn starts (no race for the port)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from expert_cache.base import ExpertStore
from server.cli.serve import build_app
from server.engine.engine import Engine
from server.runtime import Runtime
from server.runtime.settings import Settings, settings_of

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A loopback port free now (for processes that bind it themselves)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


@dataclass
class LiveServer:
    url: str
    app: FastAPI
    server: uvicorn.Server

    @property
    def runtime(self) -> Runtime:
        runtime = self.app.state.runtime
        assert isinstance(runtime, Runtime)
        return runtime

    @property
    def engine(self) -> Engine:
        return self.runtime.engine

    @property
    def store(self) -> ExpertStore:
        return self.runtime.store

    @property
    def registry(self) -> CollectorRegistry:
        return self.runtime.registry

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        value = self.registry.get_sample_value(name, labels or {})
        return 0.0 if value is None else value

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Until no request runs or waits and no expert is pinned (the engine frees both when a
        request ends or is cancelled)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (self.engine.num_running == 0 and self.engine.num_waiting == 0
                    and self.store.stats().pinned_slots == 0):
                return
            time.sleep(0.02)
        raise AssertionError(f"not idle after {timeout}s: running={self.engine.num_running} "
                             f"waiting={self.engine.num_waiting} pinned={self.store.stats().pinned_slots}")


def serve_config(checkpoint: Path, **overrides: object) -> Settings:
    settings: dict[str, object] = {"model": checkpoint, "host": LOOPBACK, "port": 0, "device": "cpu",
                                   "dtype": "fp32", "max_model_len": 512, "drain_timeout": 2.0,
                                   "served_model_name": ("tiny", "tiny-alias")}
    settings.update(overrides)
    return settings_of(**settings)


@contextmanager
def live_server(config: Settings, *, customize: Callable[[FastAPI], None] | None = None
                ) -> Iterator[LiveServer]:
    """``customize`` may change the app before it starts (add a middleware, ...)."""
    assert config.host == LOOPBACK
    app = build_app(config)
    if customize is not None:
        customize(app)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((LOOPBACK, 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    live = LiveServer(url=f"http://{LOOPBACK}:{port}", app=app, server=server)
    try:
        yield live
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def sse_events(response: httpx.Response) -> list[str]:
    """The data payloads of a complete SSE body, checking the framing: every event is one
    ``data: `` line followed by a blank line."""
    text = response.read().decode("utf-8")
    assert text.endswith("\n\n"), "an SSE body must end with a blank line"
    events = []
    for block in text.split("\n\n")[:-1]:
        lines = block.split("\n")
        assert len(lines) == 1 and lines[0].startswith("data: "), f"bad SSE event {block!r}"
        events.append(lines[0][len("data: "):])
    return events

"""`python -m server serve` as a real process: settings from EMO_SERVE_* variables, the memory
plan in the log, SIGTERM draining (a short stream finishes, a long one is cut at the grace,
the process exits 0), and a plan that cannot fit refused with its numbers."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from server.tools.synth import sample_prompt
from tests.api.live_server import LOOPBACK, free_port

ROOT = Path(__file__).resolve().parents[2]
PROMPT = sample_prompt("code", 8, random.Random(3))
LONG_TOKENS = 500


def start(checkpoint: Path, port: int, *flags: str, step_delay_s: float | None = None,
          **env: str) -> subprocess.Popen[str]:
    """`python -m server serve`; with ``step_delay_s`` every decode step first sleeps that long."""
    environ = {**os.environ, "EMO_SERVE_MODEL": str(checkpoint), "EMO_SERVE_PORT": str(port),
               "EMO_SERVE_DEVICE": "cpu", "PYTHONPATH": str(ROOT), **env}
    module = ["server"] if step_delay_s is None else ["tests.api.slow_steps", str(step_delay_s)]
    return subprocess.Popen([sys.executable, "-m", *module, "serve", "--host", LOOPBACK, *flags],
                            cwd=ROOT, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def output(proc: subprocess.Popen[str]) -> str:
    """Everything the finished process printed; closes the pipe."""
    if proc.stdout is None:
        return ""
    with proc.stdout:
        return proc.stdout.read()


def wait_ready(url: str, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the server exited early:\n{proc.stdout.read() if proc.stdout else ''}"
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("the server did not become ready")


def read_stream(url: str, body: dict[str, object], events: list[dict[str, object]],
                started: threading.Event) -> None:
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                payload = line.removeprefix("data: ")
                events.append({"done": True} if payload == "[DONE]" else json.loads(payload))
                started.set()


def test_sigterm_drains_then_exits_0(checkpoint: Path) -> None:
    port = free_port()
    url = f"http://{LOOPBACK}:{port}"
    # 20 ms per decode step: the long stream needs >= 10 s, far past the 3 s grace, on any machine
    proc = start(checkpoint, port, "--served-model-name", "demo", step_delay_s=0.02,
                 EMO_SERVE_DRAIN_TIMEOUT="3")
    try:
        wait_ready(url, proc)
        assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == "demo"
        short: list[dict[str, object]] = []
        long: list[dict[str, object]] = []
        threads = []
        for events, tokens in ((short, 12), (long, LONG_TOKENS)):
            started = threading.Event()
            body = {"prompt": PROMPT, "max_tokens": tokens, "ignore_eos": True, "temperature": 0}
            thread = threading.Thread(target=read_stream, args=(url, body, events, started))
            thread.start()
            threads.append(thread)
            assert started.wait(60)
        proc.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(timeout=60)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    log = output(proc)
    assert "device memory plan" in log and "KV cache" in log and "draining" in log
    assert short[-1] == {"done": True}
    assert short[-2]["choices"][0]["finish_reason"] == "length"  # type: ignore[index]
    assert long[-1] == {"done": True}
    assert long[-2]["error"]["code"] == "server_shutting_down"  # type: ignore[index]
    generated = "".join(e["choices"][0]["text"] for e in long[:-2] if e.get("choices"))  # type: ignore[index]
    assert 0 < len(generated.split()) < LONG_TOKENS  # cut at the grace, after producing text


def test_a_plan_that_cannot_fit_is_refused_with_numbers(checkpoint: Path) -> None:
    proc = start(checkpoint, free_port(), "--expert-cache", "100TiB")
    assert proc.wait(timeout=120) == 1
    log = output(proc)
    assert "refusing to start" in log
    for row in ("trunk", "expert slots", "100.00 TiB", "KV cache", "workspace", "free on the device"):
        assert row in log, log

"""Fault injection: each way the engine can fail, watched over HTTP (/health, /ready, the
responses) and, for a dead engine, through the process's exit code.

Faults are planted by replacing one real component's method with one that raises; the
moments are set with events, never with sleeps. After every fault the KV slots and expert
pins are counted: no error path may leak one."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from expert_cache.base import ExpertKey
from server.engine import core as engine_core
from server.engine.faults import is_fatal
from tests.api.faulty_serve import ILLEGAL_ADDRESS
from tests.api.live_server import LOOPBACK, LiveServer, free_port, live_server, serve_config, wait_for

ROOT = Path(__file__).resolve().parents[2]
GOOD = "def add(a, b): return a + b"
POISON = "the quick brown fox jumps over the lazy dog"


@pytest.fixture
def server(checkpoint: Path) -> Iterator[LiveServer]:
    with live_server(serve_config(checkpoint, expert_load_timeout=0.5)) as live:
        yield live


def complete(live: LiveServer, prompt: str, **body: Any) -> httpx.Response:
    payload = {"model": "tiny", "prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
               **body}
    return httpx.post(f"{live.url}/v1/completions", json=payload, timeout=60)


def in_thread(call: Callable[[], httpx.Response]) -> tuple[threading.Thread, list[httpx.Response]]:
    out: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: out.append(call()))
    thread.start()
    return thread, out


def probes(live: LiveServer) -> tuple[int, int]:
    return (httpx.get(f"{live.url}/health").status_code, httpx.get(f"{live.url}/ready").status_code)


def assert_nothing_leaked(live: LiveServer) -> None:
    live.wait_idle()
    assert live.store.stats().pinned_slots == 0
    assert live.engine._core.kv_slots.num_used == 0 and live.engine.kv_usage == 0.0


def token_ids(live: LiveServer, text: str) -> list[int]:
    return list(httpx.post(f"{live.url}/tokenize", json={"prompt": text}).json()["tokens"])


def test_fatal_errors_are_told_apart() -> None:
    assert is_fatal(RuntimeError(ILLEGAL_ADDRESS))
    assert is_fatal(RuntimeError("CUDA error: device-side assert triggered\nCompile with TORCH_USE_CUDA_DSA"))
    wrapped = ValueError("while decoding")
    wrapped.__cause__ = RuntimeError("CUDA error: unspecified launch failure")
    assert is_fatal(wrapped)
    assert not is_fatal(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not is_fatal(RuntimeError("expected scalar type Float but found Half"))


def test_exception_while_admitting_fails_that_request_alone(server: LiveServer,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    poison = token_ids(server, POISON)
    real = engine_core.Detokenizer

    def detokenizer(tokenizer: Any, prompt_ids: list[int], **kw: Any) -> Any:
        if list(prompt_ids) == poison:
            raise MemoryError("injected allocation failure while admitting")
        return real(tokenizer, prompt_ids, **kw)

    monkeypatch.setattr(engine_core, "Detokenizer", detokenizer)
    good_thread, good = in_thread(lambda: complete(server, GOOD, max_tokens=12))
    bad = complete(server, POISON)
    good_thread.join(60)
    assert bad.status_code == 500 and "injected allocation failure" in bad.json()["error"]["message"]
    assert good[0].status_code == 200 and good[0].json()["choices"][0]["finish_reason"] == "length"
    assert probes(server) == (200, 200)
    assert_nothing_leaked(server)
    assert complete(server, GOOD).status_code == 200


def test_device_error_while_admitting_is_fatal(server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    def detokenizer(*args: Any, **kw: Any) -> Any:
        raise RuntimeError(ILLEGAL_ADDRESS)  # e.g. from the penalty tensors made on the device

    monkeypatch.setattr(engine_core, "Detokenizer", detokenizer)
    response = complete(server, POISON)
    assert response.status_code == 500 and ILLEGAL_ADDRESS in response.json()["error"]["message"]
    wait_for(lambda: server.engine.dead, what="the engine to be dead")
    assert probes(server) == (503, 503)


def test_exception_in_the_admission_check_fails_that_request_alone(server: LiveServer,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    budget = server.engine._core.budget
    real = budget.can_admit_pool

    def can_admit_pool(pool_size: int, *args: Any) -> bool:
        if pool_size == 5:
            raise RuntimeError("injected failure checking the pool budget")
        return bool(real(pool_size, *args))

    monkeypatch.setattr(budget, "can_admit_pool", can_admit_pool)
    good_thread, good = in_thread(lambda: complete(server, GOOD, max_tokens=12, expert_pool=4))
    bad = complete(server, POISON, expert_pool=5)
    good_thread.join(60)
    assert bad.status_code == 500 and "injected failure checking" in bad.json()["error"]["message"]
    assert good[0].status_code == 200
    assert probes(server) == (200, 200)
    assert_nothing_leaked(server)


def test_last_output_is_sent_even_if_releasing_raises(server: LiveServer,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    core = server.engine._core
    real_release, real_free = core.runner.release, core.kv_slots.free
    raised: list[str] = []

    def release(seq: Any) -> None:
        real_release(seq)
        raised.append("pins")
        raise RuntimeError("injected failure after releasing the pins")

    def free(slot: int) -> None:
        real_free(slot)
        raised.append("kv")
        raise RuntimeError("injected failure after freeing the KV slot")

    monkeypatch.setattr(core.runner, "release", release)
    monkeypatch.setattr(core.kv_slots, "free", free)
    for pool in (4, "full"):
        response = complete(server, GOOD, max_tokens=5, expert_pool=pool)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 5
    assert raised == ["kv", "pins"] * 2
    assert probes(server) == (200, 200)
    assert_nothing_leaked(server)


@pytest.mark.parametrize("message", [ILLEGAL_ADDRESS, "CUDA error: device-side assert triggered"])
def test_device_poisoning_error_kills_the_engine(server: LiveServer, monkeypatch: pytest.MonkeyPatch,
                                                 message: str) -> None:
    model = server.engine.loaded.model
    real_decode = model.decode
    both_running = threading.Event()
    deaths: list[str] = []
    server.engine.on_death(deaths.append)

    def decode(*args: Any, **kwargs: Any) -> torch.Tensor:
        if server.engine.num_running == 2:
            both_running.set()
            raise RuntimeError(message)
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(model, "decode", decode)
    assert probes(server) == (200, 200)
    threads = [in_thread(lambda: complete(server, GOOD, max_tokens=40)),
               in_thread(lambda: complete(server, POISON, max_tokens=40, stream=True))]
    assert both_running.wait(60)
    for thread, _ in threads:
        thread.join(60)
    plain, streamed = threads[0][1][0], threads[1][1][0]
    assert plain.status_code == 500 and message in plain.json()["error"]["message"]
    assert streamed.status_code == 200 and '"error"' in streamed.text  # the stream ends in an error event
    wait_for(lambda: server.engine.dead, what="the engine to be dead")
    # the listeners hear of it last, after every request has been answered
    wait_for(lambda: bool(deaths), what="the death listeners")
    assert message in deaths[0]
    assert probes(server) == (503, 503)
    assert httpx.get(f"{server.url}/health").json()["error"]["code"] == "engine_dead"
    assert complete(server, GOOD).status_code == 503  # refused under the lock: never queued
    assert server.store.stats().pinned_slots == 0 and server.engine._core.kv_slots.num_used == 0


def test_inbox_is_answered_when_the_engine_dies(server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    core = server.engine._core
    in_step, go = threading.Event(), threading.Event()

    def step() -> bool:
        in_step.set()
        assert go.wait(60)
        raise AssertionError("injected engine bug")

    monkeypatch.setattr(core, "step", step)
    first = in_thread(lambda: complete(server, GOOD))
    assert in_step.wait(60)  # the engine thread is inside a step: the next request stays queued
    second = in_thread(lambda: complete(server, POISON))
    wait_for(lambda: len(server.engine._inbox) == 1, what="the second request to be queued")
    go.set()
    for thread, out in (first, second):
        thread.join(60)
        assert out[0].status_code == 500 and "injected engine bug" in out[0].json()["error"]["message"]
    assert probes(server) == (503, 503)


def hang_reads_of_one_expert(server: LiveServer) -> tuple[ExpertKey, threading.Event, threading.Event]:
    """Make disk reads of the first MoE layer's first routable expert block until ``unblock`` is
    set (a stalled disk). Returns that key, an event set when a read starts hanging, and ``unblock``."""
    config = server.engine.model_config
    layer = config.moe_layers[0]
    stuck: ExpertKey = (layer, config.routable_experts(layer)[0])
    store: Any = server.store
    disk = store._loader.disk
    real_read = disk.read_into
    reading, unblock = threading.Event(), threading.Event()

    def read_into(key: ExpertKey, *args: Any) -> int:
        if key == stuck and not unblock.is_set():
            reading.set()
            assert unblock.wait(60)
        return int(real_read(key, *args))

    disk.read_into = read_into
    return stuck, reading, unblock


def test_a_hung_expert_read_fails_its_requests_and_the_engine_goes_on(server: LiveServer) -> None:
    """A background read that never returns (a stalled disk): requests needing that expert
    end after --expert-load-timeout; the others, and later ones, are served."""
    store: Any = server.store
    stuck, reading, unblock = hang_reads_of_one_expert(server)
    whole = server.engine.model_config.pool_bounds()[1]  # every routable expert: the stuck one too
    try:
        store.prefetch([stuck])
        assert reading.wait(30)  # the loader thread now hangs in the read
        response = complete(server, GOOD, expert_pool=whole)
        assert response.status_code == 503, response.text
        error = response.json()["error"]
        assert error["code"] == "expert_load_timeout" and f"expert {stuck}" in error["message"]
        assert probes(server) == (200, 200)
        assert_nothing_leaked(server)
    finally:
        unblock.set()
    assert store.wait_for_prefetch(30)
    assert complete(server, GOOD, expert_pool=whole).status_code == 200
    assert_nothing_leaked(server)


def test_a_request_whose_own_read_hangs_gets_503_and_the_engine_goes_on(server: LiveServer) -> None:
    """The read hangs in the loader thread working for the request itself (nothing read the
    expert before): the engine's deadline fails it after --expert-load-timeout."""
    _, _, unblock = hang_reads_of_one_expert(server)
    whole = server.engine.model_config.pool_bounds()[1]
    try:
        response = complete(server, GOOD, expert_pool=whole)
        assert response.status_code == 503, response.text
        error = response.json()["error"]
        assert error["code"] == "expert_load_timeout" and response.headers["retry-after"] == "5"
        assert probes(server) == (200, 200)
    finally:
        unblock.set()
    assert complete(server, GOOD, expert_pool=whole).status_code == 200
    assert_nothing_leaked(server)


def test_a_dead_engine_makes_the_process_exit_non_zero(checkpoint: Path) -> None:
    port = free_port()
    url = f"http://{LOOPBACK}:{port}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EMO_SERVE_DEVICE": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "tests.api.faulty_serve", "serve",
                             "--model", str(checkpoint), "--host", LOOPBACK, "--port", str(port),
                             "--max-model-len", "512"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def ready() -> bool:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                return httpx.get(f"{url}/ready", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, timeout=120, what="the server to be ready")
        response = httpx.post(f"{url}/v1/completions", json={"prompt": GOOD, "max_tokens": 4}, timeout=60)
        assert response.status_code == 500 and ILLEGAL_ADDRESS in response.json()["error"]["message"]
        assert proc.wait(timeout=60) == 1
        log = proc.stdout.read() if proc.stdout else ""
        assert "engine died" in log and ILLEGAL_ADDRESS in log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

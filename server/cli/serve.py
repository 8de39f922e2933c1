"""`emo-serve serve`: load a checkpoint and serve it over an OpenAI-compatible HTTP API.

Every flag is also an EMO_SERVE_* variable (flags win); see server/api/config.py for the list.
Start-up: settings validated -> device memory plan logged and checked -> model loaded with the
tiered expert cache -> engine -> uvicorn. SIGTERM / SIGINT drain: readiness goes 503, no new
generation is admitted, running requests get ``--drain-timeout`` seconds to finish (the engine
cuts the rest), then the process exits 0. If the engine dies (an internal error, or a CUDA
error that poisons the device), every request is answered with an error, /health turns 503 and
the server shuts down and exits 1, so that Docker's restart policy or the kubelet restarts it.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from types import FrameType

import uvicorn
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from server.api.config import ConfigError, ServeConfig, load_config
from server.api.config import add_arguments as add_config_arguments
from server.api.memory_plan import PlanError, plan_memory
from server.logs import configure as configure_logging

log = logging.getLogger("emo_serve.cli")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def build_app(config: ServeConfig) -> FastAPI:
    """Plan, load, build the engine and the app. Raises PlanError / ValueError / CheckpointError."""
    from expert_cache import TieredExpertCache
    from server.api.app import create_app
    from server.cli.default_model import default_model_dir
    from server.demo_model import DEMO_MODEL_NAME
    from server.engine.config import EngineConfig, resolve_device, resolve_dtype
    from server.engine.engine import Engine
    from server.model.loader import load_model

    model_dir = config.model if config.model is not None else default_model_dir()
    if config.model is None:
        log.info("no --model given: serving the built-in demo checkpoint %s", model_dir)
        if not config.served_model_name:
            config = replace(config, served_model_name=(DEMO_MODEL_NAME,))
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    plan = plan_memory(config, model_dir, device, dtype)
    log.info("%s", plan.describe())
    plan.check()
    registry = CollectorRegistry()
    loaded = load_model(model_dir, device=device, dtype=dtype, expert_store_factory=lambda catalog: (
        TieredExpertCache(catalog, device=device, device_budget_bytes=plan.expert_slot_bytes,
                          host_budget_bytes=plan.host_cache_bytes, registry=registry,
                          load_timeout_s=config.expert_load_timeout)))
    store = loaded.model.expert_store
    if isinstance(store, TieredExpertCache):
        # pin the host tier now: pinning GiB-sized blocks lazily would stall the first
        # requests on the engine thread
        store.allocate_host_tier()
    mc = loaded.config
    engine_config = EngineConfig(max_num_seqs=config.max_num_seqs, max_model_len=config.max_model_len,
                                 max_queue=config.max_queue, default_pool=config.pool_size,
                                 device=str(device), prefill_chunk_tokens=config.prefill_chunk_tokens,
                                 expert_load_timeout=config.expert_load_timeout)
    engine = Engine(loaded, engine_config, registry)
    log.info("loaded %s: %d layers, %s experts per layer, top-%d, vocab %d, %s on %s; default expert "
             "pool %s; max_model_len %d", model_dir, mc.num_layers, sorted(set(mc.num_experts)), mc.top_k,
             mc.vocab_size, str(dtype).removeprefix("torch."), device, engine.default_pool,
             engine.max_model_len)
    return create_app(engine, config)


class DrainingServer(uvicorn.Server):
    """On the first SIGTERM / SIGINT: mark the app draining and start the engine's graceful
    shutdown (it admits nothing new and cuts what still runs after the grace), while uvicorn
    stops accepting connections and waits for the open ones."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_timeout: float) -> None:
        super().__init__(config)
        self.app, self.drain_timeout = app, drain_timeout
        self._draining = False
        self.engine_died = False
        app.state.serving.engine.on_death(self._on_engine_death)

    def _on_engine_death(self, reason: str) -> None:
        """Engine thread: nothing can be served any more; stop so the supervisor restarts us."""
        log.critical("the engine died (%s): shutting down to be restarted", reason)
        self.engine_died = True
        self.app.state.serving.draining = True
        self.should_exit = True  # uvicorn's main loop polls it

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self._draining:
            self._draining = True
            log.info("signal %d: draining for up to %.1f s", sig, self.drain_timeout)
            state = self.app.state.serving
            state.draining = True
            threading.Thread(target=state.engine.shutdown, args=(self.drain_timeout,),
                             name="emo-serve-drain", daemon=True).start()
        super().handle_exit(sig, frame)


@contextmanager
def _signals_end_quietly() -> Iterator[None]:
    """uvicorn re-raises the signal that stopped it once it is done; answer that re-raise with
    a no-op so a drained server exits 0 instead of dying by SIGTERM."""
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args, os.environ)
    except ConfigError as exc:
        print(f"emo-serve serve: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_level)
    log.info("settings: %r", config)  # api_key is not part of the repr
    try:
        app = build_app(config)
    except PlanError as exc:
        log.error("refusing to start: %s", exc)
        return 1
    except (ValueError, OSError) as exc:  # CheckpointError is a ValueError
        log.error("cannot start: %s", exc)
        return 1
    uv_config = uvicorn.Config(app, host=config.host, port=config.port, log_config=None,
                               access_log=False, log_level=config.log_level,
                               timeout_graceful_shutdown=int(config.drain_timeout) + 5)
    server = DrainingServer(uv_config, app, config.drain_timeout)
    with _signals_end_quietly():
        server.run()
    return 0 if server.started and not server.engine_died else 1

"""`emo-serve serve`: load a checkpoint and serve it over an OpenAI-compatible HTTP API.

Every flag is also an EMO_SERVE_* variable (flags win); see server/runtime/settings.py for the list.
Start-up: settings validated -> server/runtime opens the engine (device memory plan logged and
checked, model loaded onto its expert store) -> named pools pinned -> uvicorn.
SIGTERM / SIGINT drain: readiness goes 503, no new generation is admitted, running requests get
``--drain-timeout`` seconds to finish (the engine cuts the rest), then the process exits 0.
If the engine dies (an internal error, or a CUDA error that poisons the device), every request
is answered with an error, /health turns 503 and the server shuts down and exits 1, so that
Docker's restart policy or the kubelet restarts it.
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
from types import FrameType

import uvicorn
from fastapi import FastAPI

from server.logs import configure as configure_logging
from server.runtime.memory_plan import PlanError
from server.runtime.settings import ConfigError, Settings, load_settings
from server.runtime.settings import add_arguments as add_settings_arguments

log = logging.getLogger("emo_serve.cli")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_settings_arguments(parser, "serve")


def build_app(settings: Settings) -> FastAPI:
    """Open the engine (server/runtime) and wrap it in the app. Raises PlanError / ValueError /
    CheckpointError / OSError, having released whatever it built."""
    from server.api.app import create_app
    from server.cli.default_model import with_default_model
    from server.runtime import open_engine

    if settings.model is None:
        settings = with_default_model(settings)
        log.info("no --model given: serving the built-in demo checkpoint %s", settings.model)
    runtime = open_engine(settings, start=False)  # the app's lifespan starts it
    try:
        return create_app(runtime)
    except BaseException:
        runtime.close()
        raise


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
        settings = load_settings(args, os.environ, "serve")
    except ConfigError as exc:
        print(f"emo-serve serve: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    log.info("settings: %r", settings)  # api_key is not part of the repr
    try:
        app = build_app(settings)
    except PlanError as exc:
        log.error("refusing to start: %s", exc)
        return 1
    except (ValueError, OSError) as exc:  # CheckpointError is a ValueError
        log.error("cannot start: %s", exc)
        return 1
    uv_config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None,
                               access_log=False, log_level=settings.log_level,
                               timeout_graceful_shutdown=int(settings.drain_timeout) + 5)
    server = DrainingServer(uv_config, app, settings.drain_timeout)
    with _signals_end_quietly():
        server.run()
    return 0 if server.started and not server.engine_died else 1

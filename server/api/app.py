"""create_app(engine, config): the FastAPI application around one engine.

The app owns the engine's life: the lifespan starts its thread and, at shutdown, drains it
(``engine.shutdown(drain_timeout)``). Every route shares one ``ServingState`` (app.state) and
one Prometheus registry: the engine's, on which the expert cache registered too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from server.api import routes_chat, routes_completions, routes_misc
from server.api.auth import bearer_key_checker
from server.api.config import ServeConfig
from server.api.errors import install_error_handlers
from server.api.metrics import HTTPMetrics
from server.api.request_context import RequestContextMiddleware
from server.api.routes_playground import install_playground
from server.api.serving import ServingState
from server.engine.engine import Engine

logger = logging.getLogger(__name__)


def create_app(engine: Engine, config: ServeConfig) -> FastAPI:
    loaded = engine.loaded
    names = config.served_model_name or (loaded.checkpoint_dir.name,)
    state = ServingState(engine=engine, config=config, served_names=names, registry=engine.registry,
                         model_root=str(loaded.checkpoint_dir),
                         generation_defaults=dict(loaded.generation_defaults))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        logger.info("serving %s as %s (max_model_len %d)", loaded.checkpoint_dir,
                    ", ".join(names), engine.max_model_len)
        try:
            yield
        finally:
            # After a signal the drain already ran while uvicorn waited for open connections.
            grace = 0.0 if state.draining else config.drain_timeout
            state.draining = True
            await asyncio.to_thread(engine.shutdown, grace)
            # stops the cache's loader thread once nothing can ask it for experts any more
            close = getattr(loaded.model.expert_store, "close", None)
            if callable(close):
                close()
            logger.info("engine stopped")

    app = FastAPI(title="emo-serve", version=routes_misc.package_version(), lifespan=lifespan)
    app.state.serving = state
    install_error_handlers(app)
    app.add_middleware(RequestContextMiddleware, metrics=HTTPMetrics(engine.registry))
    protected = [Depends(bearer_key_checker(config.api_key))]
    app.include_router(routes_completions.router, dependencies=protected)
    app.include_router(routes_chat.router, dependencies=protected)
    app.include_router(routes_misc.protected, dependencies=protected)
    app.include_router(routes_misc.probes)
    install_playground(app)
    return app

"""create_app(runtime): the FastAPI application around one engine (server/runtime builds it).

The app owns the engine's life from there: the lifespan starts its thread and, at shutdown,
drains it and closes the expert store (``runtime.close(drain_timeout)``). Every route shares one
``ServingState`` (app.state) and one Prometheus registry: the engine's, on which the expert
cache registered too.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI

from server.api import routes_chat, routes_completions, routes_misc, routes_pools
from server.api.auth import bearer_key_checker
from server.api.errors import install_error_handlers
from server.api.metrics import HTTPMetrics
from server.api.named_pools import PoolRegistry
from server.api.request_context import RequestContextMiddleware
from server.api.routes_playground import install_playground
from server.api.serving import ServingState
from server.cache_dir import cache_root
from server.engine.engine import Engine
from server.model.fingerprint import checkpoint_fingerprint
from server.runtime import Runtime, Settings

logger = logging.getLogger("emo_serve.api")


def default_pools_dir(served_name: str) -> Path:
    """<cache dir>/pools/<served model name>: each model keeps its own named pools."""
    return cache_root() / "pools" / re.sub(r"[^A-Za-z0-9._-]", "_", served_name)


def open_pools(engine: Engine, settings: Settings, served_name: str) -> PoolRegistry:
    """Load the named pools and make the --pin-pools ones resident. Raises ValueError (with the
    numbers) when the pinned pools cannot fit the device expert cache together."""
    loaded = engine.loaded
    directory = settings.pools_dir or default_pools_dir(served_name)
    pools = PoolRegistry(directory, checkpoint_fingerprint(loaded.checkpoint_dir, loaded.config), served_name)
    pools.load(engine)
    missing = [name for name in settings.pin_pools if name not in pools.records]
    if missing:
        logger.warning("--pin-pools: no pool named %s in %s yet; each is made resident when "
                       "POST /v1/pools creates it", ", ".join(map(repr, missing)), directory)
    pinned = [pools.named_pool(pools.records[name]) for name in settings.pin_pools if name in pools.records]
    why = engine.check_resident_fit(pinned)
    if why is not None:
        raise ValueError(f"--pin-pools {','.join(settings.pin_pools)}: {why}")
    for pool in pinned:
        engine.pin_pool(pool).result()  # the engine has not started: this runs here and now
    if pinned:
        logger.info("pinned expert pools resident on the device: %s", ", ".join(p.name for p in pinned))
    return pools


def create_app(runtime: Runtime) -> FastAPI:
    """``runtime``'s engine must not be started yet: named pools are pinned before it runs."""
    engine, settings, loaded = runtime.engine, runtime.settings, runtime.loaded
    names = settings.served_model_name or (loaded.checkpoint_dir.name,)
    state = ServingState(engine=engine, settings=settings, served_names=names, registry=engine.registry,
                         model_root=str(loaded.checkpoint_dir), pools=open_pools(engine, settings, names[0]))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        runtime.start()
        logger.info("serving %s as %s (max_model_len %d)", loaded.checkpoint_dir,
                    ", ".join(names), engine.max_model_len)
        try:
            yield
        finally:
            # After a signal the drain already ran while uvicorn waited for open connections.
            grace = 0.0 if state.draining else settings.drain_timeout
            state.draining = True
            await asyncio.to_thread(runtime.close, grace)
            logger.info("engine stopped")

    app = FastAPI(title="emo-serve", version=routes_misc.package_version(), lifespan=lifespan)
    app.state.serving = state
    app.state.runtime = runtime  # the engine with its store and settings, for whoever holds only the app
    install_error_handlers(app)
    app.add_middleware(RequestContextMiddleware, metrics=HTTPMetrics(engine.registry))
    protected = [Depends(bearer_key_checker(settings.api_key))]
    app.include_router(routes_completions.router, dependencies=protected)
    app.include_router(routes_chat.router, dependencies=protected)
    app.include_router(routes_misc.protected, dependencies=protected)
    app.include_router(routes_pools.router, dependencies=protected)
    app.include_router(routes_misc.probes)
    install_playground(app)
    return app

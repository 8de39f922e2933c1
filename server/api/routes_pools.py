"""/v1/pools (extension): named expert pools, served as the models ``<served>:<name>``.

POST computes a pool from 1-16 example texts with EMO's serving rule, the scores summed over
every example's prompt tokens (on the engine thread, like a prefill), saves it and answers it;
a POST to an existing name replaces it. GET lists them, DELETE removes one (404 when unknown).
Requests already running on a replaced or deleted pool finish on the pool they started with.
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Request

from server.api.errors import APIError, bad_request
from server.api.generation import encode
from server.api.named_pools import PoolRecord, now, valid_pool_name
from server.api.protocol import PoolCreateRequest
from server.api.responses import ExpertPoolDeleted, ExpertPoolList, ExpertPoolObject
from server.api.serving import ServingState, read_body, serving
from server.engine.named_pools import PoolNotResident
from server.engine.request import EngineShutdown, RequestError

logger = logging.getLogger("emo_serve.api")
router = APIRouter()


def pool_object(state: ServingState, record: PoolRecord) -> ExpertPoolObject:
    return ExpertPoolObject(name=record.name, model=state.pools.model_id(record.name), size=record.size,
                            experts=record.experts, created=record.created, examples=record.examples,
                            resident=record.name in state.engine.resident_pools)


def _known(state: ServingState, name: str) -> PoolRecord:
    if not valid_pool_name(name):
        raise bad_request(f"{name[:80]!r} is not a pool name", param="name")
    record = state.pools.records.get(name)
    if record is None:
        raise APIError(404, f"There is no expert pool named {name!r}", param="name", code="pool_not_found")
    return record


def _engine_error(exc: Exception) -> APIError:
    if isinstance(exc, RequestError):
        return APIError(400, exc.message, param=exc.param, code=exc.code)
    if isinstance(exc, PoolNotResident):
        return APIError(409, str(exc), param="name", code="pool_not_resident")
    if isinstance(exc, EngineShutdown):
        return APIError(503, f"Server is not accepting requests: {exc.message}", code="server_shutting_down")
    raise exc


@router.post("/v1/pools")
async def create_pool(request: Request) -> ExpertPoolObject:
    state = serving(request)
    body = await read_body(request, PoolCreateRequest, state.settings.max_body_bytes)
    state.ensure_accepting()
    size = body.size if body.size is not None else state.engine.default_pool
    if size == "full":
        raise bad_request("size is required: this server's default is per-token routing over all "
                          "experts ('full'), which has no pool", param="size")
    examples = [await encode(state, text) for text in body.examples]
    try:
        experts = await asyncio.wrap_future(state.engine.compute_pool(examples, size))
    except (RequestError, EngineShutdown) as exc:
        raise _engine_error(exc) from None
    record = PoolRecord(body.name, size, experts, now(), len(examples), sum(map(len, examples)))
    async with state.pools_lock:
        if body.name in state.settings.pin_pools:
            try:
                await asyncio.wrap_future(state.engine.pin_pool(state.pools.named_pool(record)))
            except (PoolNotResident, EngineShutdown, RequestError) as exc:
                raise _engine_error(exc) from None
        await asyncio.to_thread(state.pools.save, record)
        replaced = body.name in state.pools.records
        state.pools.records[body.name] = record
    logger.info("expert pool %r %s: size %d from %d example(s), %d tokens", body.name,
                "replaced" if replaced else "created", size, record.examples, record.example_tokens)
    return pool_object(state, record)


@router.get("/v1/pools")
async def list_pools(request: Request) -> ExpertPoolList:
    state = serving(request)
    return ExpertPoolList(data=[pool_object(state, r) for _, r in sorted(state.pools.records.items())])


@router.get("/v1/pools/{name}")
async def get_pool(request: Request, name: str) -> ExpertPoolObject:
    state = serving(request)
    return pool_object(state, _known(state, name))


@router.delete("/v1/pools/{name}")
async def delete_pool(request: Request, name: str) -> ExpertPoolDeleted:
    state = serving(request)
    async with state.pools_lock:
        _known(state, name)
        if name in state.engine.resident_pools:
            try:
                await asyncio.wrap_future(state.engine.unpin_pool(name))
            except EngineShutdown as exc:
                raise _engine_error(exc) from None
        await asyncio.to_thread(state.pools.delete, name)
        del state.pools.records[name]
    logger.info("expert pool %r deleted", name)
    return ExpertPoolDeleted(name=name, model=state.pools.model_id(name))

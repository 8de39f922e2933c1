"""The small routes: models, probes, metrics, version, tokenizer, expert-cache snapshot.

``protected`` routes sit behind the API key like /v1 generation; ``probes`` stay open so load
balancers and Prometheus need no secret. /health says the process can serve: 503 once the engine
has died (the process then exits non-zero by itself, see cli/serve.py); /ready says the model is
loaded and the engine thread runs (and the server is not draining).
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.api.errors import APIError
from server.api.generation import check_token_ids, encode
from server.api.protocol import DetokenizeRequest, TokenizeRequest
from server.api.responses import (
    DetokenizeResponse,
    ExpertCacheInfo,
    ModelCard,
    ModelList,
    TokenizeResponse,
)
from server.api.routes_chat import chat_prompt
from server.api.serving import read_body, serving

protected = APIRouter()
probes = APIRouter()


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("emo-serve")
    except PackageNotFoundError:
        return "0+unknown"


@protected.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    state = serving(request)
    cards = [ModelCard(id=name, root=state.model_root, max_model_len=state.max_model_len)
             for name in state.served_names]
    # named pools are listed like vLLM lists LoRA adapters: their own id, the base as parent
    cards += [ModelCard(id=state.pools.model_id(name), root=str(state.pools.path(name)),
                        parent=state.pools.model, created=record.created, max_model_len=state.max_model_len)
              for name, record in sorted(state.pools.records.items())]
    return ModelList(data=cards)


@protected.get("/v1/expert_cache")
async def expert_cache(request: Request) -> ExpertCacheInfo:
    store = serving(request).engine.loaded.model.expert_store
    # off the event loop: the snapshot waits for the cache's lock, which the engine holds briefly
    return ExpertCacheInfo.of(await asyncio.to_thread(store.snapshot))


@protected.post("/tokenize")
async def tokenize(request: Request) -> TokenizeResponse:
    state = serving(request)
    body = await read_body(request, TokenizeRequest, state.settings.max_body_bytes)
    state.resolve_model(body.model)
    if body.messages is not None:
        tokens = (await chat_prompt(state, body.messages,
                                    add_generation_prompt=body.add_generation_prompt)).token_ids
    else:
        assert body.prompt is not None
        tokens = await encode(state, body.prompt, add_special=body.add_special_tokens)
    return TokenizeResponse(count=len(tokens), max_model_len=state.max_model_len, tokens=tokens)


@protected.post("/detokenize")
async def detokenize(request: Request) -> DetokenizeResponse:
    state = serving(request)
    body = await read_body(request, DetokenizeRequest, state.settings.max_body_bytes)
    state.resolve_model(body.model)
    check_token_ids(state, body.tokens, "tokens")
    return DetokenizeResponse(prompt=state.tokenizer.decode(body.tokens))


@probes.get("/health")
async def health(request: Request) -> dict[str, str]:
    engine = serving(request).engine
    if engine.dead:  # liveness: this process can never serve again, restart it
        raise APIError(503, f"The engine has stopped: {engine.death_reason or 'its thread is gone'}",
                       code="engine_dead")
    return {"status": "ok"}


@probes.get("/ready")
async def ready(request: Request) -> dict[str, str]:
    serving(request).ensure_accepting()  # 503 while loading, draining or after an engine failure
    return {"status": "ready"}


@probes.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(generate_latest(serving(request).registry), media_type=CONTENT_TYPE_LATEST)


@probes.get("/version")
async def version() -> dict[str, str]:
    return {"version": package_version()}

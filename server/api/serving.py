"""What every route needs: the engine, the settings, the served names, readiness, and a body
reader that enforces the size limit and answers bad JSON with 400.

Bodies are parsed here rather than by FastAPI so that every failure (too large, not UTF-8, not
JSON, wrong types) takes the same path to one 400 in OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from server.api.errors import APIError, bad_request, validation_error
from server.api.named_pools import PoolRegistry
from server.api.protocol import GenerationFields, RequestModel
from server.engine.engine import Engine
from server.engine.request import NamedPool
from server.model.tokenizer import TokenizerBundle
from server.runtime.settings import Settings

logger = logging.getLogger("emo_serve.api")
M = TypeVar("M", bound=RequestModel)


@dataclass
class ServingState:
    engine: Engine
    settings: Settings
    served_names: tuple[str, ...]
    registry: CollectorRegistry
    model_root: str  # where the weights come from, for /v1/models
    pools: PoolRegistry
    draining: bool = False  # set on SIGTERM: new generation requests get 503
    pools_lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one pool change at a time

    @property
    def tokenizer(self) -> TokenizerBundle:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def resolve_model(self, name: str | None) -> str:
        """The served name (or named-pool model id) to answer with; 404 for a name this server
        does not serve."""
        return self.resolve_target(name)[0]

    def resolve_target(self, name: str | None) -> tuple[str, NamedPool | None]:
        """The model name to answer with, and the named pool when ``name`` is
        ``<served>:<pool>``; 404 model_not_found otherwise."""
        if name is None:
            return self.served_names[0], None
        if name in self.served_names:
            return name, None
        base, _, pool = name.rpartition(":")
        if base in self.served_names:
            record = self.pools.records.get(pool)
            if record is not None:
                return name, self.pools.named_pool(record)
            raise APIError(404, f"The model {name!r} does not exist: {base!r} has no expert pool named "
                           f"{pool!r} (GET /v1/pools lists them)", param="model", code="model_not_found")
        raise APIError(404, f"The model {name!r} does not exist; this server serves "
                       f"{', '.join(map(repr, self.served_names))} and their named pools "
                       f"('<model>:<pool>')", param="model", code="model_not_found")

    def resolve_generation(self, body: GenerationFields) -> tuple[str, NamedPool | None]:
        """``resolve_target`` for a completion or chat request; a named pool excludes
        ``expert_pool`` (the pool is the name's)."""
        model, pool = self.resolve_target(body.model)
        if pool is not None and body.expert_pool is not None:
            raise bad_request(f"expert_pool cannot be given with the named-pool model {model!r}: the "
                              "model fixes the pool", param="expert_pool")
        return model, pool

    def ensure_accepting(self) -> None:
        if self.draining:
            raise APIError(503, "Server is shutting down", code="server_shutting_down")
        if not self.engine.ready:
            raise APIError(503, "Model is not ready", code="not_ready")


def serving(request: Request) -> ServingState:
    state = request.app.state.serving
    assert isinstance(state, ServingState)
    return state


async def read_body(request: Request, model: type[M], max_bytes: int) -> M:
    """The body validated as ``model``; 400 when too large, not JSON, or not the right shape."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise _too_large(max_bytes)
    try:
        raw = json.loads(bytes(body))  # bytes: the encoding is detected; bad UTF-8 raises here
    except UnicodeDecodeError as exc:
        raise bad_request(f"Request body is not valid UTF-8 ({exc.reason} at byte {exc.start})",
                          code="invalid_body") from None
    except (ValueError, RecursionError) as exc:
        raise bad_request(f"Request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(raw, dict):
        raise bad_request("Request body must be a JSON object", code="invalid_json")
    if b"\\u" in body or b"\\U" in body:
        _check_no_lone_surrogates(raw)
    try:
        parsed = model.model_validate(raw)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None
    ignored = parsed.unknown_fields(raw)
    if ignored:
        logger.info("ignoring unknown request fields: %s", ", ".join(ignored[:10]))
    return parsed


def _check_no_lone_surrogates(raw: dict[str, Any]) -> None:
    """JSON escapes can spell half a UTF-16 pair ("\\ud800"), which no tokenizer can take."""
    try:
        json.dumps(raw, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request("Request body holds an unpaired UTF-16 surrogate escape (e.g. \\ud800)",
                          code="invalid_body") from None


def _too_large(max_bytes: int) -> APIError:
    return bad_request(f"Request body is larger than the server's limit of {max_bytes} bytes",
                       code="request_too_large")

"""Per-request context: X-Request-Id, access log, HTTP metrics and the last-resort 500.

A pure ASGI middleware (not Starlette's BaseHTTPMiddleware): it passes ``receive`` through
untouched, so routes still see ``http.disconnect`` and can cancel engine work when a client
goes away. The request id is put in a context variable (server.logs.REQUEST_ID) that the log
format of every command carries, so log lines of one request can be found by the id the client
sent or received.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import error_response
from server.api.metrics import HTTPMetrics
from server.logs import REQUEST_ID

logger = logging.getLogger("emo_serve.api.access")

_VALID_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")  # anything else is replaced: no log injection
# probes, scrapes and the playground's polling (4 a second while it generates): logged at DEBUG
_QUIET = frozenset({"/health", "/ready", "/metrics", "/v1/expert_cache"})
CLIENT_DISCONNECTED = 499  # status recorded when the client left before the response (nginx's)


def request_id_of(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            text: str = value.decode("latin-1")
            if _VALID_ID.fullmatch(text):
                return text
            break
    return uuid.uuid4().hex


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, metrics: HTTPMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_of(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        token = REQUEST_ID.set(request_id)
        status: int | None = None
        start = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", request_id.encode())]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            # Never a traceback to the client; the log keeps it, tagged with the request id.
            logger.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if status is None:
                await error_response(500, "Internal server error", code="internal_error")(
                    scope, receive, send_with_id
                )
        finally:
            self.metrics.in_flight.dec()
            seconds = time.perf_counter() - start
            final = status if status is not None else CLIENT_DISCONNECTED
            endpoint = _endpoint(scope)
            self.metrics.observe(endpoint, final, seconds)
            level = logging.DEBUG if endpoint in _QUIET else logging.INFO
            logger.log(level, "%s %s %d %.3fs", scope.get("method"), scope.get("path"), final, seconds)
            REQUEST_ID.reset(token)


def _endpoint(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "other"

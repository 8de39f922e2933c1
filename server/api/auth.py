"""Bearer-key check for the protected routes (/v1/*, /tokenize, /detokenize).

/health, /ready, /metrics and /version stay open so that probes and Prometheus need no secret.
The key is compared in constant time and never logged (Settings keeps it out of repr).
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from fastapi import Request

from server.api.errors import APIError


def bearer_key_checker(api_key: str | None) -> Callable[[Request], Awaitable[None]]:
    """A FastAPI dependency raising 401 unless ``Authorization: Bearer <api_key>`` is sent."""
    expected = api_key.encode("utf-8") if api_key is not None else None

    async def check(request: Request) -> None:
        if expected is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # Header values arrive decoded as latin-1: encoding back gives the bytes the client sent.
        given = token.strip().encode("latin-1") if scheme.lower() == "bearer" else b""
        if not hmac.compare_digest(given, expected):
            raise APIError(401, "Invalid or missing API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    return check

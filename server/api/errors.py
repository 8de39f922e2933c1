"""Every error the API answers, in OpenAI's shape, through one helper (``error_response``).

    {"error": {"message": str, "type": str, "param": str | null, "code": str | null}}

Routes raise ``APIError``; validation problems of any origin (pydantic, FastAPI, our own limit
checks) become 400 rather than FastAPI's 422; unknown routes keep their 404 / 405 status.
Unexpected exceptions are answered 500 with a generic message by the request middleware
(server/api/request_context.py), which logs the traceback with the request id.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("emo_serve.api")

# OpenAI answers 401 and 404 with type invalid_request_error too; ``code`` tells them apart.
_TYPES = {429: "rate_limit_error", 503: "service_unavailable"}


class APIError(Exception):
    """An error answered to the client as is: ``status`` plus OpenAI's error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = dict(headers or {})


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def error_response(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """The one place an error response is built."""
    return JSONResponse(error_body(status, message, param=param, code=code), status_code=status,
                        headers=dict(headers or {}))


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None
               ) -> dict[str, dict[str, str | None]]:
    """The JSON of an error, also sent as an SSE event when a stream fails after it started."""
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def validation_error(errors: Sequence[Mapping[str, Any]]) -> APIError:
    """400 for the first pydantic error; ``param`` is its dotted location (``messages.0.role``)."""
    if not errors:
        return bad_request("invalid request")
    first = errors[0]
    cause = (first.get("ctx") or {}).get("error")
    cause_param = getattr(cause, "param", None) if isinstance(cause, ValueError) else None
    if isinstance(cause_param, str):
        return bad_request(str(cause), param=cause_param)  # a FieldError of server/api/protocol.py
    loc = [str(part) for part in first.get("loc", ()) if not _is_type_tag(part)]
    param = ".".join(loc) or None
    message = str(first.get("msg", "invalid value"))
    return bad_request(f"{param}: {message}" if param else message, param=param)


def _is_type_tag(part: object) -> bool:
    """pydantic puts union members (``str``, ``list[int]``, ``function-after[...]``) in ``loc``."""
    return isinstance(part, str) and (
        part == "body" or part in {"str", "int", "float", "bool", "list", "dict", "none"}
        or any(c in part for c in "[]'-")
    )


async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return error_response(exc.status, exc.message, param=exc.param, code=exc.code, headers=exc.headers)


async def _request_validation(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError | ValidationError)
    return await _api_error(_, validation_error(exc.errors()))


async def _http_exception(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(status).phrase
    return error_response(status, message, code=HTTPStatus(status).phrase.lower().replace(" ", "_"),
                          headers=exc.headers)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _request_validation)
    app.add_exception_handler(ValidationError, _request_validation)
    app.add_exception_handler(StarletteHTTPException, _http_exception)

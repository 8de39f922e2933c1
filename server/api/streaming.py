"""Server-sent events: framing and a response that always cleans up after itself.

Each event is ``data: <json>\\n\\n`` (the JSON never contains a newline); the stream ends with
``data: [DONE]\\n\\n``. ``SSEResponse`` runs ``on_close`` however the stream ends: completed,
client disconnected (Starlette cancels the body task), or cancelled by a graceful-shutdown
timeout. That is where unfinished engine requests are cancelled, so KV and pins are freed.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from server.api.engine_bridge import RequestGroup
from server.api.errors import APIError, error_body
from server.api.generation import finish_reason
from server.api.responses import FinishReason
from server.api.serving import ServingState
from server.engine.request import RequestOutput

DONE = b"data: [DONE]\n\n"


def sse_event(payload: BaseModel | dict[str, Any], *, exclude: set[str] | None = None) -> bytes:
    if isinstance(payload, BaseModel):
        data = payload.model_dump_json(exclude=exclude)
    else:
        data = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return b"data: " + data.encode("utf-8") + b"\n\n"


class SSEResponse(StreamingResponse):
    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._events, self._on_close = events, on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
            aclose = getattr(self._events, "aclose", None)
            if aclose is not None:
                await aclose()


class ChunkRenderer(Protocol):
    """Turns engine outputs into one endpoint's chunks (completions or chat)."""

    def head(self) -> list[bytes]: ...

    def output(self, index: int, out: RequestOutput, reason: FinishReason | None, last: bool
               ) -> bytes | None:
        """The event for ``out`` of choice ``index`` (None: nothing to send yet); ``reason`` is
        set on its final output; ``last``: no other choice is still running."""

    def tail(self) -> bytes | None: ...


async def sse_stream(group: RequestGroup, state: ServingState, render: ChunkRenderer
                     ) -> AsyncIterator[bytes]:
    """head, one event per useful output, tail (usage), [DONE]. A choice that fails ends the
    stream with an error event (OpenAI's error shape) and cancels the others."""
    for event in render.head():
        yield event
    async for index, out in group.outputs():
        reason = None
        if out.finished:
            try:
                reason = finish_reason(out, state)
            except APIError as exc:
                group.cancel()
                yield sse_event(error_body(exc.status, exc.message, param=exc.param, code=exc.code))
                break
        chunk = render.output(index, out, reason, last=not group.pending)
        if chunk is not None:
            yield chunk
    else:
        tail = render.tail()
        if tail is not None:
            yield tail
    yield DONE

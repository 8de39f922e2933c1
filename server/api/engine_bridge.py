"""The hand-off between the engine thread and the event loop, and cancellation the other way.

One HTTP request may become several engine requests (n > 1, a list of prompts). They share one
``RequestGroup``: the engine thread calls ``on_output`` (must not block), which schedules a
``put_nowait`` on the loop; the handler awaits the queue. ``cancel`` reaches the engine for
every engine request not finished yet, and is safe to call more than once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from starlette.requests import Request

from server.api.errors import APIError
from server.engine.engine import Engine
from server.engine.request import (
    EngineShutdown,
    GenerationRequest,
    QueueFull,
    RequestError,
    RequestOutput,
)

logger = logging.getLogger("emo_serve.api")


class RequestGroup:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, RequestOutput]] = asyncio.Queue()
        self.pending: set[str] = set()  # engine request ids not finished yet

    def submit_all(self, requests: list[GenerationRequest]) -> None:
        """Submit every request (choice i = requests[i]); on any refusal cancel the ones queued
        and raise the matching APIError (400 invalid, 429 queue full, 503 shutting down)."""
        try:
            for index, req in enumerate(requests):
                self.engine.submit(req, self._callback(index))
                self.pending.add(req.request_id)
        except EngineShutdown as exc:
            self.cancel()
            raise APIError(503, f"Server is not accepting requests: {exc.message}",
                           code="server_shutting_down") from None
        except QueueFull as exc:
            self.cancel()
            raise APIError(429, f"Too many requests waiting: {exc.message}", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except RequestError as exc:
            self.cancel()
            raise APIError(400, exc.message, param=exc.param, code=exc.code) from None

    def _callback(self, index: int) -> Callable[[RequestOutput], None]:
        def on_output(out: RequestOutput) -> None:  # runs on the engine thread
            # RuntimeError: the loop has closed (shutdown), nobody is listening any more.
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, out))

        return on_output

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Every output of every engine request, in arrival order, until all have finished."""
        while self.pending:
            index, out = await self.queue.get()
            if out.finished:
                self.pending.discard(out.request_id)
            yield index, out

    def cancel(self) -> None:
        for request_id in list(self.pending):
            try:
                self.engine.cancel(request_id)
            except Exception:  # cancelling must never fail the caller's cleanup
                logger.exception("engine.cancel(%s) failed", request_id)
        self.pending.clear()


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client has gone away. Only for use once the body has been read: after
    that, the next ASGI message of an HTTP request is ``http.disconnect``."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return

"""Logging for every `emo-serve` command, set up in this one place.

Loggers are named ``emo_serve.<package>`` after the package that logs: ``emo_serve.api``,
``emo_serve.engine``, ``emo_serve.model``, ``emo_serve.expert_cache``, ``emo_serve.cli``, ...
(the HTTP access log is ``emo_serve.api.access``, so that it can be tuned apart). One prefix
thus selects all of emo-serve's records, and a record's name says where it came from.
``expert_cache`` spells its name out rather than importing this module: it never imports
``server``.

``server.cli.main`` calls ``configure()`` before any subcommand runs: warnings and errors of
every command go to stderr in one format, which carries the request id of the HTTP request a
record belongs to (``-`` outside one). ``serve`` calls it again with its ``--log-level`` once
its settings are validated.
"""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar
from typing import TextIO

ROOT = "emo_serve"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
# set by the HTTP middleware (server/api/request_context.py) for the span of one request
REQUEST_ID: ContextVar[str] = ContextVar("emo_serve_request_id", default="-")


class RequestIdLogFilter(logging.Filter):
    """Adds ``record.request_id`` (``-`` outside a request) for formats using %(request_id)s."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time of the record, not the stream it was
    when logging was configured (pytest's capture, for one, swaps it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _: TextIO) -> None:
        pass


def configure(level: str = "warning") -> None:
    """Route every record at ``level`` or above (a name: debug, info, warning, error, critical)
    to stderr. Calling it again changes the level and never adds a second handler; handlers that
    others put on the root logger (pytest's, for one) are left alone."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(RequestIdLogFilter())
    root.addHandler(handler)
    root.setLevel(level.upper())

"""A loader thread that runs best-effort prefetches off the caller's thread.

Requests are handled in order; when the thread falls behind, the oldest requests (the least
useful predictions) are dropped. The thread starts on the first request and is a daemon, so an
idle cache costs no thread and a forgotten ``close`` does not hang interpreter exit.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

from expert_cache.base import ExpertKey

log = logging.getLogger("emo_serve.expert_cache")
MAX_QUEUED = 64


class Prefetcher:
    def __init__(self, work: Callable[[list[ExpertKey]], None], name: str = "emo-expert-prefetch") -> None:
        self._work, self._name = work, name
        self._cond = threading.Condition()
        self._queue: deque[list[ExpertKey]] = deque(maxlen=MAX_QUEUED)
        self._busy = False
        self._closed = False
        self._thread: threading.Thread | None = None

    def submit(self, keys: list[ExpertKey]) -> None:
        with self._cond:
            if self._closed:
                return
            self._queue.append(keys)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until every submitted request has been handled; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._busy, timeout)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._queue.clear()
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closed)
                if self._closed:
                    return
                keys = self._queue.popleft()
                self._busy = True
            try:
                self._work(keys)
            except Exception:  # best effort: a failed prefetch must not kill the loader
                log.exception("expert prefetch failed")
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

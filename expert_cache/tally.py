"""Per-thread totals of the cache traffic a thread caused: device hits and misses of its
``acquire`` calls and the bytes its loads moved.

The global counters (``stats()``) cannot say who caused what once loader and prefetch threads
work while the engine computes; a caller that reads its own thread's totals before and after a
piece of work gets exactly that work's traffic.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class Traffic:
    hits: int = 0
    misses: int = 0
    bytes_loaded: int = 0

    def __sub__(self, other: Traffic) -> Traffic:
        return Traffic(self.hits - other.hits, self.misses - other.misses,
                       self.bytes_loaded - other.bytes_loaded)


class ThreadTally:
    def __init__(self) -> None:
        self._local = threading.local()

    def add(self, hits: int = 0, misses: int = 0, nbytes: int = 0) -> None:
        t = self.read()
        self._local.totals = Traffic(t.hits + hits, t.misses + misses, t.bytes_loaded + nbytes)

    def read(self) -> Traffic:
        """The calling thread's totals so far."""
        totals: Traffic = getattr(self._local, "totals", Traffic())
        return totals

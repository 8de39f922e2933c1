"""Pinning experts off the caller's thread: loader threads that run ``ExpertStore.acquire``.

A server's engine thread must never wait for a disk read or a host->device copy. It asks for a
pool here and goes on; a loader thread pins the keys (reading and copying what is not resident;
on CUDA the copies run on the cache's copy stream and the compute stream waits only for the
per-slot events of the slots it reads, see device_tier.py) and the caller picks the finished load
up later. Two loads of one key at once read it once: the second waits for the first's fill
(residency.py's FILLING state), in its own loader thread.

Ownership: a finished ``pin`` load owns one pin per key, which whoever ``take``s it must release.
A load that is ``abandon``ed (its request was cancelled) releases its own pins when it finishes,
so nothing leaks however late a slow read returns. ``warm`` loads hold no pins when done.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from expert_cache.base import ExpertKey, ExpertStore, SlotsExhausted
from expert_cache.tally import Traffic

log = logging.getLogger("emo_serve.expert_cache")


class ExpertLoad:
    """One load in flight (or finished). ``done`` never blocks; ``take`` re-raises the load's
    failure (SlotsExhausted, CheckpointError, ...) and hands over its pins."""

    def __init__(self, keys: list[ExpertKey], pins: bool, future: Future[None]) -> None:
        self.keys, self.pins, self.future = keys, pins, future
        self.traffic = Traffic()  # what this load cost the cache (hits, misses, bytes), once done
        self.abandoned = False
        self.finishing = False  # set once, when the load's completion is being handled
        self.submitted = time.monotonic()  # callers bound how long they wait from here

    def done(self) -> bool:
        return self.future.done()

    def take(self) -> list[ExpertKey]:
        """The pinned keys (``[]`` for a warm load); raises what the load raised."""
        if not self.future.done():
            raise RuntimeError("ExpertLoad.take: the load has not finished")
        self.future.result()
        return list(self.keys) if self.pins else []


class AsyncPinner:
    """Loader threads over one store. ``on_done`` is called (in a loader thread) after every
    load finishes, e.g. to wake an engine loop waiting for it."""

    def __init__(self, store: ExpertStore, threads: int = 2,
                 on_done: Callable[[], None] | None = None) -> None:
        if threads < 1:
            raise ValueError(f"AsyncPinner: threads must be >= 1, got {threads}")
        self.store, self.on_done = store, on_done
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="emo-expert-load")
        self._lock = threading.Lock()
        self._in_flight: set[ExpertLoad] = set()

    @property
    def in_flight(self) -> int:
        """Loads submitted and not finished yet (abandoned ones included)."""
        with self._lock:
            return len(self._in_flight)

    def pin(self, keys: Sequence[ExpertKey]) -> ExpertLoad:
        """Pin ``keys`` (one slab, as for ``acquire``) in a loader thread."""
        return self._submit(list(keys), True, self._pin)

    def warm(self, keys: Sequence[ExpertKey]) -> ExpertLoad:
        """Page ``keys`` onto the device tier without keeping them pinned (best effort: as many
        at a time as there are free slots; a failed read is left for the caller's own acquire
        to meet and report)."""
        return self._submit(list(keys), False, self._warm)

    def abandon(self, load: ExpertLoad) -> None:
        """The caller no longer wants ``load``: its pins are released as soon as it finishes
        (now, if it has)."""
        with self._lock:
            load.abandoned = True
            finished = load.finishing
        if finished:
            self._release_abandoned(load)
        else:
            load.future.cancel()  # not started yet: it never will (and pins nothing)

    def close(self, wait: bool = True) -> None:
        """Drop queued loads; let running ones finish (abandoned ones release their pins), and
        with ``wait`` block until they have."""
        self._pool.shutdown(wait=wait, cancel_futures=True)

    # ---- loader threads ----------------------------------------------------------------------
    def _submit(self, keys: list[ExpertKey], pins: bool,
                work: Callable[[list[ExpertKey]], None]) -> ExpertLoad:
        load = ExpertLoad(keys, pins, Future())
        load.future = self._pool.submit(self._run, work, load)
        with self._lock:
            self._in_flight.add(load)
        load.future.add_done_callback(lambda _: self._finished(load))  # runs now if already done
        return load

    def _run(self, work: Callable[[list[ExpertKey]], None], load: ExpertLoad) -> None:
        before = self.store.thread_traffic()
        try:
            # host buffers the cache allocated under the engine's inference_mode can only be
            # written inside it
            with torch.inference_mode():
                work(load.keys)
        finally:
            load.traffic = self.store.thread_traffic() - before

    def _pin(self, keys: list[ExpertKey]) -> None:
        self.store.acquire(keys)

    def _warm(self, keys: list[ExpertKey]) -> None:
        by_layer: dict[int, list[ExpertKey]] = {}
        for key in keys:
            by_layer.setdefault(key[0], []).append(key)
        for layer, group in sorted(by_layer.items()):
            i = 0
            while i < len(group):
                part = group[i : i + max(1, self.store.free_slots(layer))]
                i += len(part)
                try:
                    self.store.acquire(part)
                except SlotsExhausted:
                    break  # others hold the slots: the step's own acquire pages the rest
                except Exception:  # noqa: BLE001 - best effort; the compute's acquire reports it
                    log.debug("warming %d experts of layer %d failed", len(part), layer, exc_info=True)
                    continue
                self.store.release(part)

    def _finished(self, load: ExpertLoad) -> None:
        with self._lock:  # exactly one of this and ``abandon`` releases an abandoned load
            load.finishing = True
            abandoned = load.abandoned
        if abandoned:
            self._release_abandoned(load)
        with self._lock:  # after the release: in_flight == 0 means no pin is left behind
            self._in_flight.discard(load)
        if self.on_done is not None:
            try:
                self.on_done()
            except Exception:  # noqa: BLE001 - a broken callback must not kill a loader thread
                log.exception("AsyncPinner on_done raised")

    def _release_abandoned(self, load: ExpertLoad) -> None:
        if not load.pins or load.future.cancelled() or load.future.exception() is not None:
            return  # nothing pinned: a failed acquire pins nothing
        self.store.release(load.keys)

"""The engine: one thread owns the device and runs ``EngineCore.step`` in a loop.

Other threads only talk to it through ``submit`` / ``cancel`` / ``shutdown`` and the named-pool
jobs ``compute_pool`` / ``pin_pool`` / ``unpin_pool`` (thread-safe hand-offs under one condition
variable; the jobs answer through a Future) and read a few counters. Outputs come back through
each request's ``on_output`` callback, called on the engine thread: it must not block.

Death: an exception that escapes a step (a bug in the engine itself) or a fatal device error
(faults.py) stops the thread. It then, under the lock ``submit`` takes, marks the engine dead,
answers everything queued or running with an error, and calls the ``on_death`` listeners (the
server exits non-zero on it so that its supervisor restarts it). Whatever is still in the inbox
when the thread stops for any reason is answered too: no request is ever left waiting.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import torch
from prometheus_client import CollectorRegistry

from expert_cache.base import SlotsExhausted
from server.engine.config import MAX_MODEL_LEN_CAP, EngineConfig
from server.engine.core import EngineCore
from server.engine.faults import is_fatal
from server.engine.metrics import EngineMetrics
from server.engine.model_runner import ModelRunner, model_device_dtype
from server.engine.named_pools import ControlJob, PoolLists, ResidentPools, examples_to_pools
from server.engine.request import (
    EngineShutdown,
    GenerationRequest,
    NamedPool,
    PoolSpec,
    QueueFull,
    RequestError,
    RequestOutput,
)
from server.engine.sampling_defaults import SamplingDefaults
from server.engine.scheduler import SchedulerConfig
from server.model.devices import resolve_device
from server.model.dtypes import resolve_dtype
from server.model.kv_cache import KVCache

if TYPE_CHECKING:
    from server.model.config import ModelConfig
    from server.model.loader import LoadedModel
    from server.model.tokenizer import TokenizerBundle

log = logging.getLogger("emo_serve.engine")
OnOutput = Callable[[RequestOutput], None]


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index or 0) == (b.index or 0)


class Engine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig,
                 registry: CollectorRegistry | None = None) -> None:
        self.loaded, self.config = loaded, config
        mc = loaded.config
        device, model_dtype = model_device_dtype(loaded.model)
        if config.device is not None and not _same_device(resolve_device(config.device), device):
            raise ValueError(f"EngineConfig.device: {config.device!r} but the model is on {device}")
        self._max_model_len = config.max_model_len or min(mc.max_position_embeddings, MAX_MODEL_LEN_CAP)
        if self._max_model_len > mc.max_position_embeddings:
            raise ValueError(f"EngineConfig.max_model_len: {self._max_model_len} is more than the "
                             f"model's max_position_embeddings {mc.max_position_embeddings}")
        kv_dtype = model_dtype if config.dtype is None else resolve_dtype(config.dtype, device)
        num_slots = config.max_num_seqs
        if config.kv_cache_bytes is not None:
            per_slot = KVCache.bytes_per_slot(mc, self._max_model_len, kv_dtype)
            num_slots = min(num_slots, config.kv_cache_bytes // per_slot)
            if num_slots < 1:
                raise ValueError(f"EngineConfig.kv_cache_bytes: {config.kv_cache_bytes} bytes hold no KV "
                                 f"slot of {self._max_model_len} tokens ({per_slot} bytes each)")
        if config.pool_size not in (None, "full"):
            # refused before any metric is registered: a failed start leaves the registry as it was
            mc.validate_pool_size(int(config.pool_size))
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = EngineMetrics(self.registry, device)
        runner = ModelRunner(loaded, num_slots, self._max_model_len, kv_dtype)
        self._core = EngineCore(loaded, runner, SchedulerConfig(max_num_seqs=num_slots,
                                                                 max_wait_steps=config.max_wait_steps),
                                self.metrics, self._forget, prefill_chunk_tokens=config.prefill_chunk_tokens,
                                loader_threads=config.loader_threads, on_load_done=self._wake,
                                async_paging=config.async_paging, prefill_share=config.prefill_share,
                                load_timeout_s=config.expert_load_timeout)
        self.default_pool: PoolSpec = self._resolve_default_pool()
        self.sampling_defaults = SamplingDefaults.from_generation_config(loaded.generation_defaults)
        self.resident: ResidentPools = self._core.resident
        self._core.max_pools = self._core.budget.pools_per_tier(
            self.default_pool if self.default_pool != "full" else mc.pool_bounds()[1])
        self.metrics.update_pool_info([], [], self._core.max_pools)
        self._cond = threading.Condition()
        self._inbox: deque[tuple[GenerationRequest, OnOutput, int | None]] = deque()
        self._jobs: deque[ControlJob] = deque()
        self._cancels: set[str] = set()
        self._active: set[str] = set()
        self._accepting, self._stopping, self._dead = True, False, False
        self._woken = False  # a load finished: the loop must look again before it sleeps
        self._deadline = 0.0
        self._thread: threading.Thread | None = None
        self.death_reason: str | None = None
        self._death_listeners: list[Callable[[str], None]] = []

    def _resolve_default_pool(self) -> PoolSpec:
        pool = self.config.pool_size
        if pool is None:
            pool = self.loaded.config.default_pool_size() or "full"
        if pool != "full":  # an explicit size was validated in __init__, the model's is valid
            why = self._core.budget.misfit(int(pool))
            if why is not None:  # explicit smaller pools and "full" still work: warn, not fail
                log.warning("default expert pool cannot be served, requests without expert_pool "
                            "will be rejected: %s", why)
        return pool

    # ---- public API ------------------------------------------------------------------------
    @property
    def tokenizer(self) -> TokenizerBundle:
        return self.loaded.tokenizer

    @property
    def model_config(self) -> ModelConfig:
        return self.loaded.config

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def ready(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive() and not self._dead and not self._stopping

    @property
    def dead(self) -> bool:
        """The engine thread stopped without being asked to (after an internal or device error),
        or is gone: this process can never serve again."""
        thread = self._thread
        return self._dead or (thread is not None and not thread.is_alive() and not self._stopping)

    def on_death(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(reason)`` once, on the engine thread, if the engine dies."""
        self._death_listeners.append(listener)

    @property
    def num_running(self) -> int:
        return self._core.scheduler.num_running

    @property
    def num_waiting(self) -> int:
        return self._core.scheduler.num_waiting + len(self._inbox)

    @property
    def num_kv_slots(self) -> int:
        """KV slots (each ``max_model_len`` tokens): the most requests that can run at once."""
        return self._core.kv_slots.num_slots

    @property
    def kv_usage(self) -> float:
        return self._core.kv_slots.usage

    def start(self) -> None:
        with self._cond:
            if self._thread is not None:
                raise RuntimeError("Engine.start: already started")
            self._thread = threading.Thread(target=self._run, name="emo-serve-engine", daemon=True)
            self._thread.start()

    def submit(self, req: GenerationRequest, on_output: OnOutput) -> None:
        """Queue a request. Raises RequestError (invalid), QueueFull, EngineShutdown."""
        pool = self._validate(req)
        with self._cond:
            if self._dead or not self._accepting:
                raise EngineShutdown("the engine is shutting down" if not self._dead
                                     else "the engine thread has stopped after an internal error")
            if req.request_id in self._active:
                raise RequestError(f"request id {req.request_id!r} is already in flight", "request_id",
                                   "duplicate_request_id")
            if self.num_waiting >= self.config.max_queue:
                raise QueueFull(f"{self.num_waiting} requests are waiting (max_queue="
                                f"{self.config.max_queue}); try again later")
            self._active.add(req.request_id)
            self._inbox.append((req, on_output, pool))
            self._cond.notify()

    # ---- named pools (POST /v1/pools): the work runs on the engine thread ------------------
    def compute_pool(self, examples: Sequence[Sequence[int]], size: int) -> Future[PoolLists]:
        """The pool EMO's rule picks from all ``examples`` together (per layer id lists).
        Raises RequestError for a bad size or example; EngineShutdown when stopping."""
        mc = self.loaded.config
        try:
            mc.validate_pool_size(size)
        except ValueError as e:
            raise RequestError(str(e), "size") from None
        # a pool is served later, maybe once other pools are no longer resident: only a pool
        # larger than the whole device tier can never be served here
        why = self._core.budget.misfit(size, beside_resident=False)
        if why is not None:
            raise RequestError(why, "size", "expert_pool_too_large")
        for i, ids in enumerate(examples):
            if not ids:
                raise RequestError(f"examples[{i}] is empty: at least one token is needed", "examples")
            if len(ids) > self._max_model_len:
                raise RequestError(f"examples[{i}] has {len(ids)} tokens, more than this server's "
                                   f"max_model_len {self._max_model_len}", "examples",
                                   "context_length_exceeded")
            bad = next((t for t in ids if not isinstance(t, int) or not 0 <= t < mc.vocab_size), None)
            if bad is not None:
                raise RequestError(f"examples[{i}]: token id {bad!r} is outside the vocabulary "
                                   f"[0, {mc.vocab_size})", "examples")
        frozen = [list(ids) for ids in examples]
        device = self._core.runner.device
        return self._control(ControlJob(lambda: examples_to_pools(self.loaded.model, frozen, size, device),
                                        retry_while_busy=True))

    def pin_pool(self, pool: NamedPool) -> Future[None]:
        """Keep ``pool`` resident on the device tier (replacing a resident pool of its name).
        The Future fails with PoolNotResident when it cannot fit; before ``start`` it runs at once."""
        self.check_named_pool(pool)
        def pin() -> None:
            self.resident.pin(pool.name, pool.keys, pool.model)
            self._core.update_gauges()

        return self._control(ControlJob(pin))

    def unpin_pool(self, name: str) -> Future[None]:
        def unpin() -> None:
            self.resident.unpin(name)
            self._core.update_gauges()

        return self._control(ControlJob(unpin))

    @property
    def resident_pools(self) -> list[str]:
        """Names of the pools kept resident on the device tier (any thread)."""
        return list(self.resident.names)

    def check_resident_fit(self, pools: Sequence[NamedPool]) -> str | None:
        """Why these pools cannot all be resident together (with the numbers), or None."""
        return self.resident.check_fit({p.name: p.keys for p in pools})

    def _control(self, job: ControlJob) -> Future[Any]:
        with self._cond:
            if self._dead or self._stopping:
                raise EngineShutdown("the engine is shutting down" if not self._dead
                                     else "the engine thread has stopped after an internal error")
            if self._thread is None:  # not started: nothing else touches the device yet
                self._run_job(job)
                return job.future
            self._jobs.append(job)
            self._cond.notify()
        return job.future

    def cancel(self, request_id: str) -> None:
        """Abort a request (no-op if unknown or finished); effective within one engine step."""
        with self._cond:
            if request_id in self._active:
                self._cancels.add(request_id)
                self._cond.notify()

    def shutdown(self, grace_s: float) -> None:
        """Stop admitting; let admitted requests finish for up to ``grace_s`` seconds, abort the
        rest (finish_reason "abort"), stop the engine thread."""
        with self._cond:
            self._accepting = False
            self._stopping = True
            self._deadline = time.monotonic() + max(0.0, grace_s)
            self._cond.notify()
            thread = self._thread
        if thread is None:  # never started: nothing ran, abort what was queued here
            self._drain_inbox()
            self._core.abort_all("abort")
            self._core.close()
            return
        thread.join(timeout=max(0.0, grace_s) + 60.0)
        if thread.is_alive():
            log.error("engine thread did not stop within %.0f s of the shutdown grace", grace_s + 60)

    # ---- validation (caller's thread; reads immutable state and thread-safe store counters) --
    def _validate(self, req: GenerationRequest) -> int | None:
        ids, sp, mc = req.prompt_token_ids, req.sampling, self.loaded.config
        if not ids:
            raise RequestError("the prompt is empty: at least one token is needed", "prompt")
        bad = next((t for t in ids if not isinstance(t, int) or not 0 <= t < mc.vocab_size), None)
        if bad is not None:
            raise RequestError(f"prompt token id {bad!r} is outside the vocabulary [0, {mc.vocab_size})",
                               "prompt")
        limit = self._max_model_len
        if len(ids) + sp.max_tokens > limit:
            raise RequestError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{len(ids) + sp.max_tokens} tokens ({len(ids)} in the prompt, {sp.max_tokens} in the "
                f"completion). Please reduce the length of the prompt or of max_tokens.",
                "prompt" if len(ids) > limit else "max_tokens", "context_length_exceeded")
        if req.named_pool is not None:
            return self.check_named_pool(req.named_pool)
        spec = req.expert_pool if req.expert_pool is not None else self.default_pool
        if spec == "full":
            return None
        try:
            pool = mc.validate_pool_size(spec)
        except ValueError as e:
            raise RequestError(str(e), "expert_pool") from None
        why = self._core.budget.misfit(pool)
        if why is not None:
            raise RequestError(why, "expert_pool", "expert_pool_too_large")
        return pool

    def check_named_pool(self, pool: NamedPool) -> int:
        """The pool's size, after checking its shape against the model and the device tier.
        Raises RequestError naming what does not fit (any thread: reads immutable state)."""
        mc = self.loaded.config
        if len(pool.experts) != mc.num_layers:
            raise RequestError(f"pool {pool.name!r} has {len(pool.experts)} layers, the model "
                               f"{mc.num_layers}", "model")
        for layer, ids in enumerate(pool.experts):
            want = pool.size if mc.is_moe(layer) else 0
            allowed = set(mc.routable_experts(layer)) if mc.is_moe(layer) else set()
            if len(ids) != want or len(set(ids)) != want or not set(ids) <= allowed:
                raise RequestError(f"pool {pool.name!r}: layer {layer} does not hold {want} distinct "
                                   f"routable experts of this model", "model")
        try:
            size = mc.validate_pool_size(pool.size)
        except ValueError as e:
            raise RequestError(f"pool {pool.name!r}: {e}", "model") from None
        why = self._core.budget.misfit(size, pool.keys)
        if why is not None:
            raise RequestError(why, "model", "expert_pool_too_large")
        return size

    # ---- the engine thread -----------------------------------------------------------------
    def _run_job(self, job: ControlJob) -> bool:
        """Run one control job; False when it must wait for device expert slots (retry later)."""
        if job.future.done():  # cancelled by its caller
            return True
        try:
            job.future.set_result(job.run())
        except SlotsExhausted as e:
            if job.retry_while_busy and self._core.has_work:
                return False
            job.future.set_exception(RequestError(
                f"the device expert cache has no free slot to compute the pool in: {e}", None,
                "expert_slots_exhausted"))
        except BaseException as e:  # noqa: BLE001 - the job's caller gets the error
            job.future.set_exception(e)
            if is_fatal(e):  # a poisoned device: the engine stops, as for a failed step
                raise
        return True

    def _run_jobs(self) -> None:
        if not self._jobs:  # the common case, without taking the lock
            return
        with self._cond:
            jobs, self._jobs = self._jobs, deque()
        waiting: list[ControlJob] = []
        for job in jobs:
            # a job that backed off runs again only once every slab has a free slot again
            busy = job.retry_while_busy and self._core.has_work and not self._core.budget.has_free_slot()
            if busy or not self._run_job(job):
                waiting.append(job)
        if waiting:
            with self._cond:
                self._jobs.extendleft(reversed(waiting))

    def _fail_jobs(self, error: BaseException) -> None:
        with self._cond:
            jobs, self._jobs = self._jobs, deque()
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(error)

    def _forget(self, request_id: str) -> None:
        with self._cond:
            self._active.discard(request_id)
            self._cancels.discard(request_id)

    def _wake(self) -> None:
        """Called by a loader thread when a load finishes."""
        with self._cond:
            self._woken = True
            self._cond.notify()

    def _drain_inbox(self) -> set[str]:
        with self._cond:
            inbox, self._inbox = self._inbox, deque()
            cancels, self._cancels = self._cancels, set()
        for req, on_output, pool in inbox:
            try:
                self._core.add(req, on_output, pool)
            except Exception as e:  # noqa: BLE001 - this request alone, unless the device is gone
                self._core.reject(req, on_output, e)
                if is_fatal(e):
                    raise
        return cancels

    def _answer_inbox(self, message: str) -> None:
        """Answer whatever is still queued here with an error (the thread is stopping)."""
        with self._cond:
            inbox, self._inbox = self._inbox, deque()
        for req, on_output, _ in inbox:
            try:
                self._core.reject(req, on_output, EngineShutdown(message))
            except Exception:  # noqa: BLE001 - answering the others matters more
                log.exception("answering queued request %s failed", req.request_id)

    def _run(self) -> None:
        core = self._core
        idle = False  # the last step found nothing runnable (e.g. every admitted request loading)
        try:
            while True:
                with self._cond:
                    busy = core.has_work and not idle
                    if not (self._inbox or self._cancels or busy or self._stopping or self._woken
                            or self._jobs):
                        self._cond.wait(timeout=self._sleep_s())
                    self._woken = False
                    stopping, deadline = self._stopping, self._deadline
                for request_id in self._drain_inbox():
                    core.abort(request_id)
                self._run_jobs()
                if stopping and (not core.has_work or time.monotonic() >= deadline):
                    core.abort_all("abort")
                    core.update_gauges()
                    self._answer_inbox("the engine stopped before this request was admitted")
                    self._fail_jobs(EngineShutdown("the engine is shutting down"))
                    core.close()
                    return
                idle = not core.step()
        except BaseException as e:  # noqa: BLE001 - report, fail everything, stay dead
            self._die(e)

    def _sleep_s(self) -> float:
        """How long the idle loop may sleep: until the next load times out, at most 0.5 s."""
        deadline = self._core.next_load_deadline()
        return 0.5 if deadline is None else min(0.5, max(0.0, deadline - time.monotonic()))

    def _die(self, error: BaseException) -> None:
        reason = f"{type(error).__name__}: {error}"
        log.critical("engine thread died: %s", reason, exc_info=error)
        with self._cond:  # the lock submit takes: nothing is queued after this point
            self._dead, self._accepting = True, False
            self.death_reason = reason
        message = f"engine stopped: {reason}"
        try:
            self._core.abort_all("error", error=message)
        except BaseException:  # noqa: BLE001 - a fatal error in a release: the rest still go
            log.exception("failing the requests of a dead engine raised")
            for state in list(self._core.by_id.values()):
                self._core.by_id.pop(state.request_id, None)
                self._core.reject(state.request, state.on_output, RuntimeError(message))
        self._answer_inbox(message)
        self._fail_jobs(EngineShutdown(message))
        try:
            self._core.close(wait=False)  # abandoned loads release their pins as they land
        except Exception:  # noqa: BLE001
            log.exception("stopping the expert loader threads raised")
        for listener in self._death_listeners:
            try:
                listener(reason)
            except Exception:  # noqa: BLE001
                log.exception("engine death listener raised")

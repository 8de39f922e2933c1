"""One engine step at a time: schedule, run the model, sample, detokenize, emit.

Runs on the engine thread only, and never waits for an expert to be read or copied: a prefill
advances in bounded pieces (at most ``prefill_chunk_tokens`` rows of work, and about
``prefill_share`` of a decode step's time: pace.py), layer by layer, and
when a layer's pool is not resident the request is parked LOADING while loader threads
(``expert_cache.async_loads``) pin it; meanwhile the running streams keep decoding. A finished
load is picked up at the start of a step. Layer l+1's predicted pool is prefetched while layer
l's loads and compute run. Full-routing prefills page the experts their tokens chose the same
way (without pinning them). The numbers are exactly the one-shot prefill's (see
``MoETransformer.prefill_mlp``).

Failure isolation: an exception from the model or the sampler fails the requests of that
step (finish_reason "error"), an exception while turning one row's token into output fails that
request alone; either way their KV slots and expert pins are freed and the engine goes on.
``SlotsExhausted`` is not a failure but a back-off: a prefill is requeued (pool admission pauses
until a running request ends), a decode is retried with the pool rows alone (their experts are
pinned) while full-routing rows wait a step. A failed expert read fails the request that was
loading it; a request that ends while LOADING abandons its load, which releases its own pins
when it lands. A load that has not landed ``load_timeout_s`` after it started (a read hanging
on a stalled disk) fails its request with ExpertLoadTimeout the same way, at the first step
past the deadline (the engine loop sleeps no longer than ``next_load_deadline``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from expert_cache.async_loads import AsyncPinner
from expert_cache.base import ExpertKey, ExpertLoadTimeout, SlotsExhausted
from server.engine.detokenizer import Detokenizer, TokenTexts
from server.engine.faults import is_fatal
from server.engine.kv_slots import KVSlotAllocator
from server.engine.metrics import EngineMetrics
from server.engine.model_runner import ModelRunner
from server.engine.named_pools import ResidentPools
from server.engine.pace import PrefillPace
from server.engine.pool_budget import PoolBudget, PoolPredictor
from server.engine.request import (
    ExpertPoolReport,
    FinishReason,
    GenerationRequest,
    RequestOutput,
    TokenLogprob,
    Usage,
)
from server.engine.request_state import RequestState, RequestTimes
from server.engine.sampler import RawLogprob, SamplingState, prompt_logprobs, sample
from server.engine.scheduler import Decode, Scheduler, SchedulerConfig
from server.engine.sequence import SeqStatus, Sequence

if TYPE_CHECKING:
    from server.model.loader import LoadedModel

log = logging.getLogger("emo_serve.engine")
TIER_ORDER = {"device": 0, "host": 1, "disk": 2}  # pool_source: the slowest tier wins


class EngineCore:
    def __init__(self, loaded: LoadedModel, runner: ModelRunner, scheduler_config: SchedulerConfig,
                 metrics: EngineMetrics, on_finished: Callable[[str], None], *,
                 prefill_chunk_tokens: int = 2048, loader_threads: int = 2,
                 on_load_done: Callable[[], None] | None = None, async_paging: bool = True,
                 prefill_share: float = 0.5, load_timeout_s: float | None = None) -> None:
        self.config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.runner = runner
        self.metrics = metrics
        self.on_finished = on_finished
        self.eos_ids = frozenset(loaded.tokenizer.eos_token_ids)
        self.kv_slots = KVSlotAllocator(runner.kv.num_slots)
        reserve = max((self.config.num_routed(layer) for layer in self.config.moe_layers), default=1)
        self.budget = PoolBudget(runner.store, self.config.moe_layers, reserve, len(loaded.catalog.chunks))
        if self.budget.can_miss:
            scheduler_config = dataclasses.replace(scheduler_config, separate_full_rows=True)
        self.scheduler = Scheduler(scheduler_config, self.kv_slots, self.budget)
        self.async_paging = async_paging
        self.pace = PrefillPace(prefill_chunk_tokens if async_paging else 2**62,
                                prefill_share if async_paging else 0.0)
        self.pinner = AsyncPinner(runner.store, loader_threads, on_load_done)
        self.load_timeout_s = load_timeout_s
        self.last_moe_layer = max(self.config.moe_layers, default=-1)
        self.resident = ResidentPools(runner.store, self.budget)
        self.max_pools = 0  # pools of the default size the device tier holds (the gateway's max_lora)
        self.predictor = PoolPredictor()
        self.token_text = TokenTexts(loaded.tokenizer.tokenizer)
        self.by_id: dict[str, RequestState] = {}  # every request not finished, and its Sequence

    # ---- intake ----------------------------------------------------------------------------
    def add(self, req: GenerationRequest, on_output: Callable[[RequestOutput], None],
            pool_size: int | None) -> None:
        sp = req.sampling
        seq = Sequence(req.request_id, req.prompt_token_ids, sp.max_tokens, pool_size,
                       prompt_logits=sp.prompt_logprobs is not None)
        state = RequestState(
            request=req, seq=seq, on_output=on_output,
            sampling=SamplingState(sp, req.prompt_token_ids, self.config.vocab_size, self.runner.device),
            detok=Detokenizer(self.tokenizer.tokenizer, req.prompt_token_ids,
                              skip_special_tokens=sp.skip_special_tokens, stop=sp.stop),
            times=RequestTimes(arrival=req.arrival_time))
        named = req.named_pool
        if named is not None:
            self.metrics.pool_requests.labels(pool=named.name).inc()
            # host tensors: the model checks them without a device sync, then copies them over
            seq.given_pools = [torch.tensor(ids, dtype=torch.long) if self.config.is_moe(layer) else None
                               for layer, ids in enumerate(named.experts)]
            seq.predicted_keys = named.keys  # not a guess: admission counts exactly these
        elif pool_size is not None:
            seq.predicted_keys = self.predictor.predict(req.prompt_token_ids)
        self.by_id[req.request_id] = state
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> None:
        state = self.by_id.get(request_id)
        if state is not None and state.seq.status is not SeqStatus.FINISHED:
            self._finish(state.seq, "abort", "", [])

    def abort_all(self, reason: FinishReason, error: str | None = None) -> None:
        for state in list(self.by_id.values()):
            self._finish(state.seq, reason, "", [], error=error)

    @property
    def has_work(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.prefilling or self.scheduler.running)

    def close(self, wait: bool = True) -> None:
        """Stop the loader threads (after abort_all: abandoned loads release their pins as they
        land). ``wait`` False: do not wait for reads in flight (a dying engine must not hang
        on a stuck disk)."""
        self.pinner.close(wait)

    # ---- one step --------------------------------------------------------------------------
    def step(self) -> bool:
        """Run one step; False when there was nothing to run (all admitted requests are loading,
        or nothing is admitted)."""
        for state in [s for s in self.by_id.values() if s.cancelled]:
            self._finish(state.seq, "abort", "", [])
        self._poll_loads()
        try:
            step = self.scheduler.schedule()
        except Exception as e:  # noqa: BLE001 - admission: fail the request(s) it raised for
            if is_fatal(e) or not self._fail_inadmissible(e):
                raise
            return True
        if step is None:
            sch = self.scheduler
            if sch.waiting and not sch.running and not sch.prefilling and self.pinner.in_flight == 0:
                head = sch.waiting[0]
                free = [self.runner.store.free_slots(g.rep) for g in self.budget.groups]
                self._fail([head], f"cannot be admitted although nothing is running: free device "
                                   f"expert slots per slab {free}, KV slots free {self.kv_slots.num_free}")
            self.update_gauges()
            return False
        if isinstance(step, Decode):
            start = time.perf_counter()
            self._decode(step.seqs)
            self.pace.decoded(time.perf_counter() - start)
        else:
            self._prefill(step.seq)
        self.update_gauges()
        return True

    def _fail_inadmissible(self, error: Exception) -> bool:
        """After ``schedule`` raised: fail the waiting requests whose admission check raises
        (their own state is at fault, e.g. an unusable pool prediction). False when none
        does: then the scheduler itself is broken and the engine must stop."""
        culprits = []
        for seq in list(self.scheduler.waiting):
            try:
                self.scheduler.admissible(seq)
                if seq.predicted_keys:
                    self.budget.residency(seq.predicted_keys)
            except Exception:  # noqa: BLE001 - this one is what raised
                culprits.append(seq)
        if culprits:
            self._step_failed(culprits, error)
        return bool(culprits)

    # ---- prefill in pieces ---------------------------------------------------------------------
    def _prefill(self, seq: Sequence) -> None:
        """Advance ``seq``'s prefill by about ``prefill_chunk_tokens`` rows of work; sample its
        first token when it completes."""
        try:
            if seq.prefill is None:
                times = self.by_id[seq.request_id].times
                if times.scheduled is None:  # not again after a back-off
                    now = time.monotonic()
                    times.scheduled = now
                    self.metrics.queue_time.observe(max(0.0, now - times.arrival))
                self.runner.prefill_start(seq)
            logits = self._advance(seq)
        except SlotsExhausted as e:
            self._back_off(seq, e)
            return
        except Exception as e:  # noqa: BLE001 - any failure fails this step's request only
            self._step_failed([seq], e)
            return
        if logits is None:
            return
        self.scheduler.prefilled(seq)
        self.metrics.prompt_tokens.inc(len(seq.prompt_ids))
        if seq.pools is not None and seq.given_pools is None:
            self.predictor.observe(seq.prompt_ids, seq.pool_lists())
        try:
            state = self.by_id[seq.request_id]
            n_prompt = state.request.sampling.prompt_logprobs
            prompt_lp = None if n_prompt is None else prompt_logprobs(logits, seq.prompt_ids, n_prompt)
            if seq.max_tokens == 0:
                self._finish(seq, "length", "", [], prompt_lp=prompt_lp)
                return
            result = sample(logits[-1:], [state.sampling])
        except Exception as e:  # noqa: BLE001
            self._step_failed([seq], e)
            return
        self._accept(seq, result.token_ids[0], result.logprobs[0], prompt_lp)

    def _advance(self, seq: Sequence) -> torch.Tensor | None:
        """The prefill's next piece of work; its logits when it is complete, None when there is
        more to do (or it is now LOADING)."""
        state = seq.prefill
        assert state is not None
        budget = allowed = self.pace.budget(decoding=bool(self.scheduler.running))
        start = time.perf_counter()
        try:
            while not state.done:
                if budget <= 0:
                    return None
                if not state.attended:
                    keys = self.runner.prefill_attend(seq)
                    budget -= state.num_tokens
                    if keys and not self._make_resident(seq, keys, state.next_predicted):
                        return None
                    continue
                budget -= self.runner.prefill_mlp(seq, budget)
            return self.runner.prefill_finish(seq)
        finally:
            self.pace.prefilled(allowed - budget, time.perf_counter() - start)

    def _make_resident(self, seq: Sequence, keys: list[ExpertKey], predicted: list[ExpertKey]) -> bool:
        """True when ``keys`` are resident now (a pool: pinned for the request); else a loader
        thread is set to work on them and ``seq`` is LOADING."""
        store = self.runner.store
        tiers = [store.tier_of(k) for k in keys]
        missing = [k for k, t in zip(keys, tiers, strict=True) if t != "device"]
        if seq.is_pool:
            seq.pool_source = max([seq.pool_source, *tiers], key=TIER_ORDER.__getitem__)
        if not missing or not self.async_paging:
            if seq.is_pool:  # hits only (unless async_paging is off): no read on this thread
                self.runner.pin(seq, keys)
                self._pool_progress(seq, keys)
            if predicted:
                store.prefetch(predicted)
            return True
        seq.load = self.pinner.pin(keys) if seq.is_pool else self.pinner.warm(missing)
        seq.status = SeqStatus.LOADING
        if predicted:
            store.prefetch(predicted)
        return False

    def _pool_progress(self, seq: Sequence, keys: list[ExpertKey]) -> None:
        """``keys`` (one layer's pool) are pinned: the pool is resident once the last layer's are."""
        state = self.by_id.get(seq.request_id)
        scheduled = None if state is None else state.times.scheduled
        if keys and keys[0][0] == self.last_moe_layer and scheduled is not None:
            self.metrics.pool_load.labels(source=seq.pool_source).observe(
                max(0.0, time.monotonic() - scheduled))

    def next_load_deadline(self) -> float | None:
        """The time.monotonic() at which the oldest load in flight times out; None when none can."""
        if self.load_timeout_s is None:
            return None
        started = [s.load.submitted for s in self.scheduler.prefilling if s.load is not None]
        return min(started) + self.load_timeout_s if started else None

    def _time_out_loads(self) -> None:
        if self.load_timeout_s is None:
            return
        now = time.monotonic()
        for seq in [s for s in self.scheduler.prefilling if s.load is not None and not s.load.done()
                    and now - s.load.submitted >= self.load_timeout_s]:
            load = seq.load
            assert load is not None
            layer = load.keys[0][0]
            error = ExpertLoadTimeout(load.keys[0], self.load_timeout_s)
            log.warning("loading experts of layer %d for %s timed out: %s", layer, seq.request_id, error)
            # _finish abandons the load: its pins go when the hung read lands
            self._fail([seq], f"{type(error).__name__}: {error} (while loading the experts of layer {layer})")

    def _poll_loads(self) -> None:
        self._time_out_loads()
        for seq in [s for s in self.scheduler.prefilling if s.load is not None and s.load.done()]:
            load, seq.load = seq.load, None
            assert load is not None
            seq.status = SeqStatus.PREFILLING
            t = load.traffic
            seq.experts.hits += t.hits
            seq.experts.misses += t.misses
            seq.experts.bytes_loaded += t.bytes_loaded
            try:
                keys = load.take()
            except SlotsExhausted as e:
                self._back_off(seq, e)
                continue
            except Exception as e:  # noqa: BLE001 - a failed read fails this request alone
                if is_fatal(e):  # e.g. a poisoned device met by the loader thread's copy
                    raise
                log.warning("loading experts of layer %d for %s failed: %s", load.keys[0][0],
                            seq.request_id, e)
                # the exception's name first, as for step failures: the API maps some to codes
                self._fail([seq], f"{type(e).__name__}: {e} (while loading the experts of layer "
                                  f"{load.keys[0][0]})")
                continue
            seq.pinned.extend(keys)
            self._pool_progress(seq, keys)

    def _back_off(self, seq: Sequence, error: SlotsExhausted) -> None:
        """A prefill could not pin its pool: start it over later when others are admitted (their
        pins are what it lacks), fail it when it is alone."""
        self.metrics.backoffs.inc()
        others = len(self.scheduler.running) + len(self.scheduler.prefilling) - 1
        if others > 0:
            self._drop_prefill(seq)
            self.scheduler.requeue(seq, block_pools=True)
            return
        self._fail([seq], f"the expert pool does not fit the device expert cache: {error}")

    def _drop_prefill(self, seq: Sequence) -> None:
        """Forget a prefill in progress: its load (released when it lands), pins and state."""
        if seq.load is not None:
            self.pinner.abandon(seq.load)
            seq.load = None
        seq.prefill = None
        self.runner.release(seq)
        seq.pool_source = "device"

    def _decode(self, seqs: list[Sequence]) -> None:
        try:
            try:
                logits = self.runner.decode(seqs)
            except SlotsExhausted:
                self.metrics.backoffs.inc()
                pool_rows = [s for s in seqs if s.is_pool]
                if not pool_rows or len(pool_rows) == len(seqs):
                    raise
                seqs = pool_rows  # full-routing rows wait for slots; pool rows hold theirs
                logits = self.runner.decode(seqs)
            result = sample(logits, [self.by_id[s.request_id].sampling for s in seqs])
        except Exception as e:  # noqa: BLE001
            self._step_failed(seqs, e)
            return
        for i, seq in enumerate(seqs):
            self._accept(seq, result.token_ids[i], result.logprobs[i], None)

    # ---- outputs ---------------------------------------------------------------------------
    def _accept(self, seq: Sequence, token: int, raw: RawLogprob | None,
                prompt_lp: list[RawLogprob | None] | None) -> None:
        """Append one sampled token; emit its output (finishing the request when it ends)."""
        try:
            if token < 0:
                raise FloatingPointError("the model produced NaN logits")
            now = time.monotonic()
            state = self.by_id[seq.request_id]
            times, detok = state.times, state.detok
            state.append(token)
            self.metrics.generation_tokens.inc()
            if times.first_token is None:
                times.first_token = now
                self.metrics.ttft.observe(max(0.0, now - times.arrival))
            elif times.last_token is not None:
                self.metrics.itl.observe(now - times.last_token)
            times.last_token = now
            sp = state.request.sampling
            lps = None if raw is None else [self._token_logprob(raw)]
            if token in sp.stop_token_ids or (not sp.ignore_eos and token in self.eos_ids):
                stop_reason = token if token in sp.stop_token_ids else None
                self._finish(seq, "stop", detok.finish(), [token], lps, prompt_lp, stop_reason)
                return
            text = detok.push(token)
            if detok.stopped_on is not None:
                self._finish(seq, "stop", text, [token], lps, prompt_lp, detok.stopped_on)
            elif len(seq.output_ids) >= seq.max_tokens:
                text += detok.finish()
                reason: FinishReason = "stop" if detok.stopped_on is not None else "length"
                self._finish(seq, reason, text, [token], lps, prompt_lp, detok.stopped_on)
            else:
                self._emit(state, RequestOutput(
                    request_id=seq.request_id, new_token_ids=[token], new_text=text, finished=False,
                    logprobs=lps, prompt_logprobs=self._prompt_entries(state, prompt_lp),
                    # the pool is known once prefilled: a stream shows it from its first token on
                    expert_pool=self._pool_report(state) if len(seq.output_ids) == 1 else None,
                    arrival_time=times.arrival, first_token_time=times.first_token))
        except Exception as e:  # noqa: BLE001 - this row alone
            if seq.status is not SeqStatus.FINISHED:
                self._step_failed([seq], e)

    def _token_logprob(self, raw: RawLogprob) -> TokenLogprob:
        token_id, lp, top = raw
        return TokenLogprob(token_id, self.token_text(token_id), lp,
                            [(t, self.token_text(t), v) for t, v in top])

    def _prompt_entries(self, state: RequestState,
                        raw: list[RawLogprob | None] | None) -> list[TokenLogprob | None] | None:
        if raw is None or state.prompt_logprobs_sent:
            return None
        state.prompt_logprobs_sent = True
        return [None if r is None else self._token_logprob(r) for r in raw]

    def _step_failed(self, seqs: list[Sequence], error: BaseException) -> None:
        if is_fatal(error):  # a poisoned device: the engine thread stops and fails everyone
            raise error
        self.metrics.step_errors.inc()
        log.exception("engine step failed for %s", [s.request_id for s in seqs], exc_info=error)
        if self.runner.device.type == "cuda" and isinstance(error, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
        self._fail(seqs, f"{type(error).__name__}: {error}")

    def _fail(self, seqs: list[Sequence], message: str) -> None:
        for seq in seqs:
            if seq.status is not SeqStatus.FINISHED:
                self._finish(seq, "error", "", [], error=message)

    def _finish(self, seq: Sequence, reason: FinishReason, text: str, tokens: list[int],
                lps: list[TokenLogprob] | None = None, prompt_lp: list[RawLogprob | None] | None = None,
                stop_reason: str | int | None = None, error: str | None = None) -> None:
        """End a request: free its KV slot and expert pins, count it, emit its last output.

        Each release step runs even if the one before raised, and the last output is sent
        whatever happens, so a consumer never waits forever; a fatal error is re-raised after."""
        if seq.status is SeqStatus.FINISHED:
            return
        state = self.by_id[seq.request_id]  # every sequence not finished has its request state
        times = state.times

        def count_finished(seq: Sequence) -> None:
            times.finished = now = time.monotonic()
            self.metrics.request_success.labels(finish_reason=reason).inc()
            self.metrics.e2e.observe(max(0.0, now - times.arrival))
            self.update_gauges()  # before the output: whoever sees it finished sees the gauges too

        failure: BaseException | None = None
        for release in (self.scheduler.finish, self._drop_prefill, self._forget_seq, count_finished):
            try:
                release(seq)
            except Exception as e:  # noqa: BLE001 - logged; the output below must still go out
                log.exception("finishing request %s: %s raised", seq.request_id, release.__name__)
                failure = failure or e
        seq.status = SeqStatus.FINISHED
        if times.finished is None:
            times.finished = time.monotonic()
        usage = Usage(len(seq.prompt_ids), len(seq.output_ids), seq.experts.hits, seq.experts.misses,
                      seq.experts.bytes_loaded)
        self._emit(state, RequestOutput(
            request_id=seq.request_id, new_token_ids=tokens, new_text=text, finished=True,
            finish_reason=reason, logprobs=lps, prompt_logprobs=self._prompt_entries(state, prompt_lp),
            error=error, usage=usage, expert_pool=self._pool_report(state), stop_reason=stop_reason,
            arrival_time=times.arrival, first_token_time=times.first_token,
            finished_time=times.finished))
        if failure is not None and is_fatal(failure):
            raise failure

    @staticmethod
    def _pool_report(state: RequestState) -> ExpertPoolReport | None:
        if not state.request.return_expert_pool:
            return None
        seq = state.seq
        return {"size": seq.pool_size if seq.pool_size is not None else "full", "experts": seq.pool_lists()}

    def _forget_seq(self, seq: Sequence) -> None:
        self.by_id.pop(seq.request_id, None)
        self.on_finished(seq.request_id)

    def reject(self, req: GenerationRequest, on_output: Callable[[RequestOutput], None],
               error: BaseException) -> None:
        """Answer a request that failed before it became a sequence (intake), or that a dying
        engine cannot finish: with an error output. Never raises."""
        log.error("request %s failed before running: %s: %s", req.request_id, type(error).__name__, error,
                  exc_info=error)
        self.by_id.pop(req.request_id, None)
        self.scheduler.waiting[:] = [s for s in self.scheduler.waiting if s.request_id != req.request_id]
        self.metrics.request_success.labels(finish_reason="error").inc()
        try:
            on_output(RequestOutput(
                request_id=req.request_id, new_token_ids=[], new_text="", finished=True,
                finish_reason="error", error=f"{type(error).__name__}: {error}",
                usage=Usage(len(req.prompt_token_ids), 0), arrival_time=req.arrival_time,
                finished_time=time.monotonic()))
        except Exception:  # noqa: BLE001 - a broken consumer has nothing more to lose
            log.exception("on_output of request %s raised", req.request_id)
        finally:
            self.on_finished(req.request_id)

    def _emit(self, state: RequestState, out: RequestOutput) -> None:
        try:
            state.on_output(out)
        except Exception:  # noqa: BLE001 - a broken consumer cancels its own request only
            log.exception("on_output of request %s raised; cancelling it", state.request_id)
            state.cancelled = True

    def update_gauges(self) -> None:
        self.metrics.num_running.set(self.scheduler.num_running)
        self.metrics.num_waiting.set(len(self.scheduler.waiting))
        self.metrics.num_loading.set(self.scheduler.num_loading)
        self.metrics.kv_usage.set(self.kv_slots.usage)
        admitted = self.scheduler.running + self.scheduler.prefilling
        running = self._named_pool_models(admitted)
        waiting = self._named_pool_models(self.scheduler.waiting)
        self.metrics.update_pool_info(running + list(self.resident.models), waiting, self.max_pools)
        self.metrics.update_memory()

    def _named_pool_models(self, seqs: list[Sequence]) -> list[str]:
        states = (self.by_id.get(s.request_id) for s in seqs)
        return [st.request.named_pool.model for st in states if st is not None and st.request.named_pool]

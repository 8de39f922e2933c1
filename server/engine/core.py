"""One engine step at a time: schedule, run the model, sample, detokenize, emit.

Runs on the engine thread only. Failure isolation: an exception from the model or the sampler
fails the requests of that step (finish_reason "error"), an exception while turning one row's
token into output fails that request alone; either way their KV slots and expert pins are
freed and the engine goes on. ``SlotsExhausted`` is not a failure but a back-off: a prefill is
requeued (pool admission pauses until a running request ends), a decode is retried with the
pool rows alone (their experts are pinned) while full-routing rows wait a step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from expert_cache.base import SlotsExhausted
from server.engine.detokenizer import Detokenizer, TokenTexts
from server.engine.faults import is_fatal
from server.engine.kv_slots import KVSlotAllocator
from server.engine.metrics import EngineMetrics
from server.engine.model_runner import ModelRunner
from server.engine.named_pools import ResidentPools
from server.engine.pool_budget import PoolBudget, PoolPredictor
from server.engine.request import (
    ExpertPoolReport,
    FinishReason,
    GenerationRequest,
    RequestOutput,
    TokenLogprob,
    Usage,
)
from server.engine.sampler import RawLogprob, SamplingState, prompt_logprobs, sample
from server.engine.scheduler import Decode, Scheduler, SchedulerConfig
from server.engine.sequence import SeqStatus, SeqTimes, Sequence

if TYPE_CHECKING:
    from server.model.loader import LoadedModel

log = logging.getLogger("emo_serve.engine")


class EngineCore:
    def __init__(self, loaded: LoadedModel, runner: ModelRunner, scheduler_config: SchedulerConfig,
                 metrics: EngineMetrics, on_finished: Callable[[str], None]) -> None:
        self.config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.runner = runner
        self.metrics = metrics
        self.on_finished = on_finished
        self.eos_ids = frozenset(loaded.tokenizer.eos_token_ids)
        self.kv_slots = KVSlotAllocator(runner.kv.num_slots)
        reserve = max((self.config.num_routed(layer) for layer in self.config.moe_layers), default=1)
        self.budget = PoolBudget(runner.store, self.config.moe_layers, reserve, len(loaded.catalog.chunks))
        self.scheduler = Scheduler(scheduler_config, self.kv_slots, self.budget)
        self.resident = ResidentPools(runner.store, self.budget)
        self.max_pools = 0  # pools of the default size the device tier holds (the gateway's max_lora)
        self.predictor = PoolPredictor()
        self.token_text = TokenTexts(loaded.tokenizer.tokenizer)
        self.by_id: dict[str, Sequence] = {}

    # ---- intake ----------------------------------------------------------------------------
    def add(self, req: GenerationRequest, on_output: Callable[[RequestOutput], None],
            pool_size: int | None) -> None:
        sp = req.sampling
        seq = Sequence(
            request=req, on_output=on_output, pool_size=pool_size,
            sampling=SamplingState(sp, req.prompt_token_ids, self.config.vocab_size, self.runner.device),
            detok=Detokenizer(self.tokenizer.tokenizer, req.prompt_token_ids,
                              skip_special_tokens=sp.skip_special_tokens, stop=sp.stop),
            times=SeqTimes(arrival=req.arrival_time))
        named = req.named_pool
        if named is not None:
            self.metrics.pool_requests.labels(pool=named.name).inc()
            # host tensors: the model checks them without a device sync, then copies them over
            seq.given_pools = [torch.tensor(ids, dtype=torch.long) if self.config.is_moe(layer) else None
                               for layer, ids in enumerate(named.experts)]
            seq.predicted_keys = named.keys  # not a guess: admission counts exactly these
        elif pool_size is not None:
            seq.predicted_keys = self.predictor.predict(req.prompt_token_ids)
        self.by_id[req.request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> None:
        seq = self.by_id.get(request_id)
        if seq is not None and seq.status is not SeqStatus.FINISHED:
            self._finish(seq, "abort", "", [])

    def abort_all(self, reason: FinishReason, error: str | None = None) -> None:
        for seq in list(self.by_id.values()):
            self._finish(seq, reason, "", [], error=error)

    @property
    def has_work(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running)

    # ---- one step --------------------------------------------------------------------------
    def step(self) -> bool:
        """Run one step; False when there was nothing to run."""
        for seq in [s for s in self.by_id.values() if s.cancelled]:
            self._finish(seq, "abort", "", [])
        try:
            step = self.scheduler.schedule()
        except Exception as e:  # noqa: BLE001 - admission: fail the request(s) it raised for
            if is_fatal(e) or not self._fail_inadmissible(e):
                raise
            return True
        if step is None:
            if self.scheduler.waiting and not self.scheduler.running:
                head = self.scheduler.waiting[0]
                free = [self.runner.store.free_slots(g.rep) for g in self.budget.groups]
                self._fail([head], f"cannot be admitted although nothing is running: free device "
                                   f"expert slots per slab {free}, KV slots free {self.kv_slots.num_free}")
            return False
        if isinstance(step, Decode):
            self._decode(step.seqs)
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

    def _prefill(self, seq: Sequence) -> None:
        now = time.monotonic()
        try:
            logits = self.runner.prefill(seq)
        except SlotsExhausted as e:
            self.metrics.backoffs.inc()
            if len(self.scheduler.running) > 1:
                self.scheduler.requeue(seq, block_pools=True)
                return
            self._fail([seq], f"the expert pool does not fit the device expert cache: {e}")
            return
        except Exception as e:  # noqa: BLE001 - any failure fails this step's request only
            self._step_failed([seq], e)
            return
        seq.times.scheduled = now
        self.metrics.queue_time.observe(max(0.0, now - seq.times.arrival))
        self.metrics.prompt_tokens.inc(len(seq.prompt_ids))
        if seq.pools is not None and seq.given_pools is None:
            self.predictor.observe(seq.prompt_ids, seq.pool_lists())
        try:
            n_prompt = seq.request.sampling.prompt_logprobs
            prompt_lp = None if n_prompt is None else prompt_logprobs(logits, seq.prompt_ids, n_prompt)
            if seq.max_tokens == 0:
                self._finish(seq, "length", "", [], prompt_lp=prompt_lp)
                return
            result = sample(logits[-1:], [seq.sampling])
        except Exception as e:  # noqa: BLE001
            self._step_failed([seq], e)
            return
        self._accept(seq, result.token_ids[0], result.logprobs[0], prompt_lp)

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
            result = sample(logits, [s.sampling for s in seqs])
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
            seq.append(token)
            self.metrics.generation_tokens.inc()
            if seq.times.first_token is None:
                seq.times.first_token = now
                self.metrics.ttft.observe(max(0.0, now - seq.times.arrival))
            elif seq.times.last_token is not None:
                self.metrics.itl.observe(now - seq.times.last_token)
            seq.times.last_token = now
            sp = seq.request.sampling
            lps = None if raw is None else [self._token_logprob(raw)]
            if token in sp.stop_token_ids or (not sp.ignore_eos and token in self.eos_ids):
                stop_reason = token if token in sp.stop_token_ids else None
                self._finish(seq, "stop", seq.detok.finish(), [token], lps, prompt_lp, stop_reason)
                return
            text = seq.detok.push(token)
            if seq.detok.stopped_on is not None:
                self._finish(seq, "stop", text, [token], lps, prompt_lp, seq.detok.stopped_on)
            elif len(seq.output_ids) >= seq.max_tokens:
                text += seq.detok.finish()
                reason: FinishReason = "stop" if seq.detok.stopped_on is not None else "length"
                self._finish(seq, reason, text, [token], lps, prompt_lp, seq.detok.stopped_on)
            else:
                self._emit(seq, RequestOutput(
                    request_id=seq.request_id, new_token_ids=[token], new_text=text, finished=False,
                    logprobs=lps, prompt_logprobs=self._prompt_entries(seq, prompt_lp),
                    arrival_time=seq.times.arrival, first_token_time=seq.times.first_token))
        except Exception as e:  # noqa: BLE001 - this row alone
            if seq.status is not SeqStatus.FINISHED:
                self._step_failed([seq], e)

    def _token_logprob(self, raw: RawLogprob) -> TokenLogprob:
        token_id, lp, top = raw
        return TokenLogprob(token_id, self.token_text(token_id), lp,
                            [(t, self.token_text(t), v) for t, v in top])

    def _prompt_entries(self, seq: Sequence,
                        raw: list[RawLogprob | None] | None) -> list[TokenLogprob | None] | None:
        if raw is None or seq.prompt_logprobs_sent:
            return None
        seq.prompt_logprobs_sent = True
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

        def count_finished(seq: Sequence) -> None:
            seq.times.finished = now = time.monotonic()
            self.metrics.request_success.labels(finish_reason=reason).inc()
            self.metrics.e2e.observe(max(0.0, now - seq.times.arrival))
            self.update_gauges()  # before the output: whoever sees it finished sees the gauges too

        failure: BaseException | None = None
        for release in (self.scheduler.finish, self.runner.release, self._forget_seq, count_finished):
            try:
                release(seq)
            except Exception as e:  # noqa: BLE001 - logged; the output below must still go out
                log.exception("finishing request %s: %s raised", seq.request_id, release.__name__)
                failure = failure or e
        seq.status = SeqStatus.FINISHED
        if seq.times.finished is None:
            seq.times.finished = time.monotonic()
        usage = Usage(len(seq.prompt_ids), len(seq.output_ids), seq.experts.hits, seq.experts.misses,
                      seq.experts.bytes_loaded)
        pool: ExpertPoolReport | None = None
        if seq.request.return_expert_pool:
            pool = {"size": seq.pool_size if seq.pool_size is not None else "full",
                    "experts": seq.pool_lists()}
        self._emit(seq, RequestOutput(
            request_id=seq.request_id, new_token_ids=tokens, new_text=text, finished=True,
            finish_reason=reason, logprobs=lps, prompt_logprobs=self._prompt_entries(seq, prompt_lp),
            error=error, usage=usage, expert_pool=pool, stop_reason=stop_reason,
            arrival_time=seq.times.arrival, first_token_time=seq.times.first_token,
            finished_time=seq.times.finished))
        if failure is not None and is_fatal(failure):
            raise failure

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

    def _emit(self, seq: Sequence, out: RequestOutput) -> None:
        try:
            seq.on_output(out)
        except Exception:  # noqa: BLE001 - a broken consumer cancels its own request only
            log.exception("on_output of request %s raised; cancelling it", seq.request_id)
            seq.cancelled = True

    def update_gauges(self) -> None:
        self.metrics.num_running.set(len(self.scheduler.running))
        self.metrics.num_waiting.set(len(self.scheduler.waiting))
        self.metrics.kv_usage.set(self.kv_slots.usage)
        running = [s.request.named_pool.model for s in self.scheduler.running if s.request.named_pool]
        waiting = [s.request.named_pool.model for s in self.scheduler.waiting if s.request.named_pool]
        self.metrics.update_pool_info(running + list(self.resident.models), waiting, self.max_pools)
        self.metrics.update_memory()

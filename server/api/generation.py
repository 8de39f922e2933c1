"""From a validated request body to engine requests, and from engine outputs to results.

Shared by /v1/completions and /v1/chat/completions: prompt tokenization and its limits,
max_tokens, sampling parameters (body > checkpoint's generation_config.json > OpenAI's
defaults), one engine request per choice with derived seeds, output accumulation, usage, and
waiting for results while watching for the client going away.

Seeds: with ``seed`` given, choice i of a prompt samples with ``seed + i`` (wrapped into the
64-bit range), so a request with n > 1 is reproducible, its choices differ, and choice 0 equals
the same request with n = 1.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from fastapi import Request

from server.api.engine_bridge import RequestGroup, wait_for_disconnect
from server.api.errors import APIError, bad_request
from server.api.protocol import SEED_LIMIT, GenerationFields, PromptInput
from server.api.responses import ExpertPoolInfo, FinishReason, UsageInfo
from server.api.serving import ServingState
from server.engine.request import (
    GenerationRequest,
    NamedPool,
    RequestOutput,
    SamplingParams,
    TokenLogprob,
    Usage,
)

logger = logging.getLogger("emo_serve.api")
_THREAD_ENCODE_CHARS = 16384  # longer texts are tokenized off the event loop


@dataclass(frozen=True)
class Prompt:
    token_ids: list[int]
    text: str  # the client's text, or the decoded token ids (for echo)


async def encode(state: ServingState, text: str, *, add_special: bool = True) -> list[int]:
    tok = state.tokenizer
    fn: Callable[[str], list[int]]
    if add_special:
        fn = tok.encode
    else:
        def encode_plain(t: str) -> list[int]:
            return list(tok.tokenizer.encode(t, add_special_tokens=False).ids)

        fn = encode_plain
    return await asyncio.to_thread(fn, text) if len(text) > _THREAD_ENCODE_CHARS else fn(text)


async def prompts_from_input(state: ServingState, value: PromptInput) -> list[Prompt]:
    """A completions ``prompt`` (string, strings, token ids, token-id lists) as token lists."""
    items: list[str | list[int]] = []
    if isinstance(value, str):
        items.append(value)
    elif value and all(isinstance(v, int) for v in value):
        items.append([v for v in value if isinstance(v, int)])  # one prompt of token ids
    else:
        items.extend(v for v in value if isinstance(v, str | list))
    if not items:
        raise bad_request("prompt must not be empty", param="prompt", code="empty_prompt")
    prompts = []
    for item in items:
        if isinstance(item, str):
            prompts.append(Prompt(await encode(state, item), item))
        else:
            check_token_ids(state, item, "prompt")
            prompts.append(Prompt(list(item), state.tokenizer.decode(list(item))))
        if not prompts[-1].token_ids:
            raise bad_request("prompt must not be empty", param="prompt", code="empty_prompt")
    return prompts


def check_token_ids(state: ServingState, ids: list[int], param: str) -> None:
    vocab = state.engine.model_config.vocab_size
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise bad_request(f"token id {bad} is outside the vocabulary [0, {vocab})", param=param,
                          code="invalid_token_id")


def check_limits(state: ServingState, body: GenerationFields, num_prompts: int) -> None:
    cfg = state.settings
    if body.n * num_prompts > cfg.max_n:
        raise bad_request(f"n x prompts = {body.n * num_prompts} choices is more than this server's "
                          f"limit of {cfg.max_n}", param="n", code="too_many_choices")
    stops = body.stop_list
    if len(stops) > cfg.max_stop:
        raise bad_request(f"{len(stops)} stop strings is more than this server's limit of "
                          f"{cfg.max_stop}", param="stop")
    for stop in stops:
        if not stop or len(stop) > cfg.max_stop_len:
            raise bad_request(f"stop strings must have 1 to {cfg.max_stop_len} characters, got "
                              f"{len(stop)}", param="stop")


def resolve_max_tokens(state: ServingState, requested: int | None, prompt_len: int,
                       param: str, prompt_param: str) -> int:
    """``requested`` if it fits the context, else 400; None means the rest of the context."""
    limit = state.max_model_len
    if prompt_len > limit:
        raise bad_request(f"This model's maximum context length is {limit} tokens, but the prompt "
                          f"has {prompt_len} tokens", param=prompt_param, code="context_length_exceeded")
    room = limit - prompt_len
    if requested is None:
        return room
    if requested > room:
        raise bad_request(f"This model's maximum context length is {limit} tokens; the prompt has "
                          f"{prompt_len}, so {param} must be at most {room}, got {requested}",
                          param=param, code="context_length_exceeded")
    return requested


def sampling_params(state: ServingState, body: GenerationFields, *, max_tokens: int,
                    logprobs: int | None, prompt_logprobs: int | None = None,
                    choice: int = 0) -> SamplingParams:
    defaults = state.engine.sampling_defaults

    def pick(value: float | int | None, default: float | int) -> float | int:
        return default if value is None else value

    seed = None
    if body.seed is not None:
        seed = body.seed + choice
        if seed >= SEED_LIMIT:
            seed -= SEED_LIMIT  # wrap 2**64 -> 0, staying in the 64-bit range
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=float(pick(body.temperature, defaults.temperature)),
            top_p=float(pick(body.top_p, defaults.top_p)),
            top_k=max(0, int(pick(body.top_k, defaults.top_k))),
            min_p=float(pick(body.min_p, defaults.min_p)),
            repetition_penalty=float(pick(body.repetition_penalty, defaults.repetition_penalty)),
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            seed=seed,
            stop=tuple(body.stop_list),
            ignore_eos=body.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )
    except ValueError as exc:
        raise bad_request(str(exc)) from None


def engine_request(request_id: str, prompt: Prompt, sampling: SamplingParams,
                   body: GenerationFields, named_pool: NamedPool | None = None) -> GenerationRequest:
    return GenerationRequest(request_id=request_id, prompt_token_ids=prompt.token_ids,
                             sampling=sampling, expert_pool=body.expert_pool,
                             return_expert_pool=body.return_expert_pool, named_pool=named_pool)


@dataclass
class ChoiceResult:
    """Everything one engine request produced, accumulated from its outputs."""

    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    final: RequestOutput | None = None

    def add(self, out: RequestOutput) -> None:
        self.text += out.new_text
        if out.logprobs:
            self.logprobs.extend(out.logprobs)
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        if out.finished:
            self.final = out


def finish_reason(out: RequestOutput, state: ServingState) -> FinishReason:
    """"stop" / "length"; a failed or aborted request raises the APIError to answer with."""
    if out.finish_reason == "stop" or out.finish_reason == "length":
        return out.finish_reason
    if out.finish_reason == "abort":
        raise APIError(503, "Request was cut short: the server is shutting down",
                       code="server_shutting_down")
    logger.error("engine request %s failed: %s", out.request_id, out.error)
    if out.error is not None and out.error.startswith("ExpertLoadTimeout"):  # the disk, not us
        raise APIError(503, f"Generation failed (request {out.request_id}): {out.error}",
                       code="expert_load_timeout", headers={"Retry-After": "5"})
    raise APIError(500, f"Generation failed (request {out.request_id}): {out.error}",
                   code="generation_failed")


def expert_pool_info(out: RequestOutput | None) -> ExpertPoolInfo | None:
    if out is None or out.expert_pool is None:
        return None
    return ExpertPoolInfo.model_validate(out.expert_pool)


def usage_info(prompts: Iterable[Prompt], finals: Iterable[Usage | None]) -> UsageInfo:
    """Prompt tokens once per prompt (n choices share it); the rest summed over choices."""
    prompt_tokens = sum(len(p.token_ids) for p in prompts)
    usages = [u for u in finals if u is not None]
    completion = sum(u.completion_tokens for u in usages)
    return UsageInfo(
        prompt_tokens=prompt_tokens, completion_tokens=completion,
        total_tokens=prompt_tokens + completion,
        expert_cache_hits=sum(u.expert_hits for u in usages),
        expert_cache_misses=sum(u.expert_misses for u in usages),
        expert_cache_bytes_loaded=sum(u.expert_bytes_loaded for u in usages),
    )


async def collect(request: Request, group: RequestGroup, count: int) -> list[ChoiceResult] | None:
    """Results of all ``count`` choices, or None when the client disconnected first (then every
    unfinished engine request has been cancelled)."""
    results = [ChoiceResult() for _ in range(count)]

    async def consume() -> None:
        async for index, out in group.outputs():
            results[index].add(out)

    consumer = asyncio.ensure_future(consume())
    watcher = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not consumer.done():
            consumer.cancel()
        group.cancel()  # no-op for finished requests
    if consumer.cancelled():
        logger.info("client disconnected; cancelled %d engine request(s)", count)
        return None
    consumer.result()
    return results

"""POST /v1/completions: OpenAI's legacy completions, streaming or not.

Choice index = prompt index * n + i, as OpenAI orders them. With ``echo`` the prompt text is
prepended (and, with ``logprobs``, the prompt tokens' logprobs, the first one null).
"""

from __future__ import annotations

import logging
import uuid

from fastapi import APIRouter, Request, Response

from server.api.engine_bridge import RequestGroup
from server.api.generation import (
    ChoiceResult,
    Prompt,
    check_limits,
    collect,
    engine_request,
    expert_pool_info,
    finish_reason,
    prompts_from_input,
    resolve_max_tokens,
    sampling_params,
    usage_info,
)
from server.api.logprobs import extend_completion_logprobs
from server.api.protocol import CompletionRequest
from server.api.request_context import CLIENT_DISCONNECTED
from server.api.responses import (
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionResponse,
    FinishReason,
    chunk_base,
)
from server.api.serving import ServingState, read_body, serving
from server.api.streaming import SSEResponse, sse_event, sse_stream
from server.engine.request import GenerationRequest, RequestOutput, TokenLogprob, Usage

logger = logging.getLogger("emo_serve.api")
router = APIRouter()


@router.post("/v1/completions", response_model=None)
async def create_completion(request: Request) -> Response:
    state = serving(request)
    body = await read_body(request, CompletionRequest, state.settings.max_body_bytes)
    model, named_pool = state.resolve_generation(body)
    state.ensure_accepting()
    prompts = await prompts_from_input(state, body.prompt)
    check_limits(state, body, len(prompts))
    response_id = f"cmpl-{uuid.uuid4().hex}"
    choice_prompts: list[Prompt] = []
    requests: list[GenerationRequest] = []
    for prompt in prompts:
        max_tokens = resolve_max_tokens(state, body.max_tokens, len(prompt.token_ids), "max_tokens", "prompt")
        for i in range(body.n):
            sampling = sampling_params(state, body, max_tokens=max_tokens, logprobs=body.logprobs,
                                       prompt_logprobs=body.logprobs if body.echo else None, choice=i)
            index = len(requests)
            requests.append(engine_request(f"{response_id}-{index}", prompt, sampling, body, named_pool))
            choice_prompts.append(prompt)
    group = RequestGroup(state.engine)
    group.submit_all(requests)
    logger.info("%s: %d choice(s), prompt tokens %s", response_id, len(requests),
                [len(p.token_ids) for p in prompts])
    if body.stream:
        render = _CompletionChunks(state, body, response_id, model, prompts, choice_prompts)
        return SSEResponse(sse_stream(group, state, render), on_close=group.cancel)
    results = await collect(request, group, len(requests))
    if results is None:
        return Response(status_code=CLIENT_DISCONNECTED)
    choices = [_choice(state, body, i, choice_prompts[i], r) for i, r in enumerate(results)]
    response = CompletionResponse(
        id=response_id, model=model, choices=choices,
        usage=usage_info(prompts, [r.final.usage for r in results if r.final is not None]),
        expert_pool=choices[0].expert_pool,
    )
    return Response(response.model_dump_json(), media_type="application/json")


def _first_token(state: ServingState, prompt: Prompt) -> str:
    return state.tokenizer.decode(prompt.token_ids[:1])


def _logprobs(state: ServingState, body: CompletionRequest, prompt: Prompt, echo_now: bool,
              prompt_entries: list[TokenLogprob | None] | None, entries: list[TokenLogprob],
              offset: int) -> tuple[CompletionLogprobs | None, int]:
    """The logprobs block for the given entries (echoed prompt first); the offset after it."""
    if body.logprobs is None:
        return None, offset
    block = CompletionLogprobs()
    if echo_now:
        extend_completion_logprobs(block, prompt_entries or [], 0, first_token=_first_token(state, prompt))
        offset = len(prompt.text)
    offset = extend_completion_logprobs(block, entries, offset)
    return block, offset


def _choice(state: ServingState, body: CompletionRequest, index: int, prompt: Prompt,
            result: ChoiceResult) -> CompletionChoice:
    assert result.final is not None
    reason = finish_reason(result.final, state)
    logprobs, _ = _logprobs(state, body, prompt, body.echo, result.prompt_logprobs, result.logprobs, 0)
    text = (prompt.text if body.echo else "") + result.text
    return CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=reason,
                            expert_pool=expert_pool_info(result.final))


class _CompletionChunks:
    def __init__(self, state: ServingState, body: CompletionRequest, response_id: str, model: str,
                 prompts: list[Prompt], choice_prompts: list[Prompt]) -> None:
        self.state, self.body, self.prompts, self.choice_prompts = state, body, prompts, choice_prompts
        self.base = chunk_base(response_id, model)
        self.exclude = None if body.include_usage else {"usage"}
        self.started: set[int] = set()
        self.offsets = [0] * len(choice_prompts)
        self.usages: dict[int, Usage | None] = {}
        self.pools: dict[int, RequestOutput] = {}

    def head(self) -> list[bytes]:
        return []

    def output(self, index: int, out: RequestOutput, reason: FinishReason | None, last: bool
               ) -> bytes | None:
        prompt = self.choice_prompts[index]
        echo_now = self.body.echo and index not in self.started
        self.started.add(index)
        text = (prompt.text if echo_now else "") + out.new_text
        logprobs, self.offsets[index] = _logprobs(self.state, self.body, prompt, echo_now,
                                                  out.prompt_logprobs, out.logprobs or [],
                                                  self.offsets[index])
        if reason is None and not text and not (logprobs and logprobs.tokens) and out.expert_pool is None:
            return None
        choice = CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=reason)
        choice.expert_pool = expert_pool_info(out)  # the first token's chunk, and the last
        top_pool = None
        if reason is not None:
            self.usages[index] = out.usage
            self.pools[index] = out
            if last and not self.body.include_usage:
                top_pool = expert_pool_info(self.pools.get(0))
        chunk = CompletionChunk(**self.base, choices=[choice], expert_pool=top_pool)
        return sse_event(chunk, exclude=self.exclude)

    def tail(self) -> bytes | None:
        if not self.body.include_usage:
            return None
        usage = usage_info(self.prompts, self.usages.values())
        chunk = CompletionChunk(**self.base, choices=[], usage=usage,
                                expert_pool=expert_pool_info(self.pools.get(0)))
        return sse_event(chunk)

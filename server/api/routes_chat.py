"""POST /v1/chat/completions: messages rendered with the checkpoint's chat template.

``max_completion_tokens`` wins over the deprecated ``max_tokens``. Streaming sends, per choice,
a first chunk with ``delta: {"role": "assistant", "content": ""}``, then content deltas, the
last one carrying ``finish_reason``.
"""

from __future__ import annotations

import logging
import uuid

from fastapi import APIRouter, Request, Response

from server.api.chat_template import render_chat
from server.api.engine_bridge import RequestGroup
from server.api.errors import bad_request
from server.api.generation import (
    Prompt,
    check_limits,
    collect,
    encode,
    engine_request,
    expert_pool_info,
    finish_reason,
    resolve_max_tokens,
    sampling_params,
    usage_info,
)
from server.api.logprobs import chat_logprobs
from server.api.protocol import ChatCompletionRequest, ChatMessage
from server.api.request_context import CLIENT_DISCONNECTED
from server.api.responses import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatLogprobs,
    DeltaMessage,
    ExpertPoolInfo,
    FinishReason,
    UsageInfo,
    chunk_base,
)
from server.api.serving import ServingState, read_body, serving
from server.api.streaming import SSEResponse, sse_event, sse_stream
from server.engine.request import RequestOutput, TokenLogprob, Usage

logger = logging.getLogger("emo_serve.api")
router = APIRouter()


async def chat_prompt(state: ServingState, messages: list[ChatMessage], *,
                      add_generation_prompt: bool = True) -> Prompt:
    tok = state.tokenizer
    text = render_chat(tok.chat_template, [m.as_template_dict() for m in messages], tok.special_tokens,
                       add_generation_prompt=add_generation_prompt)
    return Prompt(await encode(state, text, add_special=False), text)


@router.post("/v1/chat/completions", response_model=None)
async def create_chat_completion(request: Request) -> Response:
    state = serving(request)
    body = await read_body(request, ChatCompletionRequest, state.settings.max_body_bytes)
    model, named_pool = state.resolve_generation(body)
    state.ensure_accepting()
    prompt = await chat_prompt(state, body.messages)
    if not prompt.token_ids:
        raise bad_request("The chat template rendered these messages as an empty prompt",
                          param="messages", code="empty_prompt")
    check_limits(state, body, 1)
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = resolve_max_tokens(state, body.completion_limit, len(prompt.token_ids), param, "messages")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    response_id = f"chatcmpl-{uuid.uuid4().hex}"
    requests = [
        engine_request(f"{response_id}-{i}", prompt,
                       sampling_params(state, body, max_tokens=max_tokens, logprobs=logprobs, choice=i), body,
                       named_pool)
        for i in range(body.n)
    ]
    group = RequestGroup(state.engine)
    group.submit_all(requests)
    logger.info("%s: %d choice(s), %d prompt tokens", response_id, body.n, len(prompt.token_ids))
    if body.stream:
        render = _ChatChunks(body, response_id, model, prompt)
        return SSEResponse(sse_stream(group, state, render), on_close=group.cancel)
    results = await collect(request, group, body.n)
    if results is None:
        return Response(status_code=CLIENT_DISCONNECTED)
    choices = []
    for i, result in enumerate(results):
        assert result.final is not None
        choices.append(ChatChoice(
            index=i, message=AssistantMessage(content=result.text),
            logprobs=_logprobs(body, result.logprobs), finish_reason=finish_reason(result.final, state),
            expert_pool=expert_pool_info(result.final)))
    response = ChatCompletionResponse(
        id=response_id, model=model, choices=choices,
        usage=usage_info([prompt], [r.final.usage for r in results if r.final is not None]),
        expert_pool=choices[0].expert_pool,
    )
    return Response(response.model_dump_json(), media_type="application/json")


def _logprobs(body: ChatCompletionRequest, entries: list[TokenLogprob]) -> ChatLogprobs | None:
    return chat_logprobs(entries, body.top_logprobs or 0) if body.logprobs else None


class _ChatChunks:
    def __init__(self, body: ChatCompletionRequest, response_id: str, model: str, prompt: Prompt) -> None:
        self.body, self.prompt = body, prompt
        self.base = chunk_base(response_id, model)
        self.exclude = None if body.include_usage else {"usage"}
        self.usages: dict[int, Usage | None] = {}
        self.pools: dict[int, RequestOutput] = {}

    def _chunk(self, choices: list[ChatChunkChoice], *, usage: UsageInfo | None = None,
               expert_pool: ExpertPoolInfo | None = None) -> bytes:
        chunk = ChatCompletionChunk(**self.base, choices=choices, usage=usage, expert_pool=expert_pool)
        return sse_event(chunk, exclude=self.exclude)

    def head(self) -> list[bytes]:
        return [self._chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
                for i in range(self.body.n)]

    def output(self, index: int, out: RequestOutput, reason: FinishReason | None, last: bool
               ) -> bytes | None:
        logprobs = _logprobs(self.body, out.logprobs) if out.logprobs else None
        if reason is None and not out.new_text and logprobs is None and out.expert_pool is None:
            return None
        choice = ChatChunkChoice(index=index, delta=DeltaMessage(content=out.new_text or None),
                                 logprobs=logprobs, finish_reason=reason)
        choice.expert_pool = expert_pool_info(out)  # the first token's chunk, and the last
        top_pool = None
        if reason is not None:
            self.usages[index] = out.usage
            self.pools[index] = out
            if last and not self.body.include_usage:
                top_pool = expert_pool_info(self.pools.get(0))
        return self._chunk([choice], expert_pool=top_pool)

    def tail(self) -> bytes | None:
        if not self.body.include_usage:
            return None
        usage = usage_info([self.prompt], self.usages.values())
        return self._chunk([], usage=usage, expert_pool=expert_pool_info(self.pools.get(0)))

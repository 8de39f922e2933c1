"""Request bodies: OpenAI's fields and types, our extensions marked as such.

Validation is strict (a string is not an integer, 1 is not a boolean): anything pydantic refuses
is answered 400 in OpenAI's error shape by server/api/errors.py. Bounds that depend on the
server's settings (n, stop strings, prompt length) are checked in server/api/generation.py.
Unknown fields are ignored (and logged), as OpenAI-compatible servers do, so clients that send
newer fields keep working; fields we know and cannot honour are refused explicitly.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

from server.engine.request import MAX_LOGPROBS
from server.runtime.settings import POOL_NAME_PATTERN

SEED_MIN, SEED_LIMIT = -(2**63), 2**64  # signed or unsigned 64-bit
MAX_POOL_EXAMPLES = 16
PromptInput = str | list[str] | list[int] | list[list[int]]


class FieldError(ValueError):
    """A cross-field rule failed; ``param`` names the field to blame in the 400 answer."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class RequestModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)

    def unknown_fields(self, raw: dict[str, Any]) -> list[str]:
        return sorted(set(raw) - set(type(self).model_fields))


def _one_message(value: Any, handler: ValidatorFunctionWrapHandler, param: str, message: str) -> Any:
    """Replaces pydantic's per-union-member errors by one sentence a client can act on."""
    try:
        return handler(value)
    except ValidationError:
        raise FieldError(param, message) from None


class StreamOptions(RequestModel):
    include_usage: bool = False


class GenerationFields(RequestModel):
    """Fields both generation endpoints share."""

    model: str | None = None  # None: the first served name
    temperature: float | None = Field(None, ge=0.0, le=2.0)  # None: checkpoint default, else 1
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, lt=SEED_LIMIT)  # choice i samples with seed + i
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    user: str | None = None
    logit_bias: dict[str, float] | None = None  # refused when non-empty

    # --- extensions (not in OpenAI's API; vLLM has the first four under the same names) ---
    top_k: int = Field(0, ge=-1)  # 0 or -1: off
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    ignore_eos: bool = False
    # experts per MoE layer this request may use, or "full" for per-token routing over all
    expert_pool: int | Literal["full"] | None = None
    return_expert_pool: bool = False  # adds {"size", "experts"} to the response

    @field_validator("expert_pool", mode="wrap")
    @classmethod
    def _pool_type(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        return _one_message(value, handler, "expert_pool", "expert_pool must be an integer or 'full'")

    @model_validator(mode="after")
    def _check_common(self) -> GenerationFields:
        if self.stream_options is not None and not self.stream:
            raise FieldError("stream_options", "stream_options is only allowed when stream is true")
        if self.logit_bias:
            raise FieldError("logit_bias", "logit_bias is not supported")
        if isinstance(self.expert_pool, int) and self.expert_pool < 1:
            raise FieldError("expert_pool", "expert_pool must be a positive integer or 'full'")
        return self

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(GenerationFields):
    prompt: PromptInput
    max_tokens: int | None = Field(None, ge=0)  # None: up to max_model_len
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    best_of: int | None = None  # refused when > n
    suffix: str | None = None  # refused

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _prompt_type(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        return _one_message(value, handler, "prompt", "prompt must be a string, a list of strings, "
                            "a list of token ids or a list of token-id lists")

    @model_validator(mode="after")
    def _check_completion(self) -> CompletionRequest:
        if self.suffix:
            raise FieldError("suffix", "suffix is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise FieldError("best_of", "best_of is not supported (leave it unset or equal to n)")
        return self


class TextPart(RequestModel):
    type: Literal["text"]
    text: str


class ChatMessage(RequestModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None  # only text parts: the models are text-only
    name: str | None = None

    def as_template_dict(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        message: dict[str, Any] = {"role": self.role, "content": content or ""}
        if self.name is not None:
            message["name"] = self.name
        return message


class ChatCompletionRequest(GenerationFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)  # deprecated by OpenAI; max_completion_tokens wins
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Any] | None = None  # refused when non-empty
    response_format: dict[str, Any] | None = None  # only {"type": "text"}

    @model_validator(mode="after")
    def _check_chat(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise FieldError("top_logprobs", "top_logprobs requires logprobs to be true")
        if self.tools:
            raise FieldError("tools", "tools are not supported")
        if self.response_format not in (None, {"type": "text"}):
            raise FieldError("response_format", "only {'type': 'text'} is supported")
        return self

    @property
    def completion_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TokenizeRequest(RequestModel):
    """vLLM's /tokenize: either ``prompt`` or chat ``messages`` (rendered with the template)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True  # prompt only: add BOS when the tokenizer does
    add_generation_prompt: bool = True  # messages only

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise FieldError("prompt", "give exactly one of prompt or messages")
        return self


class DetokenizeRequest(RequestModel):
    model: str | None = None
    tokens: list[int]


class PoolCreateRequest(RequestModel):
    """POST /v1/pools (extension): a named expert pool computed from example texts."""

    name: str
    examples: list[str]
    size: int | None = Field(None, ge=1)  # None: the server's default pool size

    @model_validator(mode="after")
    def _check_pool(self) -> PoolCreateRequest:
        if not re.fullmatch(POOL_NAME_PATTERN, self.name):
            raise FieldError("name", f"name {self.name[:80]!r} is not a pool name: 1-64 characters of "
                             "letters, digits, '.', '_' or '-', starting with a letter or digit")
        if not 1 <= len(self.examples) <= MAX_POOL_EXAMPLES:
            raise FieldError("examples", f"examples must hold 1 to {MAX_POOL_EXAMPLES} texts, got "
                             f"{len(self.examples)}")
        empty = next((i for i, text in enumerate(self.examples) if not text), None)
        if empty is not None:
            raise FieldError("examples", f"examples[{empty}] is empty")
        return self

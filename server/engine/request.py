"""What goes into the engine (a request and its sampling parameters) and what comes out.

These types are the whole interface between the HTTP layer and the engine: the API builds a
``GenerationRequest``, the engine streams ``RequestOutput`` objects back (one per engine step in
which the request produced tokens, the last one with ``finished=True``).

Clock: every time in this module is ``time.monotonic()`` seconds.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Literal, TypedDict

FinishReason = Literal["stop", "length", "abort", "error"]
PoolSpec = int | Literal["full"]


class ExpertPoolReport(TypedDict):
    """``RequestOutput.expert_pool``: the pool size (or "full") and each layer's expert ids."""

    size: PoolSpec
    experts: list[list[int]]

MAX_LOGPROBS = 20  # top-N bound for logprobs and prompt_logprobs (OpenAI chat allows 20)
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts


class RequestError(ValueError):
    """An invalid request, answered before it is queued.

    ``param`` names the offending request field (OpenAI's ``param``), ``code`` is a short machine
    code such as ``"context_length_exceeded"`` or ``"invalid_value"``.
    """

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


class QueueFull(RuntimeError):
    """The waiting queue holds ``max_queue`` requests: try again later (HTTP 429/503)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class EngineShutdown(QueueFull):
    """The engine is shutting down or has stopped and admits nothing new (HTTP 503)."""


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"SamplingParams.{name}: {message}")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. OpenAI / vLLM semantics; see server/engine/sampler.py for the order.

    max_tokens=0 is allowed: the request only runs its prefill (useful with prompt_logprobs).
    Lists given for ``stop`` / ``stop_token_ids`` are stored as tuples.
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N for generated tokens (0 = only the chosen token)
    prompt_logprobs: int | None = None  # top-N for prompt tokens (echo)
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        _check(isinstance(self.max_tokens, int) and self.max_tokens >= 0, "max_tokens",
               f"must be an integer >= 0, got {self.max_tokens!r}")
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            value = getattr(self, name)
            _check(isinstance(value, int | float) and math.isfinite(value), name,
                   f"must be a finite number, got {value!r}")
        _check(self.temperature >= 0.0, "temperature", f"must be >= 0, got {self.temperature}")
        _check(0.0 < self.top_p <= 1.0, "top_p", f"must be in (0, 1], got {self.top_p}")
        _check(isinstance(self.top_k, int) and self.top_k >= 0, "top_k",
               f"must be an integer >= 0 (0 = off), got {self.top_k!r}")
        _check(0.0 <= self.min_p <= 1.0, "min_p", f"must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(-2.0 <= value <= 2.0, name, f"must be in [-2, 2], got {value}")
        _check(self.repetition_penalty > 0.0, "repetition_penalty",
               f"must be > 0, got {self.repetition_penalty}")
        _check(self.seed is None or (isinstance(self.seed, int) and _SEED_MIN <= self.seed <= _SEED_MAX),
               "seed", f"must be an integer in [-2**63, 2**64), got {self.seed!r}")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop",
               f"must be non-empty strings, got {self.stop!r}")
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
               f"must be integers >= 0, got {self.stop_token_ids!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(value is None or (isinstance(value, int) and 0 <= value <= MAX_LOGPROBS), name,
                   f"must be None or an integer in [0, {MAX_LOGPROBS}], got {value!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class NamedPool:
    """A pool fixed in advance (POST /v1/pools): ``experts[layer]`` = sorted expert ids, empty
    for dense layers. ``name`` is the pool's name, ``model`` the model id clients ask for."""

    name: str
    model: str
    experts: tuple[tuple[int, ...], ...]

    @property
    def size(self) -> int:
        return max((len(ids) for ids in self.experts), default=0)

    @property
    def keys(self) -> list[tuple[int, int]]:
        """(layer, expert) of every expert of the pool."""
        return [(layer, e) for layer, ids in enumerate(self.experts) for e in ids]


@dataclass(frozen=True)
class GenerationRequest:
    """One generation. ``expert_pool``: experts per MoE layer, "full" (per-token routing over all
    experts) or None (the engine's default). ``named_pool``: run on that pool whatever the
    prompt (its selection at prefill is skipped); excludes ``expert_pool``.
    ``arrival_time`` is ``time.monotonic()``."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    expert_pool: PoolSpec | None = None
    return_expert_pool: bool = False
    arrival_time: float = field(default_factory=time.monotonic)
    named_pool: NamedPool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.request_id, str) or not self.request_id:
            raise ValueError(f"GenerationRequest.request_id: must be a non-empty string, "
                             f"got {self.request_id!r}")
        if not isinstance(self.sampling, SamplingParams):
            raise ValueError("GenerationRequest.sampling: must be a SamplingParams")
        pool = self.expert_pool
        if not (pool is None or pool == "full" or (isinstance(pool, int) and not isinstance(pool, bool))):
            raise ValueError(f"GenerationRequest.expert_pool: must be an integer, 'full' or None, "
                             f"got {pool!r}")
        if self.named_pool is not None and pool is not None:
            raise ValueError("GenerationRequest: give expert_pool or named_pool, not both")


@dataclass(frozen=True)
class TokenLogprob:
    """A token with its log-probability under the raw model distribution (log_softmax of the
    logits before penalties / temperature, as vLLM reports by default) and the top-N
    alternatives ``(token_id, token_text, logprob)``, best first."""

    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]]


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    expert_hits: int = 0
    expert_misses: int = 0
    expert_bytes_loaded: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class RequestOutput:
    """The increment of one request produced by one engine step.

    ``new_text`` may be empty while text is held back (an incomplete UTF-8 character, or text
    that could still become a stop string). ``prompt_logprobs`` is set on the first output only.
    ``stop_reason``: the stop string or stop token id that ended the request, when one did.
    ``expert_pool`` (asked for; on the first token's output and on the last): ``{"size": P or
    "full", "experts": [[ids of layer 0], ...]}`` with an empty list for dense layers and for
    full routing.
    """

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    error: str | None = None
    usage: Usage | None = None
    expert_pool: ExpertPoolReport | None = None
    stop_reason: str | int | None = None
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finished_time: float | None = None

"""Response bodies and stream chunks, in OpenAI's shapes; our extensions marked as such.

Extension fields (``expert_pool``, the expert-cache counters of ``usage``) are left out of the
JSON when they are None, so a plain OpenAI client sees exactly OpenAI's shape. ``usage`` on
stream chunks is present (null) only when the client asked for it with stream_options.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar, Generic, Literal, TypedDict, TypeVar

from pydantic import BaseModel, Field, SerializerFunctionWrapHandler, model_serializer

from expert_cache.base import ResidencySnapshot, TierStats

FinishReason = Literal["stop", "length"]


class ResponseModel(BaseModel):
    omit_if_none: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _omit_extensions(self, handler: SerializerFunctionWrapHandler) -> Any:
        data = handler(self)
        for name in self.omit_if_none:
            if data.get(name) is None:
                data.pop(name, None)
        return data


def now() -> int:
    return int(time.time())


class ChunkBase(TypedDict):
    """The fields every chunk of one streamed response repeats (passed with ``**``)."""

    id: str
    created: int
    model: str


def chunk_base(response_id: str, model: str) -> ChunkBase:
    return {"id": response_id, "created": now(), "model": model}


class ExpertPoolInfo(ResponseModel):
    """Extension: the experts a request was restricted to, per layer (``[]`` for dense layers)."""

    size: int | Literal["full"]
    experts: list[list[int]]


class UsageInfo(ResponseModel):
    omit_if_none = frozenset({"expert_cache_hits", "expert_cache_misses", "expert_cache_bytes_loaded"})

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    # --- extensions: this request's device-tier expert lookups and bytes paged in ---
    expert_cache_hits: int | None = None
    expert_cache_misses: int | None = None
    expert_cache_bytes_loaded: int | None = None


ChoiceT = TypeVar("ChoiceT", bound=BaseModel)


class CompletionBody(ResponseModel, Generic[ChoiceT]):
    """The fields of every completion and chat completion body, whole or a stream chunk, in
    OpenAI's order. Subclasses narrow ``object``, ``created`` and ``usage``; a field a subclass
    declares again keeps its place here, so the JSON's key order is this one."""

    omit_if_none = frozenset({"expert_pool"})

    id: str
    object: str
    created: int
    model: str
    choices: list[ChoiceT]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None
    # extension: choice 0's pool (on a stream's last chunk)
    expert_pool: ExpertPoolInfo | None = None


# ---- /v1/completions ----
class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(ResponseModel):
    omit_if_none = frozenset({"expert_pool"})

    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None
    expert_pool: ExpertPoolInfo | None = None  # extension (streamed: with the first token, and last)


class CompletionResponse(CompletionBody[CompletionChoice]):
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)


class CompletionChunk(CompletionBody[CompletionChoice]):
    object: Literal["text_completion"] = "text_completion"


# ---- /v1/chat/completions ----
class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None
    refusal: list[ChatTokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: str | None = None


class ChatChoice(ResponseModel):
    omit_if_none = frozenset({"expert_pool"})

    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason
    expert_pool: ExpertPoolInfo | None = None  # extension


class ChatCompletionResponse(CompletionBody[ChatChoice]):
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    usage: UsageInfo


class DeltaMessage(ResponseModel):
    omit_if_none = frozenset({"role", "content"})

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(ResponseModel):
    omit_if_none = frozenset({"expert_pool"})

    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None
    expert_pool: ExpertPoolInfo | None = None  # extension (streamed: with the first token, and last)


class ChatCompletionChunk(CompletionBody[ChatChunkChoice]):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"


# ---- other routes ----
class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "emo-serve"
    root: str | None = None  # where the weights come from (vLLM's field)
    parent: str | None = None  # a named pool's served model, as vLLM gives a LoRA adapter's base
    max_model_len: int  # extension (vLLM's field)


class ExpertPoolObject(BaseModel):
    """Extension: a named expert pool (POST/GET /v1/pools)."""

    object: Literal["expert_pool"] = "expert_pool"
    name: str
    model: str  # the model id that runs on it: "<served>:<name>"
    size: int
    experts: list[list[int]]  # per layer ([] for dense layers)
    created: int
    examples: int  # how many example texts it was computed from
    resident: bool  # kept on the device tier (--pin-pools)


class ExpertPoolList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ExpertPoolObject]


class ExpertPoolDeleted(BaseModel):
    object: Literal["expert_pool"] = "expert_pool"
    name: str
    model: str
    deleted: bool = True


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


# ---- /v1/expert_cache (extension) ----
class DeviceTierResidency(BaseModel):
    capacity: int  # slots of the layer's slab, shared by every layer of that slab
    resident: list[int]  # expert ids ready in a device slot
    pinned: list[int]  # held by running requests
    loading: list[int]  # being copied into a device slot


class HostTierResidency(BaseModel):
    capacity: int
    resident: list[int]


class LayerResidencyInfo(BaseModel):
    layer: int
    slab: int
    experts: list[int]  # every pageable (routable) expert id of the layer
    device: DeviceTierResidency
    host: HostTierResidency


class TierCounters(BaseModel):
    hits: int
    misses: int
    evictions: int
    resident: int
    resident_bytes: int
    capacity_bytes: int

    @classmethod
    def of(cls, tier: TierStats) -> TierCounters:
        return cls(hits=tier.hits, misses=tier.misses, evictions=tier.evictions, resident=tier.resident,
                   resident_bytes=tier.resident_bytes, capacity_bytes=tier.capacity_bytes)


class ExpertCacheInfo(BaseModel):
    """Where every pageable expert is now, and the cache's counters since start."""

    object: Literal["expert_cache"] = "expert_cache"
    device: TierCounters
    host: TierCounters
    bytes_loaded_from_host: int
    bytes_loaded_from_disk: int
    pinned_slots: int
    capacity_slots: int
    layers: list[LayerResidencyInfo]

    @classmethod
    def of(cls, snap: ResidencySnapshot) -> ExpertCacheInfo:
        s = snap.stats
        layers = [
            LayerResidencyInfo(
                layer=r.layer, slab=r.slab, experts=list(r.experts),
                device=DeviceTierResidency(capacity=r.device_capacity, resident=list(r.resident),
                                           pinned=list(r.pinned), loading=list(r.loading)),
                host=HostTierResidency(capacity=r.host_capacity, resident=list(r.host_resident)),
            )
            for r in snap.layers
        ]
        return cls(device=TierCounters.of(s.device), host=TierCounters.of(s.host),
                   bytes_loaded_from_host=s.bytes_loaded_from_host,
                   bytes_loaded_from_disk=s.bytes_loaded_from_disk, pinned_slots=s.pinned_slots,
                   capacity_slots=s.capacity_slots, layers=layers)

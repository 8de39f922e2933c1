"""Per-request state inside the engine: tokens, KV slot, expert pool and pins, sampling,
detokenization, timing and expert-cache accounting. Lives on the engine thread only."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from expert_cache.async_loads import ExpertLoad
from expert_cache.base import ExpertKey
from server.engine.detokenizer import Detokenizer
from server.engine.request import GenerationRequest, RequestOutput
from server.engine.sampler import SamplingState
from server.model.model import PrefillState


class SeqStatus(enum.Enum):
    WAITING = "waiting"  # queued, not admitted
    PREFILLING = "prefilling"  # admitted (KV slot held), its prefill advancing step by step
    LOADING = "loading"  # prefilling, parked until a loader thread has made a layer's experts resident
    RUNNING = "running"  # decoding
    FINISHED = "finished"


@dataclass
class SeqTimes:
    """time.monotonic() stamps."""

    arrival: float
    scheduled: float | None = None  # admitted: prefill started (end of queueing)
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None


@dataclass
class ExpertUsage:
    hits: int = 0
    misses: int = 0
    bytes_loaded: int = 0


@dataclass(eq=False)
class Sequence:
    request: GenerationRequest
    on_output: Callable[[RequestOutput], None]
    pool_size: int | None  # experts per MoE layer; None = full per-token routing
    sampling: SamplingState
    detok: Detokenizer
    status: SeqStatus = SeqStatus.WAITING
    output_ids: list[int] = field(default_factory=list)
    slot: int | None = None  # KV slot while running
    pools: list[torch.Tensor | None] | None = None  # per layer, from prefill (pool requests)
    given_pools: list[torch.Tensor | None] | None = None  # a named pool: prefill uses it as is
    pool_mask: torch.Tensor | None = None  # [L, E_max] bool on the device (pool requests)
    # int32 [L, E_max] on the device: slab slot per expert id while the request runs (pool
    # rows: their pinned pool; full routing: set only when every expert stays resident)
    slot_table: torch.Tensor | None = None
    pinned: list[ExpertKey] = field(default_factory=list)  # released exactly once at the end
    prefill: PrefillState | None = None  # while prefilling: the prompt part-way through the layers
    load: ExpertLoad | None = None  # while loading: the loader-thread load it waits for
    pool_source: str = "device"  # the slowest tier any expert of its pool came from
    predicted_keys: list[ExpertKey] | None = None  # guess of the pool, for scheduling only
    waited_steps: int = 0  # scheduler steps spent waiting (starvation bound)
    times: SeqTimes = field(default_factory=lambda: SeqTimes(0.0))
    experts: ExpertUsage = field(default_factory=ExpertUsage)
    cancelled: bool = False
    prompt_logprobs_sent: bool = False

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prompt_ids(self) -> list[int]:
        return self.request.prompt_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.request.prompt_token_ids) + len(self.output_ids)

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.request.prompt_token_ids[-1]

    @property
    def is_pool(self) -> bool:
        return self.pool_size is not None

    @property
    def max_tokens(self) -> int:
        return self.request.sampling.max_tokens

    def append(self, token_id: int) -> None:
        self.output_ids.append(token_id)
        self.sampling.record(token_id)

    def pool_lists(self) -> list[list[int]]:
        """The pool per layer as id lists ([] for dense layers and full routing)."""
        if self.pools is None:
            return []
        return [[] if p is None else [int(e) for e in p.tolist()] for p in self.pools]

"""What the scheduler and the model runner see of a request: its tokens, its limits, its status,
its KV slot and its expert pool (pins, slot table, prefill in progress) and the expert-cache
traffic it caused. Sampling, detokenization, timing and output delivery belong to the request
(``server.engine.request_state``), which the Sequence does not know: a Sequence is built from
token ids alone, so the scheduler can be exercised without a model or a tokenizer. Lives on the
engine thread only."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from expert_cache.base import ExpertKey

if TYPE_CHECKING:  # types only: the scheduler, and its tests, need no model code
    import torch

    from expert_cache.async_loads import ExpertLoad
    from server.model.model import PrefillState


class SeqStatus(enum.Enum):
    WAITING = "waiting"  # queued, not admitted
    PREFILLING = "prefilling"  # admitted (KV slot held), its prefill advancing step by step
    LOADING = "loading"  # prefilling, parked until a loader thread has made a layer's experts resident
    RUNNING = "running"  # decoding
    FINISHED = "finished"


@dataclass
class ExpertUsage:
    hits: int = 0
    misses: int = 0
    bytes_loaded: int = 0


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    pool_size: int | None  # experts per MoE layer; None = full per-token routing
    prompt_logits: bool = False  # prefill keeps every prompt position's logits (prompt logprobs)
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
    experts: ExpertUsage = field(default_factory=ExpertUsage)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    @property
    def is_pool(self) -> bool:
        return self.pool_size is not None

    def pool_lists(self) -> list[list[int]]:
        """The pool per layer as id lists ([] for dense layers and full routing)."""
        if self.pools is None:
            return []
        return [[] if p is None else [int(e) for e in p.tolist()] for p in self.pools]

"""Runs the model for the engine: owns the KV cache, turns sequences into model inputs and
accounts expert-cache traffic per request.

Expert accounting: the store's ``thread_traffic()`` (this thread's tally alone: loader and
prefetch threads work at the same time) is read before and after each model call. A
prefill's delta belongs to its one request: a pool request's misses are its pool's cold
experts. In a decode step a row whose pool is pinned cannot miss (every expert it may route to
has been held since its prefill), so the step's misses and bytes loaded belong to the
full-routing rows, split evenly among them: the store cannot tell which of them a load served.
Hits are lookups the rows share, split evenly over all rows (remainders to the first rows).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING, TypeVar

import torch

from expert_cache.base import ExpertKey, ExpertStore
from server.engine.sequence import Sequence
from server.model.kv_cache import KVCache
from server.model.model import PrefillState

if TYPE_CHECKING:
    from server.model.loader import LoadedModel

T = TypeVar("T")
log = logging.getLogger("emo_serve.engine")


def model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    for t in model.parameters():
        if t.is_floating_point():
            return t.device, t.dtype
    raise ValueError("the model has no floating-point parameter to take its device and dtype from")


def _traffic(store: ExpertStore) -> tuple[int, int, int]:
    t = store.thread_traffic()  # this thread's alone: loader threads work at the same time
    return t.hits, t.misses, t.bytes_loaded


def _even(total: int, n: int) -> list[int]:
    """``total`` in ``n`` integer shares, the remainder one each to the first shares."""
    return [total // n + (1 if i < total % n else 0) for i in range(n)]


class ModelRunner:
    def __init__(self, loaded: LoadedModel, num_slots: int, max_len: int,
                 kv_dtype: torch.dtype | None = None) -> None:
        self.model = loaded.model
        self.config = loaded.config
        self.store: ExpertStore = self.model.expert_store
        self.device, self.dtype = model_device_dtype(self.model)
        self.kv = KVCache(self.config, num_slots, max_len, self.device, kv_dtype or self.dtype)
        self.num_layers = self.config.num_layers
        self.max_experts = max(self.config.num_experts)
        if self.device.type == "cuda" and self.model.fast_decode:
            # decode steps of rows whose experts stay on the device replay CUDA graphs, captured
            # here at start-up per batch bucket; the CPU runs the same step eagerly
            try:
                self.model.capture_decode_graphs(self.kv, num_slots)
            except Exception:  # noqa: BLE001 - serve without graphs rather than not at all
                log.exception("CUDA graph capture of the decode step failed; decoding without graphs")
                torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def prefill(self, seq: Sequence) -> torch.Tensor:
        """Prefill ``seq`` into its slot; float32 logits [T, V] (prompt logprobs asked) or
        [1, V]. Pool requests keep their pool pinned (``seq.pinned``) until ``release``."""
        if seq.slot is None:
            raise ValueError(f"request {seq.request_id}: prefill without a KV slot")
        ids = torch.tensor(seq.prompt_ids, dtype=torch.long, device=self.device)
        before = _traffic(self.store)
        out = self.model.prefill(ids, self.kv, seq.slot, pool_size=seq.pool_size,
                                 pin_pool=seq.is_pool, given_pools=seq.given_pools,
                                 all_logits=seq.prompt_logits)
        seq.pinned = list(out.pinned) if seq.is_pool else []  # first: release() must find them
        after = _traffic(self.store)
        seq.experts.hits += after[0] - before[0]
        seq.experts.misses += after[1] - before[1]
        seq.experts.bytes_loaded += after[2] - before[2]
        if seq.is_pool:
            seq.pools = list(out.pools) if out.pools is not None else None
            seq.pool_mask = self.model.pool_mask_row(seq.pools).to(self.device)  # [L, E_max]
            seq.slot_table = self.model.slot_table_row(seq.pools, dict(zip(out.pinned, out.pinned_slots,
                                                                           strict=True)))
        else:  # full routing: a fixed table when nothing pages, else the eager paging path
            seq.slot_table = self.model.resident_table()
        return out.logits

    # ---- the prefill in pieces (the engine's path; ``prefill`` above is the same, whole) --------
    def prefill_start(self, seq: Sequence) -> None:
        if seq.slot is None:
            raise ValueError(f"request {seq.request_id}: prefill without a KV slot")
        ids = torch.tensor(seq.prompt_ids, dtype=torch.long, device=self.device)
        seq.prefill = self.model.prefill_start(ids, self.kv, seq.slot, pool_size=seq.pool_size,
                                               all_logits=seq.prompt_logits,
                                               given_pools=seq.given_pools)

    def prefill_attend(self, seq: Sequence) -> list[ExpertKey]:
        """Attention of the next layer; the keys that must be resident before its MLP runs:
        the layer's pool (to be pinned for the request's life) or, for full routing, the
        experts its tokens chose (to be paged in, not pinned)."""
        state = self._state(seq)
        pool_keys = self._counted(seq, lambda: self.model.prefill_attend(state))
        if pool_keys or seq.is_pool:
            return pool_keys
        return self.model.prefill_routed_keys(state)

    def pin(self, seq: Sequence, keys: list[ExpertKey]) -> None:
        """Pin ``keys`` for ``seq`` on this thread (resident ones: no read)."""
        self._counted(seq, lambda: self.store.acquire(keys))
        seq.pinned.extend(keys)

    def prefill_mlp(self, seq: Sequence, max_rows: int) -> int:
        state = self._state(seq)
        return self._counted(seq, lambda: self.model.prefill_mlp(state, max_rows))

    def prefill_finish(self, seq: Sequence) -> torch.Tensor:
        """float32 logits [T, V] (prompt logprobs asked) or [1, V]; the pools go on ``seq``."""
        state = self._state(seq)
        logits = self.model.prefill_logits(state)
        seq.prefill = None
        if seq.is_pool:
            seq.pools = state.pools
            seq.pool_mask = self.model.pool_mask_row(seq.pools).to(self.device)  # [L, E_max]
            # the pool is pinned (here or by loader threads): its slots cannot move; a second
            # pin finds them without a read, and is dropped at once
            slots = self._counted(seq, lambda: self._slots_of(seq.pinned))
            seq.slot_table = self.model.slot_table_row(seq.pools, dict(zip(seq.pinned, slots, strict=True)))
        else:  # full routing: a fixed table when nothing pages, else the eager paging path
            seq.slot_table = self.model.resident_table()
        return logits

    def _slots_of(self, keys: list[ExpertKey]) -> list[int]:
        slots: list[int] = []
        for layer in dict.fromkeys(k[0] for k in keys):  # one acquire per slab call: one layer each
            group = [k for k in keys if k[0] == layer]
            slots.extend(self.store.acquire_slots(group))
            self.store.release(group)
        order = {k: i for i, k in enumerate(k for layer in dict.fromkeys(k[0] for k in keys)
                                              for k in keys if k[0] == layer)}
        return [slots[order[k]] for k in keys]

    @staticmethod
    def _state(seq: Sequence) -> PrefillState:
        if seq.prefill is None:
            raise RuntimeError(f"request {seq.request_id}: no prefill in progress")
        return seq.prefill

    @torch.inference_mode()
    def _counted(self, seq: Sequence, work: Callable[[], T]) -> T:
        before = _traffic(self.store)
        out = work()
        after = _traffic(self.store)
        seq.experts.hits += after[0] - before[0]
        seq.experts.misses += after[1] - before[1]
        seq.experts.bytes_loaded += after[2] - before[2]
        return out

    @torch.inference_mode()
    def decode(self, seqs: Seq[Sequence]) -> torch.Tensor:
        """One token for every row: float32 logits [B, V]."""
        # host tensors: the model moves them with one copy each (or its graphs take them as
        # values); positions stay readable on the host without a device sync
        ids = torch.tensor([s.last_token for s in seqs], dtype=torch.long)
        positions = torch.tensor([s.num_tokens - 1 for s in seqs], dtype=torch.long)
        slots = torch.tensor([s.slot for s in seqs], dtype=torch.long)
        tables = [s.slot_table for s in seqs if s.slot_table is not None]
        # every row's experts stay on the device: the static step, no pool mask, no store calls
        fast = self.model.fast_decode and len(tables) == len(seqs)
        mask = None if fast else self.pool_mask(seqs)
        before = _traffic(self.store)
        logits = self.model.decode(ids, positions, self.kv, slots, mask,
                                   slot_tables=torch.stack(tables) if fast else None)
        after = _traffic(self.store)
        self._split(seqs, [a - b for a, b in zip(after, before, strict=True)])
        return logits

    def pool_mask(self, seqs: Seq[Sequence]) -> torch.Tensor | None:
        """[B, L, E_max] bool, full-routing rows all True; None when every row is full."""
        if all(s.pool_mask is None for s in seqs):
            return None
        full = torch.ones(self.num_layers, self.max_experts, dtype=torch.bool, device=self.device)
        return torch.stack([full if s.pool_mask is None else s.pool_mask for s in seqs])

    @staticmethod
    def _split(seqs: Seq[Sequence], delta: list[int]) -> None:
        hits, misses, loaded = delta
        for seq, share in zip(seqs, _even(hits, len(seqs)), strict=True):
            seq.experts.hits += share
        can_miss = [s for s in seqs if not s.pinned] or list(seqs)
        n = len(can_miss)
        for seq, m, b in zip(can_miss, _even(misses, n), _even(loaded, n), strict=True):
            seq.experts.misses += m
            seq.experts.bytes_loaded += b

    def release(self, seq: Sequence) -> None:
        """Drop the sequence's pool pins (exactly once)."""
        pinned, seq.pinned = seq.pinned, []
        if pinned:
            self.store.release(pinned)

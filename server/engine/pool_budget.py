"""Pool-aware admission arithmetic against the expert store, and a cheap pool predictor.

Slots belong to slabs, and layers whose experts have the same shapes share one slab (EMO: every
MoE layer), so a pool of P experts per layer needs ``P * len(layers)`` slots of its slab. A pool
request is admitted only when that many slots are free (unpinned) in every slab: its pool can
then be pinned for its whole life and the union of running pools always fits the device tier.
Counting P per layer ignores overlap with pools already pinned (pins are shared per key), so
admission is conservative and never over-commits.

Full-routing requests pin nothing for long; each step acquires experts in groups that fit the
free slots, so they need a few free slots to make progress: while one runs, pool admission
keeps ``reserve`` slots (the model's top_k) free in every slab.

Prediction (scheduling preference only, never correctness): the pool a waiting request will
get is guessed as the pool of the most similar recent request, similarity = Jaccard overlap of
prompt token-id sets (>= ``min_similarity``). Requests sharing a system prompt, a few-shot
prefix or a domain vocabulary tend to share pools, and this costs a set intersection, not a
forward pass. The score of a waiting request is the fraction of its predicted keys resident;
without a prediction it is the fraction of all experts resident (what a random pool would find),
so with everything resident all requests score the same and FIFO order decides.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from expert_cache.base import ExpertKey, ExpertStore


@dataclass(frozen=True)
class SlabGroup:
    layers: tuple[int, ...]  # MoE layers whose experts live in one slab of slots

    @property
    def rep(self) -> int:
        return self.layers[0]


def slab_groups(store: ExpertStore, moe_layers: Sequence[int]) -> list[SlabGroup]:
    """Group layers by the slab (same tensors) that serves them."""
    groups: dict[tuple[tuple[int, tuple[int, ...]], ...], list[int]] = {}
    for layer in sorted(moe_layers):
        slab = store.slab(layer)
        ident = tuple((t.data_ptr(), tuple(t.shape)) for _, t in sorted(slab.items()))
        groups.setdefault(ident, []).append(layer)
    return [SlabGroup(tuple(layers)) for layers in groups.values()]


class PoolBudget:
    def __init__(self, store: ExpertStore, moe_layers: Sequence[int], reserve: int, num_keys: int) -> None:
        self.store = store
        self.groups = slab_groups(store, moe_layers)
        self.reserve = reserve
        self.num_keys = num_keys  # routable experts in the catalog
        # Experts pinned for the server's life (--pin-pools). They take slots no other pool
        # can use, and a pool that shares them needs no slot for them. Replaced, never mutated,
        # so other threads may read it.
        self.resident: frozenset[ExpertKey] = frozenset()

    def need(self, pool_size: int) -> list[int]:
        """Slots a pool of ``pool_size`` per layer needs in each slab group."""
        return [pool_size * len(g.layers) for g in self.groups]

    def held(self, keys: frozenset[ExpertKey]) -> list[int]:
        """How many of ``keys`` fall in each slab group."""
        return [sum(1 for k in keys if k[0] in g.layers) for g in self.groups]

    def misfit(self, pool_size: int, keys: Sequence[ExpertKey] | None = None,
               beside_resident: bool = True) -> str | None:
        """Why a pool of this size (of exactly ``keys`` when known) can never be pinned on this
        device tier (next to the resident pools unless ``beside_resident`` is False), or None."""
        resident = self.resident if beside_resident else frozenset()
        need = self.need(pool_size)
        if keys is not None:
            need = [n - s for n, s in zip(need, self.held(resident & frozenset(keys)), strict=True)]
        for g, n, held in zip(self.groups, need, self.held(resident), strict=True):
            cap = self.store.capacity(g.rep)
            if n > cap - held:
                pinned = f", {held} of them held by pinned pools" if held else ""
                return (f"expert_pool={pool_size} needs {n} device expert slots ({pool_size} x "
                        f"{len(g.layers)} layers) but the device expert cache holds {cap} for "
                        f"layers {g.layers[0]}..{g.layers[-1]}{pinned}; use a pool <= "
                        f"{(cap - held) // len(g.layers)} or a larger --expert-cache")
        return None

    def pools_per_tier(self, pool_size: int) -> int:
        """How many pools of ``pool_size`` the device tier holds at once (no overlap assumed)."""
        return min((self.store.capacity(g.rep) // n for g, n in zip(self.groups, self.need(pool_size),
                                                                    strict=True) if n), default=0)

    def can_admit_pool(self, pool_size: int, full_running: bool,
                       predicted: Sequence[ExpertKey] | None = None,
                       pinned: frozenset[ExpertKey] = frozenset(),
                       reserved: Sequence[int] | None = None) -> bool:
        """``predicted``: the request's likely pool; ``pinned``: keys admitted requests pin now.
        Pins are shared per key, so predicted experts already pinned cost no free slot. A wrong
        prediction ends in SlotsExhausted during prefill, which requeues the request.
        ``reserved``: slots per slab group that admitted requests will still pin (their layers
        not reached yet); they are not free for this one."""
        keep = self.reserve if full_running else 0
        need = self.need(pool_size)
        if reserved is not None:
            need = [n + r for n, r in zip(need, reserved, strict=True)]
        pinned = pinned | self.resident
        if predicted and pinned:
            shared = [sum(1 for k in set(predicted) if k in pinned and k[0] in g.layers) for g in self.groups]
            need = [n - s for n, s in zip(need, shared, strict=True)]
        return all(self.store.free_slots(g.rep) - n >= keep for g, n in zip(self.groups, need, strict=True))

    @property
    def can_miss(self) -> bool:
        """Whether the device tier is smaller than the experts: some step may have to page."""
        return sum(self.store.capacity(g.rep) for g in self.groups) < self.num_keys

    def has_free_slot(self) -> bool:
        """Every slab has an unpinned slot (what computing a pool from examples needs)."""
        return all(self.store.free_slots(g.rep) > 0 for g in self.groups)

    def can_admit_full(self) -> bool:
        return all(self.store.free_slots(g.rep) >= min(self.reserve, self.store.capacity(g.rep))
                   for g in self.groups)

    def residency(self, keys: Sequence[ExpertKey]) -> float:
        """Fraction of ``keys`` resident on the device tier (0 when there are none)."""
        if not keys:
            return 0.0
        return sum(1 for k in keys if self.store.is_resident(k)) / len(keys)

    def mean_residency(self) -> float:
        """Fraction of all routable experts resident on the device tier."""
        return min(1.0, self.store.stats().device.resident / self.num_keys) if self.num_keys else 0.0


class PoolPredictor:
    """Remembers the pools of recent requests; guesses a new prompt's pool from the most
    similar one (see the module docstring)."""

    def __init__(self, history: int = 64, min_similarity: float = 0.3) -> None:
        self._history: deque[tuple[frozenset[int], list[ExpertKey]]] = deque(maxlen=history)
        self.min_similarity = min_similarity

    def observe(self, prompt_ids: Sequence[int], pools: Sequence[Sequence[int]]) -> None:
        """Record the pool (``pools[layer]`` = expert ids) a prompt actually got."""
        keys = [(layer, e) for layer, ids in enumerate(pools) for e in ids]
        if keys:
            self._history.append((frozenset(prompt_ids), keys))

    def predict(self, prompt_ids: Sequence[int]) -> list[ExpertKey] | None:
        tokens = frozenset(prompt_ids)
        best, best_sim = None, self.min_similarity
        for seen, keys in reversed(self._history):  # newest first wins ties
            union = len(tokens | seen)
            sim = len(tokens & seen) / union if union else 0.0
            if sim > best_sim or (best is None and sim >= best_sim):
                best, best_sim = keys, sim
        return best

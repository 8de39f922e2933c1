"""Named pools on the engine side: computing a pool from examples, and keeping pools resident.

Both run on the engine thread, between steps, because both touch the model or the expert store
(``Engine.compute_pool`` / ``pin_pool`` / ``unpin_pool`` hand them over and return a Future).

Resident pools (``--pin-pools``) hold one pin per expert for as long as they are resident, so
the device tier never evicts them. Their experts are the budget's ``resident`` keys: admission
and the "can this pool ever fit" check count them as taken, except for a pool that shares them.
A pool may only become resident when the union of resident experts leaves, in every slab,
room for the ``reserve`` slots that any other request needs to make progress.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from expert_cache.base import ExpertKey, ExpertStore, SlotsExhausted
from server.engine.pool_budget import PoolBudget

if TYPE_CHECKING:
    from server.model.model import MoETransformer

PoolLists = list[list[int]]  # per layer, sorted expert ids ([] for dense layers)


class PoolNotResident(RuntimeError):
    """A pool cannot be made resident (it does not fit, or its slots are in use right now)."""


@dataclass
class ControlJob:
    """Work for the engine thread outside the request flow; its result or error goes to
    ``future``. With ``retry_while_busy``, a run that runs out of device expert slots while
    requests hold them is tried again once slots are free, instead of failing."""

    run: Callable[[], Any]
    future: Future[Any] = field(default_factory=Future)
    retry_while_busy: bool = False


def examples_to_pools(model: MoETransformer, examples: Sequence[Sequence[int]], size: int,
                      device: torch.device) -> PoolLists:
    """The pool (per layer id lists) that EMO's rule picks from all ``examples`` together."""
    tensors = [torch.tensor(list(ids), dtype=torch.long, device=device) for ids in examples]
    pools = model.pools_from_examples(tensors, size)
    return [[] if p is None else [int(e) for e in p.tolist()] for p in pools]


class ResidentPools:
    """Pools pinned on the device tier by name. Changed on the engine thread only (or before it
    starts); ``names`` and ``models`` are replaced whole, so any thread may read them."""

    def __init__(self, store: ExpertStore, budget: PoolBudget) -> None:
        self.store, self.budget = store, budget
        self._keys: dict[str, list[ExpertKey]] = {}
        self._models: dict[str, str] = {}  # name -> the model id clients ask for
        self.names: tuple[str, ...] = ()
        self.models: tuple[str, ...] = ()  # model ids: loaded adapters, to the gateway
    def check_fit(self, pools: dict[str, Sequence[ExpertKey]]) -> str | None:
        """Why these pools (replacing any resident ones of the same names) cannot all be
        resident together, with the numbers; None when they can."""
        keys = {k for name, ks in self._keys.items() if name not in pools for k in ks}
        keys.update(k for ks in pools.values() for k in ks)
        for g, held in zip(self.budget.groups, self.budget.held(frozenset(keys)), strict=True):
            cap = self.store.capacity(g.rep)
            if held + min(self.budget.reserve, cap) > cap:
                sizes = ", ".join(f"{name} {sum(1 for k in ks if k[0] in g.layers)}"
                                  for name, ks in sorted(pools.items()))
                return (f"pinned pools need {held} distinct device expert slots in layers "
                        f"{g.layers[0]}..{g.layers[-1]} ({sizes}; with the pools already resident) "
                        f"but the device expert cache holds {cap} there, of which "
                        f"{min(self.budget.reserve, cap)} must stay free for other requests; "
                        f"use a larger --expert-cache, fewer pools or smaller ones")
        return None

    def pin(self, name: str, keys: Sequence[ExpertKey], model: str) -> None:
        """Make ``keys`` the resident pool ``name`` (replacing its old experts). Raises
        PoolNotResident when it does not fit or its slots are taken by running requests."""
        why = self.check_fit({name: keys})
        if why is not None:
            raise PoolNotResident(why)
        new = list(dict.fromkeys(keys))
        try:
            self.store.acquire(new)  # loads what is missing; pins nothing when it raises
        except SlotsExhausted as e:
            raise PoolNotResident(f"pool {name!r} cannot be made resident now: {e}") from None
        old = self._keys.pop(name, [])
        self._keys[name], self._models[name] = new, model
        self._publish()
        if old:
            self.store.release(old)

    def unpin(self, name: str) -> None:
        old = self._keys.pop(name, None)
        self._models.pop(name, None)
        if old is not None:
            self._publish()
            self.store.release(old)

    def _publish(self) -> None:
        self.budget.resident = frozenset(k for ks in self._keys.values() for k in ks)
        self.names = tuple(sorted(self._keys))
        self.models = tuple(sorted(self._models.values()))

"""The MoE block: router, grouped compute on the experts tokens chose, trunk experts.

Routable expert weights are reached only through the ExpertStore: ``acquire`` -> slot ids ->
``slab[part][slot]`` views (no weight copy). The distinct experts a step needs are pinned in
groups that fit ``free_slots``, so full routing runs even with a device tier of few slots; each
group is released as soon as it has been computed.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from expert_cache.base import ExpertStore, SlotsExhausted
from server.model.config import ModelConfig
from server.model.layers import SwiGLU, as_float, expert_forward, frozen
from server.model.routing import LayerRouting, Routes, always_index, pick_routes, route


@dataclass
class ExpertPlan:
    """The picks of one routed step grouped by expert: expert ``expert_ids[j]`` serves sorted
    picks ``starts[j]:starts[j+1]``, i.e. tokens ``token_of[...]`` with weights ``weight_of[...]``."""

    num_tokens: int
    expert_ids: list[int]
    starts: list[int]
    token_of: torch.Tensor  # [T*k]
    weight_of: torch.Tensor  # [T*k]

    def rows(self, first: int, stop: int) -> int:
        """Token rows experts ``first:stop`` compute."""
        return self.starts[stop] - self.starts[first]


class MoEBlock(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        layer: int,
        router: torch.Tensor,
        fixed_gate_up: torch.Tensor,
        fixed_down: torch.Tensor,
        store: ExpertStore,
        shared_mlp: SwiGLU | None = None,
        shared_mlp_gate: torch.Tensor | None = None,
    ) -> None:
        """router [E, H]; fixed_gate_up [F, 2I, H] and fixed_down [F, H, I]: the shared or
        always-active experts (trunk, resident) in ``LayerRouting.fixed`` order."""
        super().__init__()
        self.layer = layer
        self.spec = LayerRouting.from_config(config, layer)
        E, H = router.shape
        # the router and the fixed experts' gate/up rows read the same input: one fused weight,
        # one matmul (the names stay as views of it)
        self.router_fixed = frozen(torch.cat([router, fixed_gate_up.reshape(-1, H)]))  # [E + F*2I, H]
        self.router = self.router_fixed.detach()[:E]
        self.fixed_gate_up = self.router_fixed.detach()[E:].view(fixed_gate_up.shape)  # [F, 2I, H]
        self.router_fixed_t = self.router_fixed.detach().t()  # for addmm
        self.fixed_down = frozen(fixed_down)
        self.shared_down = self.fixed_down.detach()[0] if self.spec.num_shared == 1 else None  # [H, I]
        self.always = always_index(self.spec, router.device)
        self.shared_mlp = shared_mlp
        self.shared_mlp_gate = None if shared_mlp_gate is None else frozen(shared_mlp_gate)  # [1, H]
        self.store = store

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.router)  # [T, E]

    def forward(
        self, x: torch.Tensor, logits: torch.Tensor | None = None, allowed: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x [T, H] (normed); allowed [T, E] / [1, E] bool or None (full routing) -> [T, H]."""
        if logits is None:
            logits = self.router_logits(x)
        routes = route(logits, self.spec, allowed)
        return self.finish(x, routes, self.routed(x, routes))

    def finish(self, x: torch.Tensor, routes: Routes, out: torch.Tensor) -> torch.Tensor:
        """Add the fixed and shared experts to ``out`` (float32 [T, H], the routed sum)."""
        for f in range(self.fixed_gate_up.shape[0]):
            y = expert_forward(x, self.fixed_gate_up[f], self.fixed_down[f])
            out += y.float() * routes.fixed_weights[:, f, None]
        if self.shared_mlp is not None:
            assert self.shared_mlp_gate is not None, "shared_mlp without shared_mlp_gate"
            gate = torch.sigmoid(F.linear(x, self.shared_mlp_gate))  # [T, 1]
            out += (gate * self.shared_mlp(x)).float()
        return out.to(x.dtype)

    def decode_step(
        self, x: torch.Tensor, table: torch.Tensor, bias: torch.Tensor, gate_up: torch.Tensor,
        down: torch.Tensor,
    ) -> torch.Tensor:
        """``forward`` for a decode step over experts already on the device, with no host reads
        and no store calls: each row's k experts are read at ``slab[table[row, id]]``.

        x [B, H] (normed); table [B, >= E] int32: the slab slot of each expert id for this row
        (-1 outside its pool); bias [B, >= E + F*2I] in x's dtype: the pool as an additive
        router bias (0 / -inf), 0 over the fixed experts' columns; gate_up, down: this layer's slab.
        """
        spec, B = self.spec, x.shape[0]
        E, S, k = spec.num_experts, spec.num_shared, spec.num_routed
        width = self.router_fixed.shape[0]
        if bias.shape[1] != width:
            bias = bias[:, :width]
        fused = torch.addmm(bias, x, self.router_fixed_t)  # [B, E + F*2I]: masked logits, fixed h
        if S > 0:
            routable, shared, fixed_h = fused.split_with_sizes([E - S, S, width - E], dim=1)
            weights, ids = torch.topk(torch.softmax(as_float(routable), dim=-1), k, dim=-1)  # [B, k]
            fixed_weights = None if S == 1 else torch.softmax(as_float(shared), dim=-1)  # [B, S]
        else:
            logits, fixed_h = fused.split_with_sizes([E, width - E], dim=1)
            routes = pick_routes(as_float(logits), spec, self.always)
            weights, ids, fixed_weights = routes.weights, routes.ids, routes.fixed_weights
        slots = table.gather(1, ids).view(-1)  # [B*k]
        # index_select: several times faster than advanced indexing for whole-expert rows
        gate_up = gate_up.index_select(0, slots)  # [B*k, 2I, H]
        down = down.index_select(0, slots)  # [B*k, H, I]
        if B == 1:  # the shape is static: no per-row pairing to keep
            gate, up = torch.einsum("kih,bh->bki", gate_up, x).chunk(2, dim=-1)  # [1, k, I] each
            y = torch.einsum("khi,bki->bkh", down, F.silu(gate) * up)  # [1, k, H]
        else:
            h = torch.einsum("bkih,bh->bki", gate_up.view(B, k, *gate_up.shape[1:]), x)
            gate, up = h.chunk(2, dim=-1)
            y = torch.einsum("bkhi,bki->bkh", down.view(B, k, *down.shape[1:]), F.silu(gate) * up)
        out = torch.einsum("bkh,bk->bh", as_float(y), weights)  # float32 [B, H]
        n_fixed = self.fixed_down.shape[0]
        if self.shared_down is not None:  # one shared expert: its weight softmax([logit]) is exactly 1
            gate_f, up_f = fixed_h.chunk(2, dim=-1)  # [B, I] each
            out = out + as_float(F.linear(F.silu(gate_f) * up_f, self.shared_down))
        elif n_fixed:
            gate_f, up_f = fixed_h.view(B, n_fixed, -1).chunk(2, dim=-1)  # [B, F, I] each
            y_f = torch.einsum("fhi,bfi->bfh", self.fixed_down, F.silu(gate_f) * up_f)
            assert fixed_weights is not None
            out = out + torch.einsum("bfh,bf->bh", as_float(y_f), fixed_weights)
        if self.shared_mlp is not None:
            assert self.shared_mlp_gate is not None, "shared_mlp without shared_mlp_gate"
            out = out + as_float(torch.sigmoid(F.linear(x, self.shared_mlp_gate)) * self.shared_mlp(x))
        return out if x.dtype == torch.float32 else out.to(x.dtype)

    def routed(self, x: torch.Tensor, routes: Routes) -> torch.Tensor:
        """Sum over each token's chosen routable experts, looping only over distinct experts."""
        out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
        plan = self.plan(routes)
        self.run_experts(x, plan, out, 0, len(plan.expert_ids))
        return out

    def plan(self, routes: Routes) -> ExpertPlan:
        """Group the T*k picks of ``routes`` by expert (the one device->host sync of a layer step)."""
        T, k = routes.ids.shape
        flat = routes.ids.reshape(-1)
        order = torch.argsort(flat, stable=True)  # group the T*k picks by expert
        experts, counts = torch.unique_consecutive(flat[order], return_counts=True)
        host = torch.cat([experts, counts]).tolist()
        n_experts = len(host) // 2
        return ExpertPlan(T, host[:n_experts], list(itertools.accumulate(host[n_experts:], initial=0)),
                          order // k, routes.weights.reshape(-1)[order])

    def run_experts(
        self, x: torch.Tensor, plan: ExpertPlan, out: torch.Tensor, first: int, stop: int
    ) -> None:
        """Add experts ``plan.expert_ids[first:stop]`` to ``out`` (float32 [T, H]). Any split of
        the experts into calls gives the same sums: each expert sees the same rows, and every
        token's contributions are added in expert order."""
        T, expert_ids, starts = plan.num_tokens, plan.expert_ids, plan.starts
        token_of, weight_of = plan.token_of, plan.weight_of
        slab = self.store.slab(self.layer)
        gate_up, down = slab["gate_up"], slab["down"]  # [slots, 2I, H], [slots, H, I]
        i = first
        while i < stop:
            keys, slots = self._acquire_group(expert_ids[i:stop])
            n = len(keys)
            try:
                for j, slot in enumerate(slots):
                    lo, hi = starts[i + j], starts[i + j + 1]
                    if hi - lo == T:  # every token (e.g. batch-1 decode): rows are 0..T-1 in order
                        y = expert_forward(x, gate_up[slot], down[slot])
                        out.add_(y.float() * weight_of[lo:hi, None])  # same sums as index_add_
                        continue
                    rows = token_of[lo:hi]
                    y = expert_forward(x.index_select(0, rows), gate_up[slot], down[slot])
                    out.index_add_(0, rows, y.float() * weight_of[lo:hi, None])
            finally:
                self.store.release(keys)
            i += n

    def _acquire_group(self, expert_ids: list[int]) -> tuple[list[tuple[int, int]], list[int]]:
        """Pin as many of ``expert_ids`` (in order) as fit: all of them when they fit (pinned
        pool experts need no free slot), else a group of ``free_slots`` (at least one; a failure
        then propagates as SlotsExhausted). ``acquire`` pins nothing when it raises."""
        keys = [(self.layer, e) for e in expert_ids]
        try:
            return keys, self.store.acquire_slots(keys)
        except SlotsExhausted:
            keys = keys[: max(1, self.store.free_slots(self.layer))]
            return keys, self.store.acquire_slots(keys)

"""Per-token routing of one MoE layer (docs/emo.md, "Routing of one token").

Three modes, chosen by the config:
- shared experts (S > 0, the last S ids): softmax over the first E-S logits, top K-S without
  renormalisation; the shared experts weigh softmax(last S logits).
- always-active experts A: softmax over all E logits, top K-|A| outside A; A weigh their p.
- plain: softmax, top K, renormalised when norm_topk_prob.
A pool restricts the routable experts: logits outside the allowed set become -inf before the
softmax. Fixed (shared / always-active) experts are never masked.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from server.model.config import ModelConfig


@dataclass(frozen=True)
class LayerRouting:
    num_experts: int
    num_shared: int
    always_active: tuple[int, ...]
    routable: tuple[int, ...]
    fixed: tuple[int, ...]  # shared then always-active ids, the order of fixed weights
    num_routed: int  # routable experts picked per token
    norm_topk_prob: bool

    @classmethod
    def from_config(cls, config: ModelConfig, layer: int) -> LayerRouting:
        return cls(
            num_experts=config.num_experts[layer],
            num_shared=config.num_shared_experts[layer],
            always_active=tuple(sorted(config.always_active_experts[layer])),
            routable=tuple(config.routable_experts(layer)),
            fixed=tuple(config.fixed_experts(layer)),
            num_routed=config.num_routed(layer),
            norm_topk_prob=config.norm_topk_prob,
        )


@dataclass
class Routes:
    ids: torch.Tensor  # [T, k] routable expert ids chosen per token
    weights: torch.Tensor  # [T, k] float32
    fixed_weights: torch.Tensor  # [T, F] float32, F = len(LayerRouting.fixed)


def route(logits: torch.Tensor, spec: LayerRouting, allowed: torch.Tensor | None) -> Routes:
    """logits [T, E] (any float dtype); allowed [T, E] or [1, E] bool (True = routable expert
    allowed) or None for full routing."""
    logits = logits.float()
    masked = logits
    if allowed is not None:
        keep = allowed[:, : spec.num_experts] | fixed_columns(spec, logits.device)  # fixed: never masked
        masked = logits.masked_fill(~keep, float("-inf"))
    return pick_routes(masked, spec, always_index(spec, logits.device))


def pick_routes(masked: torch.Tensor, spec: LayerRouting, always: torch.Tensor | None) -> Routes:
    """Routes from float32 logits [T, E] the pool was already applied to (-inf = not allowed;
    fixed experts unmasked). ``always``: ``spec.always_active`` as int64 on the logits' device."""
    E, S, k = spec.num_experts, spec.num_shared, spec.num_routed
    if S > 0:
        _, weights, ids, shared_weights = shared_expert_routes(masked[:, : E - S], masked[:, E - S:], k)
        return Routes(ids, weights, shared_weights)
    if spec.always_active:
        assert always is not None, "always-active routing needs the index of those experts"
        p = torch.softmax(masked, dim=-1)  # [T, E]
        weights, ids = torch.topk(p.index_fill(1, always, -1.0), k, dim=-1)
        return Routes(ids, weights, p.index_select(1, always))
    weights, ids = torch.topk(torch.softmax(masked, dim=-1), k, dim=-1)
    if spec.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return Routes(ids, weights, masked.new_zeros(masked.shape[0], 0))


def shared_expert_routes(
    routable: torch.Tensor, shared: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """EMO's routing with shared experts, from float32 logits the pool was already applied to:
    routable [T, R] (-inf outside the pool), shared [T, S].

    Returns probs [T, R] (the softmax over the routable experts; the demo trainer's balancing
    loss reads it), weights and ids [T, k] (the top k of probs, not renormalised) and the shared
    experts' weights softmax(shared) [T, S].
    """
    probs = torch.softmax(routable, dim=-1)
    weights, ids = torch.topk(probs, k, dim=-1)
    return probs, weights, ids, torch.softmax(shared, dim=-1)


@lru_cache(maxsize=256)
def fixed_columns(spec: LayerRouting, device: torch.device) -> torch.Tensor:
    """[E] bool, True at the fixed (shared / always-active) ids; made once (read-only)."""
    mask = torch.zeros(spec.num_experts, dtype=torch.bool)
    if spec.fixed:
        mask[list(spec.fixed)] = True
    return mask.to(device)


@lru_cache(maxsize=256)
def always_index(spec: LayerRouting, device: torch.device) -> torch.Tensor | None:
    """``spec.always_active`` as int64 on ``device`` (None when empty); made once (read-only)."""
    return torch.tensor(spec.always_active, device=device) if spec.always_active else None

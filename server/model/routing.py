"""Per-token routing of one MoE layer (emo-model.md, "Routing of one token").

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
    E, S, k = spec.num_experts, spec.num_shared, spec.num_routed
    masked = logits if allowed is None else logits.masked_fill(~allowed[:, :E], float("-inf"))
    if S > 0:
        p_std = torch.softmax(masked[:, : E - S], dim=-1)  # [T, E-S]
        weights, ids = torch.topk(p_std, k, dim=-1)
        fixed_weights = torch.softmax(logits[:, E - S:], dim=-1)  # [T, S]
        return Routes(ids, weights, fixed_weights)
    if spec.always_active:
        always = torch.tensor(spec.always_active, device=logits.device)
        if allowed is not None:  # never mask the always-active experts
            masked = masked.index_copy(1, always, logits.index_select(1, always))
        p = torch.softmax(masked, dim=-1)  # [T, E]
        weights, ids = torch.topk(p.index_fill(1, always, -1.0), k, dim=-1)
        return Routes(ids, weights, p.index_select(1, always))
    p = torch.softmax(masked, dim=-1)
    weights, ids = torch.topk(p, k, dim=-1)
    if spec.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return Routes(ids, weights, logits.new_zeros(logits.shape[0], 0))

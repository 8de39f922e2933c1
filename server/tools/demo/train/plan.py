"""How one forward routes: segments (documents) of a packed batch and their pool rules."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class RoutePlan:
    """positions [B, T]; seg [N=B*T] global document id; valid [N] (False = padding).

    pool_sizes [L, S] per layer and document (None = full per-token routing); score_mask [N]
    marks the tokens whose probabilities choose the pool (None = every token of the document);
    fixed_pools: per layer [S, R] bool pools given from outside (random-pool evaluation).
    chosen_pools collects the [S, R] pools each MoE layer chose, in layer order.
    """

    positions: torch.Tensor
    seg: torch.Tensor
    num_segments: int
    valid: torch.Tensor
    pool_sizes: torch.Tensor | None = None
    score_mask: torch.Tensor | None = None
    fixed_pools: list[torch.Tensor] | None = None
    chosen_pools: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def from_segments(cls, segments: torch.Tensor, valid: torch.Tensor) -> RoutePlan:
        """segments [B, T]: a row-local document id per token, constant over each document."""
        B, T = segments.shape
        starts = torch.ones_like(segments, dtype=torch.bool)
        starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
        index = torch.arange(T, device=segments.device).expand(B, T)
        start_of = torch.cummax(torch.where(starts, index, torch.zeros_like(index)), dim=1).values
        row_unique = segments + torch.arange(B, device=segments.device)[:, None] * (int(segments.max()) + 1)
        _, seg = torch.unique(row_unique.reshape(-1), return_inverse=True)
        return cls(
            positions=index - start_of, seg=seg, num_segments=int(seg.max()) + 1, valid=valid.reshape(-1)
        )

    def with_random_pool_sizes(
        self, num_layers: int, low: int, high: int, generator: torch.Generator
    ) -> RoutePlan:
        """EMO training: for every document at every MoE layer, P uniform in [low, high]."""
        sizes = torch.randint(low, high + 1, (num_layers, self.num_segments), generator=generator)
        self.pool_sizes = sizes.to(self.seg.device)
        return self

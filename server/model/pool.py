"""Document-level expert pools (docs/emo.md, "Routing with a per-request pool").

score(e) = sum over the prompt tokens of softmax(logits[R])[e]; the pool is the P routable
experts with the largest score, ties broken towards the lower id.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from server.model.routing import LayerRouting


@lru_cache(maxsize=256)
def routable_index(spec: LayerRouting, device: torch.device) -> torch.Tensor:
    """``spec.routable`` as an int64 tensor on ``device``, made once (read-only: never write it)."""
    return torch.tensor(spec.routable, device=device)


def pool_scores(logits: torch.Tensor, spec: LayerRouting) -> torch.Tensor:
    """logits [T, E] -> scores [|R|] (float32), in the order of ``spec.routable``."""
    routable = routable_index(spec, logits.device)
    return torch.softmax(logits.float().index_select(1, routable), dim=-1).sum(dim=0)


def select_pool(scores: torch.Tensor, spec: LayerRouting, pool_size: int) -> torch.Tensor:
    """The pool: sorted expert ids [P] (int64, on the scores' device)."""
    if not spec.num_routed <= pool_size <= len(spec.routable):
        raise ValueError(
            f"pool size {pool_size} out of range [{spec.num_routed}, {len(spec.routable)}]"
        )
    # stable sort keeps the lower index (= lower expert id) first among equal scores
    order = torch.sort(scores, descending=True, stable=True).indices[:pool_size]
    routable = routable_index(spec, scores.device)
    return routable[order].sort().values


def pool_mask(pool: torch.Tensor | None, spec: LayerRouting, width: int) -> torch.Tensor:
    """[width] bool: True for allowed routable experts of the pool and for every non-routable
    (fixed) id; all True for full routing (pool None) and for dense layers (spec None)."""
    if pool is None:
        return torch.ones(width, dtype=torch.bool)
    mask = torch.ones(width, dtype=torch.bool, device=pool.device)
    mask[routable_index(spec, pool.device)] = False
    mask[pool] = True
    return mask

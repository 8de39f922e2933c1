"""EMO's document-level routing for training, vectorised over all documents of a batch.

Tokens of a batch are flattened to N rows; `seg` [N] gives each token's document (segment) id.
For every document a pool of P routable experts is chosen from the softmax probabilities summed
over the document's scoring tokens (all of them in training; the first tokens at evaluation);
routable logits outside the pool are -inf for that document's tokens before softmax and top-k.
"""

from __future__ import annotations

import torch

from server.model.routing import shared_expert_routes


def segment_pools(
    probs: torch.Tensor,
    seg: torch.Tensor,
    num_segments: int,
    pool_sizes: torch.Tensor,
    score_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The pool of every segment as a mask.

    probs [N, R] full softmax over the routable experts; seg [N] int64 in [0, num_segments);
    pool_sizes [num_segments] int64; score_mask [N] bool (tokens that vote) or None (all vote).
    Returns [num_segments, R] bool. Ties go to the lower expert id (stable sort).
    """
    votes = probs.detach().float()
    if score_mask is not None:
        votes = votes * score_mask[:, None].to(votes.dtype)
    scores = votes.new_zeros(num_segments, probs.shape[1]).index_add_(0, seg, votes)  # [S, R]
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices  # [S, R]
    ranks = torch.empty_like(order).scatter_(
        1, order, torch.arange(probs.shape[1], device=probs.device).expand_as(order).contiguous()
    )
    return ranks < pool_sizes[:, None]


def route_tokens(
    logits: torch.Tensor, num_shared: int, num_routed: int, allowed: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token routing (docs/emo.md, "Routing of one token"): the shared experts are the last
    `num_shared` ids.

    logits [N, E]; allowed [N, R] bool or None (full routing).
    Returns ids [N, k] routable ids, weights [N, k] (masked-softmax probabilities, not
    renormalised), probs [N, R] the masked softmax, shared_weights [N, S].
    """
    logits = logits.float()
    R = logits.shape[1] - num_shared
    routable = logits[:, :R]  # [N, R]
    if allowed is not None:
        routable = routable.masked_fill(~allowed, float("-inf"))
    probs, weights, ids, shared_weights = shared_expert_routes(routable, logits[:, R:], num_routed)
    return ids, weights, probs, shared_weights


def load_balancing_loss(probs: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Switch-style loss over the whole batch: R * sum_e f_e * P_e, 1.0 when perfectly balanced.

    f_e: share of the batch's (token, slot) assignments going to e (no gradient); P_e: mean
    routing probability of e over valid tokens. Balancing the batch, not each document, leaves
    documents free to concentrate on their own experts.
    """
    R = probs.shape[1]
    kept_ids = ids[valid]  # [n, k]
    counts = torch.bincount(kept_ids.reshape(-1), minlength=R).float()
    share = counts / counts.sum().clamp(min=1.0)
    mean_prob = probs[valid].mean(dim=0)
    return R * (share * mean_prob).sum()

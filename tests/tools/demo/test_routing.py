"""Training-time document pools equal a straightforward per-document implementation."""

from __future__ import annotations

import torch

from server.tools.demo.train.model import MoE
from server.tools.demo.train.plan import RoutePlan
from server.tools.demo.train.routing import load_balancing_loss, route_tokens, segment_pools
from server.tools.demo.train.run import PRESETS


def naive_pools(probs: torch.Tensor, seg: list[int], sizes: list[int], voters: list[bool]) -> torch.Tensor:
    """One document at a time: sum the votes, sort by (score desc, id asc), keep the first P."""
    R = probs.shape[1]
    out = torch.zeros(len(sizes), R, dtype=torch.bool)
    for doc, size in enumerate(sizes):
        score = [0.0] * R
        for token, s in enumerate(seg):
            if s == doc and voters[token]:
                for e in range(R):
                    score[e] += float(probs[token, e])
        for e in sorted(range(R), key=lambda e: (-score[e], e))[:size]:
            out[doc, e] = True
    return out


def test_segment_pools_match_the_naive_loop() -> None:
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        N, R, S = 40, 12, 5
        probs = torch.softmax(torch.randn(N, R, generator=g) * 3, dim=-1)
        seg = torch.sort(torch.randint(0, S, (N,), generator=g)).values
        sizes = torch.randint(1, R + 1, (S,), generator=g)
        voters = torch.rand(N, generator=g) < 0.6 if trial % 2 else torch.ones(N, dtype=torch.bool)
        got = segment_pools(probs, seg, S, sizes, voters)
        assert torch.equal(got, naive_pools(probs, seg.tolist(), sizes.tolist(), voters.tolist()))
        assert torch.equal(got.sum(dim=1), sizes)


def test_ties_go_to_the_lower_expert_id() -> None:
    probs = torch.full((4, 6), 1 / 6)
    pools = segment_pools(probs, torch.zeros(4, dtype=torch.long), 1, torch.tensor([3]))
    assert pools[0].nonzero().flatten().tolist() == [0, 1, 2]


def test_route_tokens_masks_before_softmax_and_topk() -> None:
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0, 9.0]])  # last = shared expert
    allowed = torch.tensor([[False, True, True, True]])
    ids, weights, probs, shared = route_tokens(logits, 1, 2, allowed)
    assert ids.tolist() == [[1, 2]]
    expected = torch.softmax(torch.tensor([4.0, 3.0, 2.0]), dim=0)
    assert torch.allclose(weights[0], expected[:2]) and probs[0, 0] == 0
    assert shared.tolist() == [[1.0]]


def test_moe_routes_each_token_inside_its_documents_pool() -> None:
    torch.manual_seed(0)
    c = PRESETS["smoke"]  # 8 routable experts and a shared one, 2 routed per token
    moe = MoE(c)
    torch.nn.init.normal_(moe.gate.weight)
    torch.nn.init.normal_(moe.gate_up, std=0.1)
    torch.nn.init.normal_(moe.down, std=0.1)
    segments = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])
    plan = RoutePlan.from_segments(segments, torch.ones_like(segments, dtype=torch.bool))
    plan.pool_sizes = torch.tensor([[3, 2, 4]])
    x = torch.randn(24, c.hidden_size)
    moe(x, plan, 0)
    pools = plan.chosen_pools[0]
    logits = moe.gate(x)
    full = torch.softmax(logits[:, :8], dim=-1).detach()
    assert torch.equal(pools, naive_pools(full, plan.seg.tolist(), [3, 2, 4], [True] * 24))
    ids, _, _, _ = route_tokens(logits, 1, 2, pools[plan.seg])
    for token in range(24):
        assert all(pools[plan.seg[token], e] for e in ids[token].tolist())


def test_load_balancing_loss_is_one_when_balanced_and_larger_when_not() -> None:
    R = 4
    probs = torch.full((8, R), 1 / R)
    ids = torch.arange(8).remainder(R)[:, None]
    valid = torch.ones(8, dtype=torch.bool)
    assert torch.isclose(load_balancing_loss(probs, ids, valid), torch.tensor(1.0))
    skewed = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).expand(8, R)
    assert load_balancing_loss(skewed, torch.zeros(8, 1, dtype=torch.long), valid) > 2.0


def test_positions_restart_at_every_document() -> None:
    segments = torch.tensor([[0, 0, 0, 1, 1, 2], [0, 0, 0, 0, 1, 1]])
    plan = RoutePlan.from_segments(segments, torch.ones_like(segments, dtype=torch.bool))
    assert plan.positions.tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]]
    assert plan.num_segments == 5 and plan.seg.tolist() == [0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 4, 4]

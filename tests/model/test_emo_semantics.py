"""EMO routing and pool semantics against the plain reference in tests/model/reference.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from server.model.kv_cache import KVCache
from server.model.loader import LoadedModel, load_model
from tests.model.checkpoints import write_emo
from tests.model.reference import EmoReference

VARIANTS: dict[str, dict[str, Any]] = {
    "one_shared": {},
    "two_shared": {"num_shared_experts": 2, "num_experts_per_tok": 5},
    "always_active": {"num_shared_experts": 0, "always_active_experts": [0, 3]},
    "plain_norm_topk": {"num_shared_experts": 0, "norm_topk_prob": True},
    "dense_layer_biases": {"num_experts_per_layer": [10, 0, 10], "dense_intermediate_size": 20,
                           "dense_mlp_bias": True, "attention_bias": True},
    "per_layer_mix": {"num_experts_per_layer": [9, 10, 12], "num_shared_experts_per_layer": [1, 0, 2],
                      "always_active_experts_per_layer": [[], [2], []], "num_experts_per_tok": 5},
}
PROMPT = [1, 7, 23, 40, 9, 81, 15, 33, 60, 12, 5]
CONTINUATION = [90, 91, 92, 93, 94, 95, 90, 91, 92, 93]


def build(tmp_path: Path, variant: str) -> tuple[LoadedModel, EmoReference]:
    write_emo(tmp_path, seed=3, **VARIANTS[variant])
    return load_model(tmp_path, device="cpu", dtype=torch.float32), EmoReference(tmp_path)


def fresh_kv(loaded: LoadedModel) -> KVCache:
    return KVCache(loaded.config, num_slots=2, max_len=48, device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_full_routing_and_pools_match_reference(variant: str, tmp_path: Path) -> None:
    loaded, ref = build(tmp_path, variant)
    model, ids = loaded.model, torch.tensor(PROMPT)
    full = model.prefill(ids, fresh_kv(loaded), 0, pool_size=None, all_logits=True)
    expected, _ = ref.forward(PROMPT)
    torch.testing.assert_close(full.logits, expected, atol=1e-4, rtol=0)

    low, high = loaded.config.pool_bounds()
    for size in sorted({low, loaded.config.default_pool_size() or low, high - 1}):
        pooled = model.prefill(ids, fresh_kv(loaded), 1, pool_size=size, all_logits=True)
        expected, ref_pools = ref.forward(PROMPT, pool_size=size)
        assert pooled.pools is not None
        assert [None if p is None else p.tolist() for p in pooled.pools] == ref_pools
        torch.testing.assert_close(pooled.logits, expected, atol=1e-4, rtol=0)

    if len({len(loaded.config.routable_experts(layer)) for layer in loaded.config.moe_layers}) == 1:
        everything = model.prefill(ids, fresh_kv(loaded), 1, pool_size=high, all_logits=True)
        assert torch.equal(everything.logits, full.logits)  # P = |R| is exactly full routing


@pytest.mark.parametrize("variant", ["one_shared", "always_active", "dense_layer_biases"])
def test_pool_stays_fixed_while_decoding(variant: str, tmp_path: Path) -> None:
    loaded, ref = build(tmp_path, variant)
    model, kv, size = loaded.model, fresh_kv(loaded), sum(loaded.config.pool_bounds()) // 2
    out = model.prefill(torch.tensor(PROMPT), kv, 1, pool_size=size)
    row = model.pool_mask_row(out.pools)
    ids = list(PROMPT)
    for token in CONTINUATION:  # forced tokens unlike the prompt, so a re-selected pool would move
        ids.append(token)
        logits = model.decode(torch.tensor([token]), torch.tensor([len(ids) - 1]), kv,
                              torch.tensor([1]), row[None])
        expected, pools = ref.forward(ids, pool_size=size, prompt_len=len(PROMPT))
        torch.testing.assert_close(logits[0], expected[-1], atol=1e-4, rtol=0)
        assert pools == [None if p is None else p.tolist() for p in out.pools]
    assert ref.forward(ids, pool_size=size)[1] != pools, "test data too weak: the pool never moves"


def test_pool_size_is_validated(tmp_path: Path) -> None:
    loaded, _ = build(tmp_path, "one_shared")
    config = loaded.config
    assert config.pool_bounds() == (3, 9)  # K - S = 3 .. |R| = 9
    assert config.default_pool_size() == 3  # ceil(9 / 4) = 3
    assert config.routable_experts(0) == list(range(9))
    for bad in (2, 10, 0):
        with pytest.raises(ValueError, match=r"\[3, 9\]"):
            loaded.model.prefill(torch.tensor(PROMPT), fresh_kv(loaded), 0, pool_size=bad)

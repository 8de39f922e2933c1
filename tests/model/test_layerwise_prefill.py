"""The layer-range prefill (attend, then the MLP in expert groups, with anything in between)
gives exactly the one-shot prefill's logits, pools and KV cache, however the work is split."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from server.model.kv_cache import KVCache
from server.model.loader import load_model
from server.tools.synth import write_checkpoint
from tests.model.checkpoints import write_emo
from tests.model.test_emo_semantics import VARIANTS

PROMPT = [1, 7, 23, 40, 9, 81, 15, 33, 60, 12, 5, 70, 71, 72, 3, 3, 3, 8]


def kv_for(config: object) -> KVCache:
    return KVCache(config, num_slots=2, max_len=640, device="cpu", dtype=torch.float32)  # type: ignore[arg-type]


@pytest.mark.parametrize("variant", ["one_shared", "always_active", "dense_layer_biases", "per_layer_mix"])
@pytest.mark.parametrize("max_rows", [1, 5, 10_000])
def test_any_split_equals_the_one_shot_prefill(variant: str, max_rows: int, tmp_path: Path) -> None:
    write_emo(tmp_path, seed=3, **VARIANTS[variant])
    model = load_model(tmp_path, device="cpu", dtype=torch.float32).model
    ids = torch.tensor(PROMPT)
    for pool in (None, 5):
        one_kv, kv = kv_for(model.config), kv_for(model.config)
        whole = model.prefill(ids, one_kv, 1, pool_size=pool, all_logits=True)
        state = model.prefill_start(ids, kv, 1, pool_size=pool, all_logits=True)
        pieces = 0
        while not state.done:
            keys = model.prefill_attend(state)
            assert all(k[0] == state.layer for k in keys) and (pool is not None or keys == [])
            while state.attended:
                assert model.prefill_mlp(state, max_rows) > 0
                pieces += 1
        assert torch.equal(model.prefill_logits(state), whole.logits)
        assert whole.pools is None if pool is None else whole.pools is not None
        if pool is not None:
            assert state.pools is not None and whole.pools is not None
            assert all(a is b is None or (a is not None and b is not None and torch.equal(a, b))
                       for a, b in zip(state.pools, whole.pools, strict=True))
        for layer in range(model.config.num_layers):
            assert torch.equal(kv.k[layer], one_kv.k[layer]) and torch.equal(kv.v[layer], one_kv.v[layer])
        if max_rows == 1:
            assert pieces > model.config.num_layers  # the MoE layers really were split


def test_a_long_prompt_in_small_pieces_is_bit_identical(tiny_emo_checkpoint: Path) -> None:
    """600 tokens through the synthetic tiny EMO in pieces of at most one expert each."""
    model = load_model(tiny_emo_checkpoint, device="cpu", dtype="fp32").model
    ids = torch.randint(0, model.config.vocab_size, (600,), generator=torch.Generator().manual_seed(0))
    whole = model.prefill(ids, kv_for(model.config), 0, pool_size=8, all_logits=True)
    state = model.prefill_start(ids, kv_for(model.config), 0, pool_size=8, all_logits=True)
    while not state.done:
        model.prefill_attend(state)
        while state.attended:
            model.prefill_mlp(state, 1)
    assert torch.equal(model.prefill_logits(state), whole.logits)


def test_misuse_is_refused(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, "tiny", seed=0, dtype="fp32")
    model = load_model(tmp_path, device="cpu", dtype="fp32").model
    state = model.prefill_start(torch.tensor(PROMPT), kv_for(model.config), 0, pool_size=8)
    with pytest.raises(RuntimeError, match="has not been attended"):
        model.prefill_mlp(state, 10)
    with pytest.raises(RuntimeError, match="is next"):
        model.prefill_logits(state)
    model.prefill_attend(state)
    with pytest.raises(RuntimeError, match="already attended"):
        model.prefill_attend(state)

"""Our decoder against transformers' own implementations of OLMoE, Mixtral, Qwen3-MoE and
Qwen2-MoE: tiny random models saved with save_pretrained, full-prompt logits within 1e-4
(fp32, full routing) and 32 greedy tokens identical (our prefill + decode over a KV cache)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from server.model.kv_cache import KVCache
from server.model.loader import load_model
from tests.model.checkpoints import write_tokenizer
from tests.optional import require_module

transformers = require_module("transformers", "pip install 'emo-serve[test]'")

COMMON: dict[str, Any] = dict(vocab_size=64, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                              intermediate_size=24, max_position_embeddings=128, rms_norm_eps=1e-6,
                              tie_word_embeddings=False)
CASES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(
        num_hidden_layers=2, num_experts=8, num_experts_per_tok=3, norm_topk_prob=False, clip_qkv=3.0,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        num_hidden_layers=3, num_local_experts=6, num_experts_per_tok=2,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 16})),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        num_hidden_layers=3, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=12,
        head_dim=16, norm_topk_prob=True, mlp_only_layers=[0], attention_bias=True,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 32})),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        num_hidden_layers=3, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=12,
        shared_expert_intermediate_size=20, decoder_sparse_step=2, norm_topk_prob=False)),
}


def make_hf(family: str, directory: Path) -> Any:
    config_name, model_name, extra = CASES[family]
    config = getattr(transformers, config_name)(**COMMON, **extra)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # routers start at zero: randomise everything
            scale = 1.0 if name.endswith("gate.weight") or "embed" in name else 0.15
            p.copy_(torch.randn_like(p) * scale + (1.0 if "norm" in name else 0.0))
    model.save_pretrained(directory, safe_serialization=True)
    write_tokenizer(directory, COMMON["vocab_size"])
    return model


@pytest.mark.parametrize("family", list(CASES))
def test_logits_and_greedy_match_transformers(family: str, tmp_path: Path) -> None:
    hf = make_hf(family, tmp_path)
    loaded = load_model(tmp_path, device="cpu", dtype=torch.float32)
    assert loaded.config.family == family
    model = loaded.model
    prompt = torch.tensor([5, 17, 9, 33, 2, 40, 11, 7, 60, 21])
    kv = KVCache(loaded.config, num_slots=2, max_len=64, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        expected = hf(prompt[None]).logits[0].float()
    ours = model.prefill(prompt, kv, 1, pool_size=None, all_logits=True)
    assert ours.pools is None and ours.pinned == []
    torch.testing.assert_close(ours.logits, expected, atol=1e-4, rtol=0)

    # greedy: transformers re-runs the whole sequence each step, we decode over the KV cache
    theirs = prompt.tolist()
    with torch.no_grad():
        for _ in range(32):
            theirs.append(int(hf(torch.tensor([theirs])).logits[0, -1].argmax()))
    mine = prompt.tolist()
    next_id = int(ours.logits[-1].argmax())
    for _ in range(32):
        mine.append(next_id)
        logits = model.decode(torch.tensor([next_id]), torch.tensor([len(mine) - 1]), kv,
                              torch.tensor([1]), None)
        next_id = int(logits[0].argmax())
    assert mine == theirs


def test_dense_layers_follow_the_family_pattern(tmp_path: Path) -> None:
    make_hf("qwen2_moe", tmp_path / "q2")
    make_hf("qwen3_moe", tmp_path / "q3")
    assert load_model(tmp_path / "q2").config.num_experts == (0, 8, 0)  # decoder_sparse_step 2
    assert load_model(tmp_path / "q3").config.num_experts == (0, 8, 8)  # mlp_only_layers [0]

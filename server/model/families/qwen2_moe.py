"""Qwen2-MoE (``model_type: qwen2_moe``): q/k/v biases and one sigmoid-gated shared expert MLP
next to the routed experts."""

from __future__ import annotations

from typing import Any

from server.model.config import ModelConfig
from server.model.families._common import get_bool, get_int, with_defaults
from server.model.families.qwen3_moe import qwen_moe_fields

# Qwen2MoeConfig's defaults (transformers 5)
DEFAULTS: dict[str, Any] = {
    "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 24,
    "num_attention_heads": 16, "num_key_value_heads": 16, "hidden_act": "silu",
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "rope_theta": 10000.0, "use_sliding_window": False, "sliding_window": 4096,
    "decoder_sparse_step": 1, "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632,
    "num_experts_per_tok": 4, "num_experts": 60, "norm_topk_prob": False, "qkv_bias": True,
}


def parse(raw: dict[str, Any]) -> ModelConfig:
    raw = with_defaults(raw, DEFAULTS)
    return ModelConfig(
        family="qwen2_moe",
        **qwen_moe_fields(raw),
        qkv_bias=get_bool(raw, "qkv_bias", True),
        shared_mlp_size=get_int(raw, "shared_expert_intermediate_size", 0) or 0,
    )

"""Qwen3-MoE (``model_type: qwen3_moe``): per-head q/k RMSNorm, dense layers by
decoder_sparse_step / mlp_only_layers."""

from __future__ import annotations

from typing import Any

from server.model.config import ModelConfig
from server.model.families._common import common_fields, get_bool, get_int, sparse_layers, with_defaults


def num_experts_field(raw: dict[str, Any]) -> int:
    # transformers 5 writes num_local_experts; released checkpoints say num_experts
    return get_int(raw, "num_experts" if "num_experts" in raw else "num_local_experts")


def qwen_moe_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """What Qwen2-MoE and Qwen3-MoE spell alike, from ``raw`` with its family's defaults: the
    common fields, experts on the layers decoder_sparse_step / mlp_only_layers leave sparse,
    moe_intermediate_size per expert and intermediate_size for the dense layers."""
    base = common_fields(raw)
    E = num_experts_field(raw)
    moe = sparse_layers(raw, base["num_layers"], E)
    return dict(
        base,
        intermediate_size=get_int(raw, "moe_intermediate_size"),
        top_k=get_int(raw, "num_experts_per_tok"),
        num_experts=tuple(E if m else 0 for m in moe),
        norm_topk_prob=get_bool(raw, "norm_topk_prob", False),
        dense_intermediate_size=get_int(raw, "intermediate_size"),
    )


# Qwen3MoeConfig's defaults (transformers 5)
DEFAULTS: dict[str, Any] = {
    "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 24,
    "num_attention_heads": 32, "num_key_value_heads": 4, "hidden_act": "silu",
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "rope_theta": 10000.0, "attention_bias": False, "use_sliding_window": False, "sliding_window": 4096,
    "decoder_sparse_step": 1, "moe_intermediate_size": 768, "num_experts_per_tok": 8,
    "num_local_experts": 128, "norm_topk_prob": False,
}


def parse(raw: dict[str, Any]) -> ModelConfig:
    raw = with_defaults(raw, DEFAULTS)
    fields = qwen_moe_fields(raw)
    attention_bias = get_bool(raw, "attention_bias", False)
    return ModelConfig(
        family="qwen3_moe",
        **fields,
        qkv_bias=attention_bias,
        o_bias=attention_bias,
        qk_norm="head",
    )

"""OLMoE (``model_type: olmoe``): q/k RMSNorm over the whole projection, optional clip_qkv."""

from __future__ import annotations

from typing import Any

from server.model.config import ModelConfig
from server.model.families._common import common_fields, get_bool, get_float, get_int, with_defaults

# OlmoeConfig's defaults (transformers 5)
DEFAULTS: dict[str, Any] = {
    "vocab_size": 50304, "hidden_size": 2048, "intermediate_size": 2048, "num_hidden_layers": 16,
    "num_attention_heads": 16, "hidden_act": "silu", "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5, "eos_token_id": 50279, "tie_word_embeddings": False, "rope_theta": 10000.0,
    "attention_bias": False, "num_experts_per_tok": 8, "num_experts": 64, "norm_topk_prob": False,
}


def parse(raw: dict[str, Any]) -> ModelConfig:
    raw = with_defaults(raw, DEFAULTS)
    base = common_fields(raw)
    attention_bias = get_bool(raw, "attention_bias", False)
    return ModelConfig(
        family="olmoe",
        **base,
        intermediate_size=get_int(raw, "intermediate_size"),
        top_k=get_int(raw, "num_experts_per_tok"),
        num_experts=(get_int(raw, "num_experts"),) * base["num_layers"],
        norm_topk_prob=get_bool(raw, "norm_topk_prob", False),
        qkv_bias=attention_bias,
        o_bias=attention_bias,
        qk_norm="full",
        clip_qkv=get_float(raw, "clip_qkv", None),
    )

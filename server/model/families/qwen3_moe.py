"""Qwen3-MoE (``model_type: qwen3_moe``): per-head q/k RMSNorm, dense layers by
decoder_sparse_step / mlp_only_layers."""

from __future__ import annotations

from typing import Any

from server.model.config import ModelConfig
from server.model.families._common import common_fields, get_bool, get_int, sparse_layers


def num_experts_field(raw: dict[str, Any]) -> int:
    # transformers 5 writes num_local_experts; released checkpoints say num_experts
    return get_int(raw, "num_experts" if "num_experts" in raw else "num_local_experts")


def parse(raw: dict[str, Any]) -> ModelConfig:
    base = common_fields(raw)
    E = num_experts_field(raw)
    moe = sparse_layers(raw, base["num_layers"], E)
    attention_bias = get_bool(raw, "attention_bias", False)
    return ModelConfig(
        family="qwen3_moe",
        **base,
        intermediate_size=get_int(raw, "moe_intermediate_size"),
        top_k=get_int(raw, "num_experts_per_tok"),
        num_experts=tuple(E if m else 0 for m in moe),
        norm_topk_prob=get_bool(raw, "norm_topk_prob", False),
        dense_intermediate_size=get_int(raw, "intermediate_size"),
        qkv_bias=attention_bias,
        o_bias=attention_bias,
        qk_norm="head",
    )

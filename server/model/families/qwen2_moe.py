"""Qwen2-MoE (``model_type: qwen2_moe``): q/k/v biases and one sigmoid-gated shared expert MLP
next to the routed experts."""

from __future__ import annotations

from typing import Any

from server.model.config import ModelConfig
from server.model.families._common import common_fields, get_bool, get_int, sparse_layers
from server.model.families.qwen3_moe import num_experts_field


def parse(raw: dict[str, Any]) -> ModelConfig:
    base = common_fields(raw)
    E = num_experts_field(raw)
    moe = sparse_layers(raw, base["num_layers"], E)
    return ModelConfig(
        family="qwen2_moe",
        **base,
        intermediate_size=get_int(raw, "moe_intermediate_size"),
        top_k=get_int(raw, "num_experts_per_tok"),
        num_experts=tuple(E if m else 0 for m in moe),
        norm_topk_prob=get_bool(raw, "norm_topk_prob", False),
        dense_intermediate_size=get_int(raw, "intermediate_size"),
        qkv_bias=get_bool(raw, "qkv_bias", True),
        shared_mlp_size=get_int(raw, "shared_expert_intermediate_size", 0) or 0,
    )

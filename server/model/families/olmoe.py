"""OLMoE (``model_type: olmoe``): q/k RMSNorm over the whole projection, optional clip_qkv."""

from __future__ import annotations

from typing import Any

from server.model.config import ModelConfig
from server.model.families._common import common_fields, get_bool, get_float, get_int


def parse(raw: dict[str, Any]) -> ModelConfig:
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

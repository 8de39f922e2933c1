"""allenai EMO (``model_type: emo``): shared experts, always-active experts, dense layers."""

from __future__ import annotations

from typing import Any

from server.model.config import ModelConfig, TensorNames
from server.model.families._common import common_fields, get_bool, get_float, get_int, get_int_list

NAMES = TensorNames(attn_norm="pre_attention_layernorm", mlp_norm="pre_feedforward_layernorm")


def parse(raw: dict[str, Any]) -> ModelConfig:
    base = common_fields(raw)
    L = base["num_layers"]
    num_experts = get_int(raw, "num_experts")
    per_layer = get_int_list(raw, "num_experts_per_layer", L) or [num_experts] * L
    shared = get_int(raw, "num_shared_experts", 0)
    shared_per_layer = get_int_list(raw, "num_shared_experts_per_layer", L) or [
        shared if e > 0 else 0 for e in per_layer
    ]
    always_per_layer = raw.get("always_active_experts_per_layer")
    if always_per_layer is not None:
        if not isinstance(always_per_layer, list) or len(always_per_layer) != L or any(
            not isinstance(a, list) or any(isinstance(x, bool) or not isinstance(x, int) for x in a)
            for a in always_per_layer
        ):
            raise ValueError(
                f"config field always_active_experts_per_layer must be {L} lists of integers"
            )
        always = [tuple(a) for a in always_per_layer]
    else:
        ids = tuple(get_int_list(raw, "always_active_experts") or [])
        always = [ids if e > 0 else () for e in per_layer]
    attention_bias = get_bool(raw, "attention_bias", False)
    return ModelConfig(
        family="emo",
        **base,
        intermediate_size=get_int(raw, "intermediate_size"),
        top_k=get_int(raw, "num_experts_per_tok"),
        num_experts=tuple(per_layer),
        num_shared_experts=tuple(shared_per_layer),
        always_active_experts=tuple(always),
        norm_topk_prob=get_bool(raw, "norm_topk_prob", False),
        dense_intermediate_size=get_int(raw, "dense_intermediate_size", 0) or 0,
        dense_mlp_bias=get_bool(raw, "dense_mlp_bias", False),
        qkv_bias=attention_bias,
        o_bias=attention_bias,
        qk_norm="full" if get_bool(raw, "qk_norm", False) else "none",
        clip_qkv=get_float(raw, "clip_qkv", None),
        names=NAMES,
        pool_fraction=0.25,
    )

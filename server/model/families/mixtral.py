"""Mixtral (``model_type: mixtral``): block_sparse_moe, experts w1 (gate) / w3 (up) / w2 (down),
softmax top-k always renormalised."""

from __future__ import annotations

from typing import Any

from server.model.config import ModelConfig, TensorNames
from server.model.families._common import common_fields, get_int

NAMES = TensorNames(mlp="block_sparse_moe", expert_parts=("w1", "w3", "w2"))


def parse(raw: dict[str, Any]) -> ModelConfig:
    base = common_fields(raw)
    return ModelConfig(
        family="mixtral",
        **base,
        intermediate_size=get_int(raw, "intermediate_size"),
        top_k=get_int(raw, "num_experts_per_tok"),
        num_experts=(get_int(raw, "num_local_experts"),) * base["num_layers"],
        norm_topk_prob=True,
        names=NAMES,
    )

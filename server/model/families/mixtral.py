"""Mixtral (``model_type: mixtral``): block_sparse_moe, experts w1 (gate) / w3 (up) / w2 (down),
softmax top-k always renormalised."""

from __future__ import annotations

from typing import Any

from server.model.config import ModelConfig, TensorNames
from server.model.families._common import common_fields, get_int, with_defaults

NAMES = TensorNames(mlp="block_sparse_moe", expert_parts=("w1", "w3", "w2"))


# MixtralConfig's defaults (transformers 5)
DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_act": "silu",
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2,
    "tie_word_embeddings": False, "rope_theta": 1000000.0, "num_experts_per_tok": 2,
    "num_local_experts": 8,
}


def parse(raw: dict[str, Any]) -> ModelConfig:
    raw = with_defaults(raw, DEFAULTS)
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

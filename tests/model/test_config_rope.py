"""Config parsing (families, old and new rope fields) and rotary embeddings against
transformers' own rope implementation for every supported scaling type."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from server.model.config import ModelConfig
from server.model.families import FAMILIES
from server.model.families._common import parse_rope
from server.model.rope import RotaryEmbedding
from tests.model.checkpoints import EMO_BASE
from tests.optional import require_module

MAX_POS = 64
ROPES: dict[str, dict[str, Any]] = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
             "original_max_position_embeddings": 16},
    "yarn_mscale": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 0.7,
                    "mscale_all_dim": 0.5, "beta_fast": 16, "original_max_position_embeddings": 16},
}


@pytest.fixture(scope="module")
def llama() -> Any:
    """transformers' Llama modelling module: only the comparisons need transformers."""
    return require_module("transformers.models.llama.modeling_llama", "pip install 'emo-serve[test]'")


@pytest.mark.parametrize("name", list(ROPES))
def test_rope_matches_transformers(llama: Any, name: str) -> None:
    hf_config = llama.LlamaConfig(hidden_size=64, num_attention_heads=4,
                                         max_position_embeddings=MAX_POS, rope_parameters=dict(ROPES[name]))
    raw = hf_config.to_dict()
    ours = RotaryEmbedding(parse_rope(raw, MAX_POS), head_dim=16, max_position_embeddings=MAX_POS)
    theirs = llama.LlamaRotaryEmbedding(hf_config)
    for length in (10, 100):  # 100 > max_position_embeddings: dynamic scaling kicks in
        positions = torch.arange(length)
        cos, sin = theirs(torch.zeros(1, dtype=torch.float32), positions[None])
        my_cos, my_sin = ours(positions, torch.full_like(positions, length), torch.float32)
        torch.testing.assert_close(my_cos, cos[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(my_sin, sin[0], atol=1e-5, rtol=1e-5)


def test_old_style_rope_fields() -> None:
    raw = {"rope_theta": 500000.0, "rope_scaling": {"type": "linear", "factor": 2.0}}
    rope = parse_rope(raw, 128)
    assert (rope.rope_type, rope.theta, rope.factor) == ("linear", 500000.0, 2.0)
    assert parse_rope({"rope_scaling": None}, 128).rope_type == "default"
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        parse_rope({"rope_theta": 1.0, "partial_rotary_factor": 0.5}, 128)


def emo(**changes: Any) -> ModelConfig:
    return FAMILIES["emo"]({**EMO_BASE, **changes})


def test_emo_structure_options() -> None:
    config = emo(num_experts_per_layer=[10, 0, 12], dense_intermediate_size=20,
                 num_shared_experts_per_layer=[1, 0, 0], always_active_experts_per_layer=[[], [], [0, 5]])
    assert config.num_experts == (10, 0, 12) and config.moe_layers == [0, 2]
    assert config.fixed_experts(0) == [9] and config.fixed_experts(2) == [0, 5]
    assert config.routable_experts(2) == [1, 2, 3, 4, 6, 7, 8, 9, 10, 11]
    assert config.num_routed(0) == 3 and config.num_routed(2) == 2
    assert config.pool_bounds() == (3, 9)
    assert config.default_pool_size() == 3


def test_emo_default_pool_matches_the_release_shape() -> None:
    config = emo(num_experts=128, num_experts_per_tok=8, num_shared_experts=1)
    assert config.pool_bounds() == (7, 127)
    assert config.default_pool_size() == 32  # ceil(127 / 4): EMO's evaluation pool
    assert config.validate_pool_size(127) == 127
    with pytest.raises(ValueError, match=r"\[7, 127\]"):
        config.validate_pool_size(6)


def test_other_families_default_to_full_routing() -> None:
    raw = {k: v for k, v in EMO_BASE.items() if k not in ("num_experts", "num_shared_experts")}
    mixtral = FAMILIES["mixtral"]({**raw, "model_type": "mixtral", "num_local_experts": 8})
    assert mixtral.default_pool_size() is None and mixtral.norm_topk_prob
    assert mixtral.names.expert(1, 3, 0) == "model.layers.1.block_sparse_moe.experts.3.w1.weight"
    assert mixtral.names.expert(1, 3, 2) == "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    with pytest.raises(ValueError, match="sliding_window"):
        FAMILIES["mixtral"]({**raw, "num_local_experts": 8, "sliding_window": 32})

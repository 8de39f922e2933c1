"""Shape of the demo EMO and the config.json the inference core reads (model_type "emo")."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class DemoModelConfig:
    vocab_size: int = 8192
    hidden_size: int = 160
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 96  # per expert
    num_experts: int = 33  # per layer, the shared expert included (the last id)
    num_shared_experts: int = 1
    top_k: int = 4  # experts per token, the shared expert included
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 1024

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "intermediate_size",
            "num_experts",
            "top_k",
            "max_position_embeddings",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"DemoModelConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ValueError("DemoModelConfig.hidden_size / num_heads must be an even integer (RoPE halves)")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("DemoModelConfig.num_heads must be a multiple of num_kv_heads")
        if not 0 <= self.num_shared_experts < self.top_k <= self.num_experts:
            raise ValueError("DemoModelConfig needs 0 <= num_shared_experts < top_k <= num_experts")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def routable_experts(self) -> int:
        return self.num_experts - self.num_shared_experts

    @property
    def num_routed(self) -> int:
        return self.top_k - self.num_shared_experts

    def default_pool_size(self) -> int:
        """25% of the routable experts, as the serving default (never below the routed count)."""
        return max(math.ceil(self.routable_experts / 4), self.num_routed)

    def hf_config(self, *, eos_token_id: int, pad_token_id: int, bos_token_id: int | None) -> dict[str, Any]:
        return {
            "architectures": ["EmoForCausalLM"],
            "model_type": "emo",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "attention_bias": False,
            "tie_word_embeddings": False,
            "num_experts": self.num_experts,
            "num_experts_per_tok": self.top_k,
            "num_shared_experts": self.num_shared_experts,
            "norm_topk_prob": False,
            "eos_token_id": eos_token_id,
            "pad_token_id": pad_token_id,
            "bos_token_id": bos_token_id,
            "torch_dtype": "bfloat16",
        }

    @classmethod
    def from_hf_config(cls, raw: dict[str, Any]) -> DemoModelConfig:
        if raw.get("model_type") != "emo":
            raise ValueError(f"config.json model_type must be 'emo', got {raw.get('model_type')!r}")
        try:
            return cls(
                vocab_size=raw["vocab_size"],
                hidden_size=raw["hidden_size"],
                num_layers=raw["num_hidden_layers"],
                num_heads=raw["num_attention_heads"],
                num_kv_heads=raw.get("num_key_value_heads") or raw["num_attention_heads"],
                intermediate_size=raw["intermediate_size"],
                num_experts=raw["num_experts"],
                num_shared_experts=raw.get("num_shared_experts", 0),
                top_k=raw["num_experts_per_tok"],
                rope_theta=float(raw.get("rope_theta", 10000.0)),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=raw["max_position_embeddings"],
            )
        except KeyError as exc:
            raise ValueError(f"config.json lacks field {exc.args[0]}") from exc

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

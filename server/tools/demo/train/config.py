"""Shape of the demo EMO and the config.json the inference core reads (model_type "emo")."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from server.model.config import ModelConfig


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
    def from_model_config(cls, mc: ModelConfig) -> DemoModelConfig:
        """The trainer's shape of a config.json read by the serving parser (server/model/config.py),
        so both read a checkpoint alike. The trainer builds only what the demo writes: EMO, every
        layer MoE with the same experts, shared experts only, plain RoPE, no biases or tying."""
        problems = [
            f"model_type must be 'emo', got {mc.family!r}" if mc.family != "emo" else "",
            "every layer must have the same experts and shared experts, none dense"
            if len(set(mc.num_experts)) != 1 or len(set(mc.num_shared_experts)) != 1 or 0 in mc.num_experts
            else "",
            "always_active_experts are not supported" if any(mc.always_active_experts) else "",
            f"rope type {mc.rope.rope_type!r} is not supported" if mc.rope.rope_type != "default" else "",
            "head_dim must be hidden_size / num_attention_heads"
            if mc.head_dim * mc.num_heads != mc.hidden_size else "",
            "attention biases, tied embeddings and norm_topk_prob are not supported"
            if mc.qkv_bias or mc.o_bias or mc.tie_word_embeddings or mc.norm_topk_prob else "",
        ]
        if any(problems):
            reasons = "; ".join(p for p in problems if p)
            raise ValueError(f"the demo trainer cannot build this model: {reasons}")
        return cls(
            vocab_size=mc.vocab_size,
            hidden_size=mc.hidden_size,
            num_layers=mc.num_layers,
            num_heads=mc.num_heads,
            num_kv_heads=mc.num_kv_heads,
            intermediate_size=mc.intermediate_size,
            num_experts=mc.num_experts[0],
            num_shared_experts=mc.num_shared_experts[0],
            top_k=mc.top_k,
            rope_theta=mc.rope.theta,
            rms_norm_eps=mc.rms_norm_eps,
            max_position_embeddings=mc.max_position_embeddings,
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

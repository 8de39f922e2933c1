"""Presets, config.json contents and the tensor list of a synthetic EMO checkpoint.

``SynthSpec`` is the one validated description everything else reads: the config.json dict
(EMO field names), the per-layer expert structure, the planted domain -> experts assignment and
the ordered list of tensors with their shapes (known before any weight exists, so the writer
can lay out the safetensors headers first and then stream).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from server.model.dtypes import COMPUTE_DTYPES
from server.tools.synth.vocab import DOMAINS

SYNTH_KEY = "emo_synth"  # config.json entry recording seed, domains and planted experts

_BASE: dict[str, Any] = {
    "architectures": ["EmoForCausalLM"],
    "model_type": "emo",
    "hidden_act": "silu",
    "num_shared_experts": 1,
    "norm_topk_prob": False,
    "attention_bias": False,
    "tie_word_embeddings": False,
    "rms_norm_eps": 1e-6,
}
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"vocab_size": 2048, "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
             "num_key_value_heads": 4, "head_dim": 16, "intermediate_size": 32, "num_experts": 32,
             "num_experts_per_tok": 4, "rope_theta": 10000.0, "max_position_embeddings": 2048},
    "small": {"vocab_size": 4096, "hidden_size": 256, "num_hidden_layers": 8, "num_attention_heads": 8,
              "num_key_value_heads": 8, "head_dim": 32, "intermediate_size": 128, "num_experts": 64,
              "num_experts_per_tok": 8, "rope_theta": 10000.0, "max_position_embeddings": 4096},
    "emo-1b14b": {"vocab_size": 100352, "hidden_size": 2048, "num_hidden_layers": 16,
                  "num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": 128,
                  "intermediate_size": 1024, "num_experts": 128, "num_experts_per_tok": 8,
                  "rope_theta": 500000.0, "max_position_embeddings": 4096},
}
DEFAULT_DOMAINS: dict[str, int] = {"tiny": 4, "small": 8, "emo-1b14b": 8}
# Keys an override may set besides the preset's own (structure variants the model supports).
OPTIONAL_KEYS = ("num_experts_per_layer", "num_shared_experts_per_layer", "always_active_experts",
                 "always_active_experts_per_layer", "dense_intermediate_size", "dense_mlp_bias")
_FIXED_KEYS = ("architectures", "model_type", "hidden_act", "tie_word_embeddings", "bos_token_id",
               "eos_token_id", "pad_token_id", "torch_dtype", SYNTH_KEY)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    kind: str  # which weight rule builds it (see weights.py)
    layer: int = -1
    expert: int = -1


@dataclass(frozen=True)
class SynthSpec:
    config: dict[str, Any]  # config.json without token ids (the tokenizer fills those)
    seed: int
    domains: tuple[str, ...]
    dtype: str  # bf16 | fp16 | fp32

    def __post_init__(self) -> None:
        c = self.config
        if self.dtype not in COMPUTE_DTYPES:
            raise ValueError(f"dtype must be one of {list(COMPUTE_DTYPES)}, got {self.dtype!r}")
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "intermediate_size", "num_experts",
                    "num_experts_per_tok", "max_position_embeddings"):
            v = c.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"config field {key} must be a positive integer, got {v!r}")
        for key in ("attention_bias", "norm_topk_prob", "dense_mlp_bias"):
            if not isinstance(c.get(key, False), bool):
                raise ValueError(f"config field {key} must be true or false, got {c[key]!r}")
        for key in ("rope_theta", "rms_norm_eps"):
            if isinstance(c[key], bool) or not isinstance(c[key], (int, float)) or not c[key] > 0:
                raise ValueError(f"config field {key} must be a positive number, got {c[key]!r}")
        lists = [c.get("always_active_experts") or [], *(c.get("always_active_experts_per_layer") or [])]
        ints = [c.get("num_shared_experts", 0), c.get("dense_intermediate_size", 0), *self.experts_per_layer,
                *(c.get("num_shared_experts_per_layer") or []), *(x for a in lists for x in a)]
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in ints) or any(
            not isinstance(a, list) for a in lists
        ):
            raise ValueError("config fields: expert counts, dense_intermediate_size and expert id lists "
                             "must hold non-negative integers")
        if c["num_attention_heads"] % c["num_key_value_heads"] or c["head_dim"] % 2:
            raise ValueError("config fields: num_attention_heads must be a multiple of "
                             "num_key_value_heads and head_dim must be even")
        if c["head_dim"] < len(self.domains) or c["hidden_size"] < 4 * (len(self.domains) + 1):
            raise ValueError(f"{len(self.domains)} domains need head_dim >= {len(self.domains)} and "
                             f"hidden_size >= {4 * (len(self.domains) + 1)}")
        if not 1 <= len(self.domains) <= len(DOMAINS):
            raise ValueError(f"domains must be in [1, {len(DOMAINS)}], got {len(self.domains)}")
        if any(e == 0 for e in self.experts_per_layer) and c.get("dense_intermediate_size", 0) <= 0:
            raise ValueError("config field dense_intermediate_size must be > 0 when a layer is dense")
        for layer in self.moe_layers:
            self._validate_layer(layer)

    def _validate_layer(self, layer: int) -> None:
        E, S, A = self.experts_per_layer[layer], self.shared(layer), self.always_active(layer)
        if S and A:
            raise ValueError(f"layer {layer}: always_active_experts cannot be combined with shared experts")
        if len(set(A)) != len(A) or any(not 0 <= a < E for a in A) or not 0 <= S < E:
            raise ValueError(f"layer {layer}: bad shared ({S}) / always-active {A} for {E} experts")
        if not S + len(A) < self.config["num_experts_per_tok"] <= E:
            raise ValueError(f"layer {layer}: num_experts_per_tok must exceed the {S + len(A)} "
                             f"fixed experts and be <= {E}")
        if len(self.routable(layer)) < len(self.domains):
            raise ValueError(f"layer {layer}: {len(self.routable(layer))} routable experts cannot "
                             f"be split among {len(self.domains)} domains")

    # ---- structure ---------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def experts_per_layer(self) -> list[int]:
        per = self.config.get("num_experts_per_layer")
        return list(per) if per is not None else [self.config["num_experts"]] * self.num_layers

    @property
    def moe_layers(self) -> list[int]:
        return [layer for layer, e in enumerate(self.experts_per_layer) if e > 0]

    def shared(self, layer: int) -> int:
        per = self.config.get("num_shared_experts_per_layer")
        # read only alongside num_experts_per_layer, as the authors' EmoModel does
        if per is not None and self.config.get("num_experts_per_layer") is not None:
            return int(per[layer])
        return int(self.config.get("num_shared_experts", 0)) if self.experts_per_layer[layer] else 0

    def always_active(self, layer: int) -> list[int]:
        per = self.config.get("always_active_experts_per_layer")
        if per is not None:
            return list(per[layer])
        return list(self.config.get("always_active_experts") or []) if self.experts_per_layer[layer] else []

    def routable(self, layer: int) -> list[int]:
        E, S, A = self.experts_per_layer[layer], self.shared(layer), set(self.always_active(layer))
        return [e for e in range(E - S) if e not in A]

    def planted(self, layer: int) -> list[list[int]]:
        """Per domain, the routable experts planted for it: equal disjoint shares of a seeded
        shuffle of R (leftover experts belong to no domain). Same R -> same shares in every layer."""
        routable = self.routable(layer)
        order = list(routable)
        random.Random(f"{self.seed}/planting/{len(routable)}").shuffle(order)
        m = len(routable) // len(self.domains)
        return [sorted(order[d * m:(d + 1) * m]) for d in range(len(self.domains))]

    def synth_record(self) -> dict[str, Any]:
        return {"version": 1, "seed": self.seed, "domains": list(self.domains),
                "planted_experts": [self.planted(layer) if e else None
                                    for layer, e in enumerate(self.experts_per_layer)]}

    # ---- tensors -----------------------------------------------------------------------------
    def tensors(self) -> list[TensorSpec]:
        c = self.config
        H, V, hd = c["hidden_size"], c["vocab_size"], c["head_dim"]
        q_out, kv_out = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
        out = [TensorSpec("model.embed_tokens.weight", (V, H), "embed")]
        for layer in range(self.num_layers):
            p = f"model.layers.{layer}."
            out.append(TensorSpec(p + "pre_attention_layernorm.weight", (H,), "norm", layer))
            for proj, rows, cols in (("q", q_out, H), ("k", kv_out, H), ("v", kv_out, H), ("o", H, q_out)):
                out.append(TensorSpec(f"{p}self_attn.{proj}_proj.weight", (rows, cols), proj, layer))
                if c.get("attention_bias"):
                    out.append(TensorSpec(f"{p}self_attn.{proj}_proj.bias", (rows,), "bias", layer))
            out.append(TensorSpec(p + "pre_feedforward_layernorm.weight", (H,), "norm", layer))
            out.extend(self._mlp_tensors(layer, p + "mlp."))
        out.append(TensorSpec("model.norm.weight", (H,), "norm"))
        out.append(TensorSpec("lm_head.weight", (V, H), "lm_head"))
        return out

    def _mlp_tensors(self, layer: int, p: str) -> list[TensorSpec]:
        H, E = self.config["hidden_size"], self.experts_per_layer[layer]
        if E == 0:
            Id, bias = self.config["dense_intermediate_size"], self.config.get("dense_mlp_bias", False)
            out = []
            for part, shape in (("gate", (Id, H)), ("up", (Id, H)), ("down", (H, Id))):
                out.append(TensorSpec(f"{p}{part}_proj.weight", shape, f"dense_{part}", layer))
                if bias:
                    out.append(TensorSpec(f"{p}{part}_proj.bias", shape[:1], "bias", layer))
            return out
        width = self.config["intermediate_size"]
        out = [TensorSpec(p + "gate.weight", (E, H), "router", layer)]
        for e in range(E):
            q = f"{p}experts.{e}."
            out.append(TensorSpec(q + "gate_proj.weight", (width, H), "expert_in", layer, e))
            out.append(TensorSpec(q + "up_proj.weight", (width, H), "expert_in", layer, e))
            out.append(TensorSpec(q + "down_proj.weight", (H, width), "expert_down", layer, e))
        return out


def make_spec(preset: str, *, seed: int = 0, domains: int | None = None, dtype: str = "bf16",
              overrides: dict[str, Any] | None = None) -> SynthSpec:
    """Preset + overrides -> validated spec. Unknown override keys are rejected (typos)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    config = {**_BASE, **PRESETS[preset]}
    for key, value in (overrides or {}).items():
        if key in _FIXED_KEYS or (key not in config and key not in OPTIONAL_KEYS):
            raise ValueError(f"override {key!r} is not a config field synth can set "
                             f"(settable: {', '.join(sorted(set(config) - set(_FIXED_KEYS)))}, "
                             f"{', '.join(OPTIONAL_KEYS)})")
        config[key] = value
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    n = DEFAULT_DOMAINS[preset] if domains is None else domains
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(DOMAINS):
        raise ValueError(f"domains must be an integer in [1, {len(DOMAINS)}], got {domains!r}")
    L = config["num_hidden_layers"]
    for key in ("num_experts_per_layer", "num_shared_experts_per_layer", "always_active_experts_per_layer"):
        if key in config and (not isinstance(config[key], list) or len(config[key]) != L):
            raise ValueError(f"override {key} must be a list with one entry per layer ({L})")
    return SynthSpec(config=config, seed=seed, domains=tuple(DOMAINS[:n]), dtype=dtype)

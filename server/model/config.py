"""Family-neutral model configuration.

One ``ModelConfig`` describes every supported MoE family; the adapters in
``server/model/families/`` only translate a ``config.json`` into it (field names, tensor names,
routing options). The decoder never branches on the family name.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from expert_cache.errors import CheckpointError

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
QK_NORMS = ("none", "full", "head")  # full: over the whole projection (OLMoE); head: per head (Qwen3)


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters with transformers' ``rope_parameters`` semantics."""

    rope_type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    original_max_position_embeddings: int | None = None  # llama3 / yarn
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    attention_factor: float | None = None  # yarn (None: derived from factor / mscale)
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(
                f"rope type {self.rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})"
            )
        if not self.theta > 0:
            raise ValueError(f"rope_theta must be > 0, got {self.theta}")
        if self.rope_type != "default" and not self.factor > 0:
            raise ValueError(f"rope factor must be > 0 for rope type {self.rope_type!r}, got {self.factor}")
        if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ValueError("rope high_freq_factor must be > low_freq_factor for llama3")


@dataclass(frozen=True)
class TensorNames:
    """How a family names its tensors; ``{l}`` is the layer, ``{e}`` the expert."""

    embed: str = "model.embed_tokens.weight"
    final_norm: str = "model.norm.weight"
    lm_head: str = "lm_head.weight"
    layer: str = "model.layers.{l}."
    attn_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    attn: str = "self_attn"
    mlp: str = "mlp"
    router: str = "gate"
    experts: str = "experts"
    expert_parts: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # gate, up, down
    dense_parts: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    shared_mlp: str = "shared_expert"
    shared_mlp_gate: str = "shared_expert_gate"

    def layer_tensor(self, layer: int, suffix: str) -> str:
        return self.layer.format(l=layer) + suffix

    def expert(self, layer: int, expert: int, part: int) -> str:
        """``part`` 0 = gate, 1 = up, 2 = down."""
        name = f"{self.mlp}.{self.experts}.{expert}.{self.expert_parts[part]}.weight"
        return self.layer_tensor(layer, name)


@dataclass(frozen=True)
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # width I of every expert (routable, shared, always-active)
    max_position_embeddings: int
    rms_norm_eps: float
    top_k: int
    num_experts: tuple[int, ...]  # per layer; 0 = dense layer
    num_shared_experts: tuple[int, ...] = ()  # per layer; the LAST S router indices
    always_active_experts: tuple[tuple[int, ...], ...] = ()  # per layer
    norm_topk_prob: bool = False
    dense_intermediate_size: int = 0
    dense_mlp_bias: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: str = "none"
    clip_qkv: float | None = None
    shared_mlp_size: int = 0  # Qwen2-MoE's sigmoid-gated shared expert; 0 = none
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    rope: RopeConfig = field(default_factory=RopeConfig)
    names: TensorNames = field(default_factory=TensorNames)
    pool_fraction: float | None = None  # EMO: default pool = ceil(|R| * fraction); None = full
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "max_position_embeddings", "top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"config field {name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"config field rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if self.hidden_act != "silu":
            raise ValueError(f"config field hidden_act: only 'silu' is supported, got {self.hidden_act!r}")
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm must be one of {QK_NORMS}, got {self.qk_norm!r}")
        L = self.num_layers
        if not self.num_shared_experts:
            object.__setattr__(self, "num_shared_experts", (0,) * L)
        if not self.always_active_experts:
            object.__setattr__(self, "always_active_experts", ((),) * L)
        for name in ("num_experts", "num_shared_experts", "always_active_experts"):
            if len(getattr(self, name)) != L:
                raise ValueError(
                    f"config field {name} must have one entry per layer ({L}), got {len(getattr(self, name))}"
                )
        for layer in range(L):
            self._validate_layer(layer)
        if any(e == 0 for e in self.num_experts) and self.dense_intermediate_size <= 0:
            raise ValueError("config field dense_intermediate_size must be > 0 when a layer is dense")
        if any(e > 0 for e in self.num_experts) and self.intermediate_size <= 0:
            raise ValueError(f"config field intermediate_size must be > 0, got {self.intermediate_size}")
        if self.pool_fraction is not None and not 0 < self.pool_fraction <= 1:
            raise ValueError(f"pool_fraction must be in (0, 1], got {self.pool_fraction}")

    def _validate_layer(self, layer: int) -> None:
        E, S = self.num_experts[layer], self.num_shared_experts[layer]
        A = self.always_active_experts[layer]
        if E < 0 or S < 0:
            raise ValueError(f"layer {layer}: num_experts ({E}) and num_shared_experts ({S}) must be >= 0")
        if E == 0:
            if S or A:
                raise ValueError(f"layer {layer} is dense (0 experts) but has shared/always-active experts")
            return
        if S and A:
            raise ValueError(
                f"layer {layer}: always_active_experts cannot be combined with num_shared_experts"
            )
        if len(set(A)) != len(A) or any(not 0 <= a < E for a in A):
            raise ValueError(
                f"layer {layer}: always_active_experts {list(A)} must be distinct ids in [0, {E})"
            )
        fixed = S + len(A)
        if not fixed < self.top_k <= E:
            raise ValueError(
                f"layer {layer}: num_experts_per_tok ({self.top_k}) must be in ({fixed}, {E}] "
                f"({E} experts, {S} shared, {len(A)} always active)"
            )
        if self.top_k - fixed > E - fixed:
            raise ValueError(f"layer {layer}: fewer routable experts than routed picks")

    # ---- routing structure -------------------------------------------------------------------
    @property
    def moe_layers(self) -> list[int]:
        return [layer for layer, e in enumerate(self.num_experts) if e > 0]

    @property
    def max_experts(self) -> int:
        return max(self.num_experts)

    def is_moe(self, layer: int) -> bool:
        return self.num_experts[layer] > 0

    def fixed_experts(self, layer: int) -> list[int]:
        """Trunk experts used by every token: shared (last S ids) or always-active ones."""
        E, S = self.num_experts[layer], self.num_shared_experts[layer]
        return list(range(E - S, E)) + sorted(self.always_active_experts[layer])

    def routable_experts(self, layer: int) -> list[int]:
        """Experts chosen per token by the router (the pageable ones, the pool candidates)."""
        fixed = set(self.fixed_experts(layer))
        return [e for e in range(self.num_experts[layer]) if e not in fixed]

    def num_routed(self, layer: int) -> int:
        """How many routable experts one token picks at ``layer``."""
        return self.top_k - len(self.fixed_experts(layer))

    def pool_bounds(self) -> tuple[int, int]:
        """(smallest, largest) valid pool size over all MoE layers."""
        layers = self.moe_layers
        if not layers:
            return (0, 0)
        return (max(self.num_routed(layer) for layer in layers),
                min(len(self.routable_experts(layer)) for layer in layers))

    def validate_pool_size(self, p: int) -> int:
        low, high = self.pool_bounds()
        if not self.moe_layers:
            raise ValueError("expert pool: this model has no MoE layer")
        if isinstance(p, bool) or not isinstance(p, int) or not low <= p <= high:
            raise ValueError(
                f"expert pool size must be an integer in [{low}, {high}] "
                f"(top_k minus shared/always-active experts .. routable experts per layer), got {p!r}"
            )
        return p

    def default_pool_size(self) -> int | None:
        if self.pool_fraction is None or not self.moe_layers:
            return None
        return fraction_pool_size(self.pool_fraction, *self.pool_bounds())


def fraction_pool_size(fraction: float, smallest: int, largest: int) -> int:
    """A pool of ``fraction`` of the routable experts (``largest``), rounded up and kept within
    the valid sizes [smallest, largest] (see ``ModelConfig.pool_bounds``)."""
    return min(largest, max(smallest, math.ceil(largest * fraction)))


def load_config(checkpoint_dir: Path) -> ModelConfig:
    """Parse ``config.json`` with the adapter of its ``model_type``."""
    from server.model.families import FAMILIES

    path = Path(checkpoint_dir) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(path, "missing (every checkpoint needs a config.json)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(path, f"unreadable JSON ({e})") from e
    if not isinstance(raw, dict):
        raise CheckpointError(path, "not a JSON object")
    model_type = raw.get("model_type")
    if model_type not in FAMILIES:
        raise CheckpointError(
            path, f"field model_type: unknown model_type {model_type!r} (supported: {', '.join(FAMILIES)})"
        )
    try:
        return FAMILIES[model_type](raw)
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(path, str(e.args[0]) if isinstance(e, KeyError) else str(e)) from e

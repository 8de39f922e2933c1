"""What a checkpoint must contain for a config, and how it becomes modules.

``expected_tensors`` lists every tensor (trunk and experts) with its shape, so the loader can
check the whole checkpoint before anything is allocated on the device. Routable experts become
an ``ExpertCatalog`` (byte ranges for the expert store); everything else is trunk.
"""

from __future__ import annotations

import torch

from expert_cache.base import ExpertCatalog, ExpertStore, PartSpec, TensorChunk
from expert_cache.safetensors_index import SafetensorsIndex, TensorInfo
from server.model.attention import Attention
from server.model.config import ModelConfig
from server.model.layers import RMSNorm, SwiGLU
from server.model.moe import MoEBlock

Shapes = dict[str, tuple[int, ...]]


def fixed_key(config: ModelConfig, layer: int, part: str) -> str:
    """Internal trunk key of a layer's stacked shared / always-active experts ("gate_up"/"down")."""
    return config.names.layer_tensor(layer, f"{config.names.mlp}.fixed_experts.{part}")


def _layer_trunk(config: ModelConfig, layer: int) -> Shapes:
    n, H, D = config.names, config.hidden_size, config.head_dim
    q_out, kv_out = config.num_heads * D, config.num_kv_heads * D

    def t(suffix: str) -> str:
        return n.layer_tensor(layer, suffix)

    a = f"{n.attn}."
    shapes: Shapes = {
        t(f"{n.attn_norm}.weight"): (H,),
        t(f"{n.mlp_norm}.weight"): (H,),
        t(a + "q_proj.weight"): (q_out, H),
        t(a + "k_proj.weight"): (kv_out, H),
        t(a + "v_proj.weight"): (kv_out, H),
        t(a + "o_proj.weight"): (H, q_out),
    }
    if config.qkv_bias:
        shapes.update({t(a + "q_proj.bias"): (q_out,), t(a + "k_proj.bias"): (kv_out,),
                       t(a + "v_proj.bias"): (kv_out,)})
    if config.o_bias:
        shapes[t(a + "o_proj.bias")] = (H,)
    if config.qk_norm == "full":
        shapes.update({t(a + "q_norm.weight"): (q_out,), t(a + "k_norm.weight"): (kv_out,)})
    elif config.qk_norm == "head":
        shapes.update({t(a + "q_norm.weight"): (D,), t(a + "k_norm.weight"): (D,)})
    m = f"{n.mlp}."
    if not config.is_moe(layer):
        Id = config.dense_intermediate_size
        g, u, d = n.dense_parts
        shapes.update({t(f"{m}{g}.weight"): (Id, H), t(f"{m}{u}.weight"): (Id, H),
                       t(f"{m}{d}.weight"): (H, Id)})
        if config.dense_mlp_bias:
            shapes.update({t(f"{m}{g}.bias"): (Id,), t(f"{m}{u}.bias"): (Id,), t(f"{m}{d}.bias"): (H,)})
        return shapes
    shapes[t(f"{m}{n.router}.weight")] = (config.num_experts[layer], H)
    if config.shared_mlp_size:
        Is, s = config.shared_mlp_size, f"{m}{n.shared_mlp}."
        shapes.update({t(s + "gate_proj.weight"): (Is, H), t(s + "up_proj.weight"): (Is, H),
                       t(s + "down_proj.weight"): (H, Is), t(f"{m}{n.shared_mlp_gate}.weight"): (1, H)})
    return shapes


def _expert_shapes(config: ModelConfig, layer: int, expert: int) -> Shapes:
    H, intermediate = config.hidden_size, config.intermediate_size
    return {config.names.expert(layer, expert, 0): (intermediate, H),
            config.names.expert(layer, expert, 1): (intermediate, H),
            config.names.expert(layer, expert, 2): (H, intermediate)}


def expected_tensors(config: ModelConfig) -> Shapes:
    """Every tensor the checkpoint must hold, with its shape."""
    n, V, H = config.names, config.vocab_size, config.hidden_size
    shapes: Shapes = {n.embed: (V, H), n.final_norm: (H,)}
    if not config.tie_word_embeddings:
        shapes[n.lm_head] = (V, H)
    for layer in range(config.num_layers):
        shapes.update(_layer_trunk(config, layer))
        for expert in range(config.num_experts[layer]):
            shapes.update(_expert_shapes(config, layer, expert))
    return shapes


def build_catalog(config: ModelConfig, index: SafetensorsIndex, dtype: torch.dtype) -> ExpertCatalog:
    """Routable experts only: "gate_up" (2I, H) = gate rows then up rows, "down" (H, I)."""
    H, intermediate = config.hidden_size, config.intermediate_size
    parts: dict[int, tuple[PartSpec, ...]] = {}
    chunks: dict[tuple[int, int], dict[str, tuple[TensorChunk, ...]]] = {}

    def chunk(info: TensorInfo) -> TensorChunk:
        return TensorChunk(info.path, info.name, info.offset, info.nbytes, info.dtype, info.numel)

    for layer in config.moe_layers:
        parts[layer] = (PartSpec("gate_up", (2 * intermediate, H)), PartSpec("down", (H, intermediate)))
        for e in config.routable_experts(layer):
            gate, up, down = (index.info(config.names.expert(layer, e, p)) for p in range(3))
            chunks[(layer, e)] = {"gate_up": (chunk(gate), chunk(up)), "down": (chunk(down),)}
    return ExpertCatalog(parts=parts, chunks=chunks, dtype=dtype)


def read_trunk(config: ModelConfig, index: SafetensorsIndex, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Trunk tensors in CPU memory, converted to ``dtype``; fixed experts stacked per layer."""
    tensors: dict[str, torch.Tensor] = {}
    n = config.names
    globals_ = [n.embed, n.final_norm] + ([] if config.tie_word_embeddings else [n.lm_head])
    for name in globals_:
        tensors[name] = index.read(name).to(dtype)
    for layer in range(config.num_layers):
        for name in _layer_trunk(config, layer):
            tensors[name] = index.read(name).to(dtype)
        if not config.is_moe(layer):
            continue
        fixed = config.fixed_experts(layer)
        H, intermediate = config.hidden_size, config.intermediate_size
        gate_up = torch.empty(len(fixed), 2 * intermediate, H, dtype=dtype)
        down = torch.empty(len(fixed), H, intermediate, dtype=dtype)
        for f, e in enumerate(fixed):
            gate_up[f, :intermediate] = index.read(n.expert(layer, e, 0))
            gate_up[f, intermediate:] = index.read(n.expert(layer, e, 1))
            down[f] = index.read(n.expert(layer, e, 2))
        tensors[fixed_key(config, layer, "gate_up")] = gate_up
        tensors[fixed_key(config, layer, "down")] = down
    return tensors


def build_layer_modules(
    config: ModelConfig, layer: int, tensors: dict[str, torch.Tensor], store: ExpertStore
) -> tuple[RMSNorm, Attention, RMSNorm, MoEBlock | SwiGLU]:
    n = config.names

    def get(suffix: str) -> torch.Tensor | None:
        return tensors.get(n.layer_tensor(layer, suffix))

    def need(suffix: str) -> torch.Tensor:
        return tensors[n.layer_tensor(layer, suffix)]

    a, m = f"{n.attn}.", f"{n.mlp}."
    attn = Attention(config, layer, {
        "q": get(a + "q_proj.weight"), "k": get(a + "k_proj.weight"),
        "v": get(a + "v_proj.weight"), "o": get(a + "o_proj.weight"),
        "q_bias": get(a + "q_proj.bias"), "k_bias": get(a + "k_proj.bias"),
        "v_bias": get(a + "v_proj.bias"), "o_bias": get(a + "o_proj.bias"),
        "q_norm": get(a + "q_norm.weight"), "k_norm": get(a + "k_norm.weight"),
    })
    eps = config.rms_norm_eps
    attn_norm = RMSNorm(need(f"{n.attn_norm}.weight"), eps)
    mlp_norm = RMSNorm(need(f"{n.mlp_norm}.weight"), eps)
    mlp: MoEBlock | SwiGLU
    if not config.is_moe(layer):
        g, u, d = n.dense_parts
        weights = (need(f"{m}{g}.weight"), need(f"{m}{u}.weight"), need(f"{m}{d}.weight"))
        biases = None
        if config.dense_mlp_bias:
            biases = (need(f"{m}{g}.bias"), need(f"{m}{u}.bias"), need(f"{m}{d}.bias"))
        mlp = SwiGLU(*weights, biases=biases)
    else:
        shared = None
        if config.shared_mlp_size:
            s = f"{m}{n.shared_mlp}."
            shared = SwiGLU(need(f"{s}gate_proj.weight"), need(f"{s}up_proj.weight"),
                            need(f"{s}down_proj.weight"))
        mlp = MoEBlock(
            config, layer, need(f"{m}{n.router}.weight"),
            tensors[fixed_key(config, layer, "gate_up")], tensors[fixed_key(config, layer, "down")],
            store, shared, get(f"{m}{n.shared_mlp_gate}.weight"),
        )
    return attn_norm, attn, mlp_norm, mlp

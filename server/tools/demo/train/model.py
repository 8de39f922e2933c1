"""A trainable EMO decoder with the checkpoint's tensor names and the inference core's semantics.

Pre-norm layers: h = x + attn(n1(x)); y = h + moe(n2(h)). RMSNorm in fp32, RoPE rotate_half,
causal attention restricted to each token's own document (segment). Experts are stored stacked
([E, 2I, H] gate+up rows, [E, H, I] down) and written per expert by `hf_state_dict`.

The arithmetic shared with serving is serving's own: RMSNorm, the RoPE tables and rotation, one
expert's SwiGLU and the shared-expert routing come from server/model. The modules here differ
where training needs it: trainable parameters (serving's modules hold frozen, fused weights),
attention masked to each document of a packed row with no KV cache, expert compute that keeps
per-expert gradients apart, and per-document pools of random size (routing.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from server.model.config import RopeConfig
from server.model.layers import expert_forward, rms_norm
from server.model.rope import RotaryEmbedding, apply_rope
from server.tools.demo.train.config import DemoModelConfig
from server.tools.demo.train.plan import RoutePlan
from server.tools.demo.train.routing import load_balancing_loss, route_tokens, segment_pools


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(size)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, heads, D]; cos, sin [B*T, D] fp32 -> x rotated, in x's dtype (bf16 under autocast:
    serving's apply_rope computes in fp32 then)."""
    B, T, heads, D = x.shape
    return apply_rope(x.reshape(B * T, heads, D), cos, sin).view(B, T, heads, D).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, c: DemoModelConfig) -> None:
        super().__init__()
        self.c = c
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor
    ) -> torch.Tensor:
        B, T, _ = x.shape
        c = self.c
        q = rotate(self.q_proj(x).view(B, T, c.num_heads, c.head_dim), *rope)
        k = rotate(self.k_proj(x).view(B, T, c.num_kv_heads, c.head_dim), *rope)
        v = self.v_proj(x).view(B, T, c.num_kv_heads, c.head_dim)
        repeat = c.num_heads // c.num_kv_heads
        k, v = k.repeat_interleave(repeat, dim=2), v.repeat_interleave(repeat, dim=2)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
        )
        projected: torch.Tensor = self.o_proj(out.transpose(1, 2).reshape(B, T, -1))
        return projected


def experts_forward(
    x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor:
    """Each expert runs on its own tokens only. x [N, H]; ids, weights [N, k]; gate_up [R, 2I, H]."""
    k = ids.shape[1]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert
    tokens = order // k
    counts = torch.bincount(flat, minlength=gate_up.shape[0]).tolist()
    outputs = []
    # unbind once: indexing the stacked weight per expert would make backward allocate and
    # add a full-size zero gradient for every expert
    gate_ups, downs = gate_up.unbind(0), down.unbind(0)
    for expert, rows in enumerate(torch.split(x[tokens], counts)):
        if counts[expert]:
            outputs.append(expert_forward(rows, gate_ups[expert], downs[expert]))
    ys = torch.cat(outputs) * weights.reshape(-1)[order, None].to(x.dtype)
    return torch.zeros_like(x).index_add_(0, tokens, ys)


class MoE(nn.Module):
    def __init__(self, c: DemoModelConfig) -> None:
        super().__init__()
        self.c = c
        self.gate = nn.Linear(c.hidden_size, c.num_experts, bias=False)  # the router [E, H]
        self.gate_up = nn.Parameter(torch.empty(c.num_experts, 2 * c.intermediate_size, c.hidden_size))
        self.down = nn.Parameter(torch.empty(c.num_experts, c.hidden_size, c.intermediate_size))

    def forward(self, x: torch.Tensor, plan: RoutePlan, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, H] -> (y [N, H], load-balancing loss). Records the layer's pools in `plan`."""
        c, R = self.c, self.c.routable_experts
        logits = self.gate(x)  # [N, E]
        allowed = None
        if plan.fixed_pools is not None:
            allowed = plan.fixed_pools[layer][plan.seg]
        elif plan.pool_sizes is not None:
            full = torch.softmax(logits[:, :R].float(), dim=-1)
            pools = segment_pools(full, plan.seg, plan.num_segments, plan.pool_sizes[layer], plan.score_mask)
            plan.chosen_pools.append(pools)
            allowed = pools[plan.seg]  # [N, R]
        ids, weights, probs, shared_w = route_tokens(logits, c.num_shared_experts, c.num_routed, allowed)
        y = experts_forward(x, ids, weights, self.gate_up[:R], self.down[:R])
        for s in range(c.num_shared_experts):
            shared = expert_forward(x, self.gate_up[R + s], self.down[R + s])
            y = y + shared_w[:, s : s + 1].to(x.dtype) * shared
        return y, load_balancing_loss(probs, ids, plan.valid)


class DecoderLayer(nn.Module):
    def __init__(self, c: DemoModelConfig) -> None:
        super().__init__()
        self.pre_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.pre_feedforward_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MoE(c)


class Trunk(nn.Module):
    def __init__(self, c: DemoModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class EmoForTraining(nn.Module):
    def __init__(self, c: DemoModelConfig) -> None:
        super().__init__()
        self.config = c
        self.model = Trunk(c)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        # serving's tables (a non-persistent buffer: no parameter, no checkpoint tensor)
        self.rotary = RotaryEmbedding(RopeConfig(theta=c.rope_theta), c.head_dim, c.max_position_embeddings)

    def init_weights(self, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        out_std = 0.02 / math.sqrt(2 * self.config.num_layers)
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                continue
            std = out_std if name.endswith(("o_proj.weight", "mlp.down")) else 0.02
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=generator) * std)

    def forward(self, input_ids: torch.Tensor, plan: RoutePlan) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids [B, T] -> (logits [B, T, V] float32, mean load-balancing loss over layers)."""
        c = self.config
        B, T = input_ids.shape
        x = self.model.embed_tokens(input_ids)
        positions = plan.positions.reshape(-1)  # [B*T], each token's place in its document
        rope = self.rotary(positions, positions + 1, torch.float32)  # cos, sin [B*T, D]
        seg = plan.seg.view(B, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        mask = ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]  # [B, 1, T, T]
        lb_total = x.new_zeros((), dtype=torch.float32)
        blocks: list[DecoderLayer] = [b for b in self.model.layers if isinstance(b, DecoderLayer)]
        for layer, block in enumerate(blocks):
            x = x + block.self_attn(block.pre_attention_layernorm(x), rope, mask)
            y, lb = block.mlp(block.pre_feedforward_layernorm(x).view(B * T, -1), plan, layer)
            x = x + y.view(B, T, -1)
            lb_total = lb_total + lb
        return self.lm_head(self.model.norm(x)).float(), lb_total / c.num_layers

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors under the checkpoint's names (docs/emo.md, "Tensor names"), experts split per expert."""
        out: dict[str, torch.Tensor] = {}
        inter = self.config.intermediate_size
        for name, p in self.state_dict().items():
            if name.endswith("mlp.gate_up"):
                prefix = name[: -len("gate_up")]
                for e in range(p.shape[0]):
                    out[f"{prefix}experts.{e}.gate_proj.weight"] = p[e, :inter].contiguous()
                    out[f"{prefix}experts.{e}.up_proj.weight"] = p[e, inter:].contiguous()
            elif name.endswith("mlp.down"):
                prefix = name[: -len("down")]
                for e in range(p.shape[0]):
                    out[f"{prefix}experts.{e}.down_proj.weight"] = p[e].contiguous()
            else:
                out[name] = p
        return out

    def load_hf_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of `hf_state_dict`; every tensor must be present with its exact shape."""
        own = self.state_dict()
        rebuilt: dict[str, torch.Tensor] = {}
        for name, p in own.items():
            if name.endswith(("mlp.gate_up", "mlp.down")):
                prefix = name.rsplit(".", 1)[0] + ".experts"
                parts = []
                for e in range(p.shape[0]):
                    if name.endswith("gate_up"):
                        parts.append(
                            torch.cat(
                                [
                                    _take(tensors, f"{prefix}.{e}.{part}_proj.weight")
                                    for part in ("gate", "up")
                                ]
                            )
                        )
                    else:
                        parts.append(_take(tensors, f"{prefix}.{e}.down_proj.weight"))
                rebuilt[name] = torch.stack(parts)
            else:
                rebuilt[name] = _take(tensors, name)
            if rebuilt[name].shape != p.shape:
                raise ValueError(
                    f"tensor {name}: shape {tuple(rebuilt[name].shape)}, expected {tuple(p.shape)}"
                )
        self.load_state_dict({k: v.to(own[k].dtype) for k, v in rebuilt.items()})


def _take(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in tensors:
        raise ValueError(f"checkpoint lacks tensor {name}")
    return tensors[name]

"""The decode step as a pure function of fixed-shape device tensors.

``DecodeStep(token_ids, positions, kv_slots, slot_tables, attend_len)`` runs one token per row
through every layer and returns float32 logits. Its inputs are device tensors whose shapes depend
only on the batch size B (and the static ``attend_len``); nothing inside reads a value back to
the host, calls the expert store or branches on data, so it runs under
``torch.compile(fullgraph=True)`` and can be captured in a CUDA graph per batch size.

Experts are found through per-sequence slot tables (int32 [L, E_max], filled once when the
request's pool is pinned at admission; see ``MoETransformer.slot_table_row``): entry (l, e) is
the slab slot of expert e of layer l, -1 for a routable expert outside the request's pool (the
router bias is -inf there), 0 for fixed experts and padding (never read from the slab). Pinned
slots never move under the ExpertStore contract, so a table stays valid until its pins are
released at the end of the request.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from server.model.kv_cache import KVCache
from server.model.moe import MoEBlock
from server.model.rope import rope_table

if TYPE_CHECKING:
    from server.model.model import MoETransformer

MIN_ATTEND = 16


def attend_bucket(length: int, max_len: int) -> int:
    """Cache positions a step reads when rows are at most ``length`` long: the next power of
    two (at least MIN_ATTEND), capped at the cache length. Few distinct shapes, at most 2x the
    live prefix."""
    if length > max_len:
        raise ValueError(f"position {length - 1} is past the KV cache length {max_len}")
    bucket = MIN_ATTEND
    while bucket < length:
        bucket *= 2
    return min(bucket, max_len)


class DecodeStep:
    """The decode step of ``model`` over ``kv``; holds only constants made once (RoPE table,
    index vectors, the slab tensors, which never move under the ExpertStore contract)."""

    def __init__(self, model: MoETransformer, kv: KVCache) -> None:
        config = model.config
        if kv.device != model.device:
            raise ValueError(f"KV cache on {kv.device}, model on {model.device}")
        self.model, self.kv = model, kv
        device, dtype = model.device, model.dtype
        heads, kv_heads, D = config.num_heads, config.num_kv_heads, config.head_dim
        self.num_layers, self.max_experts = config.num_layers, config.max_experts
        self.rope = rope_table(model.rope, kv.max_len, dtype)[:, :, None, None, :]  # [S, 2, 1, 1, D]
        # v heads get cos 1 and sin 0: one rotation over the fused q/k/v leaves v as it is
        self.v_rows = (torch.arange(heads + 2 * kv_heads, device=device) >= heads + kv_heads)[:, None, None]
        unit = torch.stack((torch.ones(D), torch.zeros(D)))  # [2, D]: cos 1, sin 0
        self.unit = unit[:, None, None, :].to(device, dtype)  # [2, 1, 1, D]
        self.head_ids = torch.arange(2 * kv_heads, device=device)[None, :, None]  # [1, 2kv, 1]
        self.cache_positions = torch.arange(kv.max_len, device=device)  # [S]
        self.neg_inf = torch.tensor(float("-inf"), dtype=dtype, device=device)
        self.zero = torch.tensor(0.0, dtype=dtype, device=device)
        self.slabs: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        widths = [0]
        for layer in model.decoder_layers:
            if isinstance(layer.mlp, MoEBlock):
                slab = model.expert_store.slab(layer.mlp.layer)
                self.slabs.append((slab["gate_up"], slab["down"]))
                widths.append(layer.mlp.router_fixed.shape[0])
            else:
                self.slabs.append(None)
        # router bias columns past E_max: the fixed experts' gate/up rows of the fused matmul
        self.bias_pad = max(0, max(widths) - self.max_experts)

    def __call__(
        self,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_slots: torch.Tensor,
        slot_tables: torch.Tensor,
        attend_len: int,
    ) -> torch.Tensor:
        """token_ids, positions, kv_slots: int64 [B]; slot_tables: int32 [B, L, E_max];
        ``attend_len``: cache positions read (> every position). Returns float32 logits [B, V].
        The caller checks positions against the cache length (it knows them on the host)."""
        model, kv = self.model, self.kv
        B = token_ids.shape[0]
        x = F.embedding(token_ids, model.embed)  # [B, H]
        rope = self.rope.index_select(0, positions)
        cos_sin = torch.where(self.v_rows, self.unit, rope)  # [B, 2, h+2kv, 1, D]
        cos, signed_sin = cos_sin.unbind(1)  # [B, h+2kv, 1, D] each
        cache_positions = self.cache_positions
        if attend_len != kv.max_len:
            cache_positions = cache_positions[:attend_len]
        visible = cache_positions <= positions.view(B, 1, 1, 1)  # [B, 1, 1, attend_len]
        write_index = (kv_slots.view(B, 1, 1), self.head_ids, positions.view(B, 1, 1))
        tables = slot_tables.unbind(1)  # L x [B, E_max]
        bias = torch.where(slot_tables < 0, self.neg_inf, self.zero)  # [B, L, E_max]
        if self.bias_pad:
            bias = F.pad(bias, (0, self.bias_pad))
        biases = bias.unbind(1)
        for index, layer in enumerate(model.decoder_layers):
            attn = layer.attn.decode_step(layer.attn_norm(x), cos, signed_sin, kv, write_index, kv_slots,
                                          attend_len, visible)
            h = x + attn
            normed = layer.mlp_norm(h)
            slab = self.slabs[index]
            if isinstance(layer.mlp, MoEBlock) and slab is not None:
                x = h + layer.mlp.decode_step(normed, tables[index], biases[index], *slab)
            else:
                x = h + layer.mlp(normed)
        return model.logits(x)

    def check(self, batch: int, slot_tables: torch.Tensor) -> None:
        """Shapes a step needs (host-side, before a step)."""
        expected = (batch, self.num_layers, self.max_experts)
        if tuple(slot_tables.shape) != expected or slot_tables.dtype != torch.int32:
            raise ValueError(f"slot_tables must be int32 {list(expected)}, got {slot_tables.dtype} "
                             f"{list(slot_tables.shape)}")

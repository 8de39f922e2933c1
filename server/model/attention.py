"""Causal grouped-query attention over the KV cache (scaled_dot_product_attention)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from server.model.config import ModelConfig
from server.model.kv_cache import KVCache
from server.model.layers import RMSNorm, frozen
from server.model.rope import apply_rope


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, w: dict[str, torch.Tensor | None]) -> None:
        """``w``: q, k, v, o weights; q_bias.. o_bias and q_norm, k_norm (None when absent)."""
        super().__init__()
        self.layer = layer
        self.heads, self.kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q, self.k, self.v, self.o = (frozen(w[n]) for n in ("q", "k", "v", "o"))  # type: ignore[arg-type]
        self.q_bias, self.k_bias, self.v_bias, self.o_bias = (
            None if w.get(n) is None else frozen(w[n]) for n in ("q_bias", "k_bias", "v_bias", "o_bias")  # type: ignore[arg-type]
        )
        self.qk_norm, self.clip = config.qk_norm, config.clip_qkv
        eps = config.rms_norm_eps
        self.q_norm = RMSNorm(w["q_norm"], eps) if config.qk_norm != "none" else None  # type: ignore[arg-type]
        self.k_norm = RMSNorm(w["k_norm"], eps) if config.qk_norm != "none" else None  # type: ignore[arg-type]

    def _qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x [N, H] -> q [N, heads, D], k and v [N, kv_heads, D], rotated."""
        q = F.linear(x, self.q, self.q_bias)
        k = F.linear(x, self.k, self.k_bias)
        v = F.linear(x, self.v, self.v_bias)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)  # type: ignore[misc]
        if self.clip is not None:
            q, k, v = (t.clamp(-self.clip, self.clip) for t in (q, k, v))
        n = x.shape[0]
        q = q.view(n, self.heads, self.head_dim)
        k = k.view(n, self.kv_heads, self.head_dim)
        v = v.view(n, self.kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)  # type: ignore[misc]
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def prefill(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: KVCache | None, slot: int
    ) -> torch.Tensor:
        """The whole prompt (positions 0..T-1) of one sequence. x [T, H] -> [T, H]. ``kv`` None:
        nothing is kept (a pool computed from examples needs no cache)."""
        T = x.shape[0]
        q, k, v = self._qkv(x, cos, sin)
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [heads, T, D]
        if kv is not None:
            kv.k[self.layer][slot, :, :T] = k
            kv.v[self.layer][slot, :, :T] = v
        out = F.scaled_dot_product_attention(
            q[None], k[None], v[None], is_causal=True, enable_gqa=self.kv_heads != self.heads
        )  # [1, heads, T, D]
        return F.linear(out[0].transpose(0, 1).reshape(T, -1), self.o, self.o_bias)

    def decode(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv: KVCache,
        slots: torch.Tensor,
        positions: torch.Tensor,
        attend_len: int,
        visible: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One token per row b at positions[b] of slot slots[b]. x [B, H] -> [B, H].

        ``attend_len`` = max(positions) + 1: the cache prefix read for every row; a row masks
        what lies past its own position. ``visible`` [B, 1, 1, S] bool: that mask, when the
        caller built it once for all layers (``decode_mask``).
        """
        B = x.shape[0]
        q, k, v = self._qkv(x, cos, sin)
        kv.k[self.layer][slots, :, positions] = k  # [B, kv_heads, D]
        kv.v[self.layer][slots, :, positions] = v
        # index_select over the live prefix copies only S positions per row, about 3x faster
        # on CPU than advanced indexing of the same elements
        keys = kv.k[self.layer][:, :, :attend_len].index_select(0, slots)  # [B, kv_heads, S, D]
        values = kv.v[self.layer][:, :, :attend_len].index_select(0, slots)
        if visible is None:
            visible = decode_mask(positions, attend_len)
        out = F.scaled_dot_product_attention(
            q[:, :, None, :], keys, values, attn_mask=visible, enable_gqa=self.kv_heads != self.heads,
        )  # [B, heads, 1, D]
        return F.linear(out.reshape(B, -1), self.o, self.o_bias)


def decode_mask(positions: torch.Tensor, attend_len: int) -> torch.Tensor:
    """[B, 1, 1, S] bool: row b sees cache positions 0..positions[b]."""
    visible = torch.arange(attend_len, device=positions.device)[None, :] <= positions[:, None]  # [B, S]
    return visible[:, None, None, :]

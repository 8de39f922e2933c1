"""Causal grouped-query attention over the KV cache (scaled_dot_product_attention)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from server.model.config import ModelConfig
from server.model.kv_cache import KVCache
from server.model.layers import RMSNorm, frozen
from server.model.rope import apply_rope, apply_rope_rolled


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, w: dict[str, torch.Tensor | None]) -> None:
        """``w``: q, k, v, o weights; q_bias.. o_bias and q_norm, k_norm (None when absent)."""
        super().__init__()
        self.layer = layer
        self.heads, self.kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        # q, k and v live in one fused weight (one matmul); the names stay as views of it
        self.qkv = frozen(torch.cat([w["q"], w["k"], w["v"]]))  # type: ignore[list-item]  # [(h+2kv)*D, H]
        q_out, kv_out = self.heads * self.head_dim, self.kv_heads * self.head_dim
        self.q, self.k, self.v = self.qkv.detach().split_with_sizes([q_out, kv_out, kv_out])
        self.qkv_bias = None
        if w.get("q_bias") is not None:
            self.qkv_bias = frozen(torch.cat([w["q_bias"], w["k_bias"], w["v_bias"]]))  # type: ignore[list-item]
        self.o = frozen(w["o"])  # type: ignore[arg-type]
        self.o_bias = None if w.get("o_bias") is None else frozen(w["o_bias"])  # type: ignore[arg-type]
        H = self.o.shape[0]
        heads_total = self.heads + 2 * self.kv_heads
        # per-head views for the decode step's einsums (no copies)
        self.qkv_heads = self.qkv.detach().view(heads_total, 1, self.head_dim, H)  # [h+2kv, 1, D, H]
        self.o_heads = self.o.detach().view(H, self.heads, self.head_dim)  # [H, h, D]
        self.qk_norm, self.clip = config.qk_norm, config.clip_qkv
        eps = config.rms_norm_eps
        self.q_norm = RMSNorm(w["q_norm"], eps) if config.qk_norm != "none" else None  # type: ignore[arg-type]
        self.k_norm = RMSNorm(w["k_norm"], eps) if config.qk_norm != "none" else None  # type: ignore[arg-type]

    def _qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x [N, H] -> q [N, heads, D], k and v [N, kv_heads, D], rotated."""
        q_out, kv_out = self.heads * self.head_dim, self.kv_heads * self.head_dim
        q, k, v = F.linear(x, self.qkv, self.qkv_bias).split_with_sizes([q_out, kv_out, kv_out], dim=-1)
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


    def decode_step(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        signed_sin: torch.Tensor,
        kv: KVCache,
        write_index: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        kv_slots: torch.Tensor,
        attend_len: int,
        visible: torch.Tensor,
    ) -> torch.Tensor:
        """``decode`` as a static-shape function: no host reads, shapes fixed by B and
        ``attend_len``. x [B, H] -> [B, H].

        cos, signed_sin [B, h+2kv, 1, D]: the rows of v heads hold 1 and 0, so one rotation
        covers the fused q/k/v. ``write_index``: (kv_slots, head ids [1, 2kv, 1], positions), the
        slots and positions as [B, 1, 1], into ``kv.heads`` (keys and values of a slot as 2kv
        heads). ``visible`` [B, 1, 1, attend_len] bool.
        """
        B, D = x.shape[0], self.head_dim
        if self.qkv_bias is None and self.qk_norm != "full" and self.clip is None:
            qkv = torch.einsum("bh,nqdh->bnqd", x, self.qkv_heads)  # [B, h+2kv, 1, D]
        else:
            flat = F.linear(x, self.qkv, self.qkv_bias)
            if self.qk_norm == "full":
                sizes = [self.heads * D, self.kv_heads * D, self.kv_heads * D]
                q, k, v = flat.split_with_sizes(sizes, dim=-1)
                flat = torch.cat((self.q_norm(q), self.k_norm(k), v), dim=-1)  # type: ignore[misc]
            if self.clip is not None:
                flat = flat.clamp(-self.clip, self.clip)
            qkv = flat.view(B, -1, 1, D)
        if self.qk_norm == "head":
            q, k, v = qkv.split_with_sizes([self.heads, self.kv_heads, self.kv_heads], dim=1)
            qkv = torch.cat((self.q_norm(q), self.k_norm(k), v), dim=1)  # type: ignore[misc]
        qkv = apply_rope_rolled(qkv, cos, signed_sin)
        # q [B, h, 1, D], new_kv [B, 2kv, 1, D]
        q, new_kv = qkv.split_with_sizes([self.heads, 2 * self.kv_heads], dim=1)
        kv.heads[self.layer].index_put_(write_index, new_kv if kv.dtype == x.dtype else new_kv.to(kv.dtype))
        cache = kv.kv[self.layer]
        if attend_len != kv.max_len:
            cache = cache[:, :, :, :attend_len]
        # the one copy left: each row's K/V prefix (attend_len positions), see docs/decode-step.md
        keys, values = cache.index_select(0, kv_slots).unbind(1)  # [B, kv, S, D] each
        if kv.dtype != x.dtype:
            keys, values = keys.to(x.dtype), values.to(x.dtype)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible,
                                             enable_gqa=self.kv_heads != self.heads)  # [B, h, 1, D]
        out = torch.einsum("bhqd,ohd->bo", out, self.o_heads)
        return out if self.o_bias is None else out + self.o_bias


def decode_mask(positions: torch.Tensor, attend_len: int) -> torch.Tensor:
    """[B, 1, 1, S] bool: row b sees cache positions 0..positions[b]."""
    visible = torch.arange(attend_len, device=positions.device)[None, :] <= positions[:, None]  # [B, S]
    return visible[:, None, None, :]

"""Rotary position embeddings (rotate_half convention) with transformers' scaling types."""

from __future__ import annotations

import math

import torch

from server.model.config import RopeConfig


def _base_inv_freq(theta: float | torch.Tensor, dim: int) -> torch.Tensor:
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim  # [dim/2]
    return 1.0 / (theta ** exponents)


def _llama3(rope: RopeConfig, inv_freq: torch.Tensor) -> torch.Tensor:
    old_len = rope.original_max_position_embeddings
    assert old_len is not None
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    base, factor = rope.theta, rope.factor
    original = rope.original_max_position_embeddings
    assert original is not None

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim)
        else:
            attention_factor = mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp  # 1 = keep the original frequency
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


class RotaryEmbedding(torch.nn.Module):
    """cos/sin tables for positions; frequencies follow ``RopeConfig`` exactly as transformers."""

    inv_freq: torch.Tensor  # registered buffer [D/2] fp32

    def __init__(self, rope: RopeConfig, head_dim: int, max_position_embeddings: int) -> None:
        super().__init__()
        self.rope, self.dim, self.max_pos = rope, head_dim, max_position_embeddings
        self.attention_scaling = 1.0
        inv_freq = _base_inv_freq(rope.theta, head_dim)
        if rope.rope_type == "linear":
            inv_freq = inv_freq / rope.factor
        elif rope.rope_type == "llama3":
            inv_freq = _llama3(rope, inv_freq)
        elif rope.rope_type == "yarn":
            inv_freq, self.attention_scaling = _yarn(rope, head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [D/2] fp32

    def _dynamic_inv_freq(self, seq_lens: torch.Tensor) -> torch.Tensor:
        """Dynamic NTK: the base grows with the sequence length seen so far (per token)."""
        s = seq_lens.float().clamp(min=self.max_pos)  # [N]
        f, d = self.rope.factor, self.dim
        base = self.rope.theta * ((f * s / self.max_pos) - (f - 1)) ** (d / (d - 2))  # [N]
        exponents = torch.arange(0, d, 2, dtype=torch.int64, device=s.device).float() / d
        return 1.0 / (base[:, None] ** exponents[None, :])  # [N, D/2]

    def forward(
        self, positions: torch.Tensor, seq_lens: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions, seq_lens: [N] -> cos, sin [N, D] in ``dtype``.

        ``seq_lens`` (the length of each token's sequence in this forward) only matters for
        dynamic scaling, where transformers recomputes the frequencies from the longest position.
        """
        if self.rope.rope_type == "dynamic":
            freqs = positions.float()[:, None] * self._dynamic_inv_freq(seq_lens)
        else:
            freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [N, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [N, heads, D]; cos, sin: [N, D]."""
    return x * cos[:, None, :] + rotate_half(x) * sin[:, None, :]


def rope_table(rotary: RotaryEmbedding, length: int, dtype: torch.dtype) -> torch.Tensor:
    """[length, 2, D]: cos and the signed sin of every decode position p (a decode row at p is a
    sequence of p + 1 tokens, which is what dynamic scaling reads). The values are those the
    per-step computation gives, computed once; ``apply_rope_rolled`` uses them."""
    positions = torch.arange(length, device=rotary.inv_freq.device)
    cos, sin = rotary(positions, positions + 1, dtype)  # [length, D] each
    half = cos.shape[-1] // 2
    signed_sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
    return torch.stack((cos, signed_sin), dim=1)


def apply_rope_rolled(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """``apply_rope`` with the sign of rotate_half folded into the table: rotate_half(x) * sin
    equals roll(x, D/2) * signed_sin element for element (negation is exact), in one op fewer."""
    return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * signed_sin

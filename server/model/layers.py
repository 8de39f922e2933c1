"""Small building blocks: RMSNorm (computed in fp32) and the SwiGLU MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def as_float(t: torch.Tensor) -> torch.Tensor:
    """``t.float()`` without dispatching anything when ``t`` is float32 already."""
    return t if t.dtype == torch.float32 else t.float()


def frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class RMSNorm(nn.Module):
    """w * x / sqrt(mean(x^2) + eps), the statistics in fp32, the product in the weight's dtype."""

    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight, self.eps = frozen(weight), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``RMSNorm`` as a function of its weight, so that the demo trainer (trainable weights)
    computes exactly what serving computes."""
    # F.rms_norm computes exactly x * rsqrt(mean(x^2) + eps) (* w): one op instead of eight
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    normed = F.rms_norm(x.float(), weight.shape, None, eps)
    return weight * normed.to(x.dtype)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); used for dense layers and Qwen2-MoE's shared expert."""

    def __init__(
        self,
        gate: torch.Tensor,
        up: torch.Tensor,
        down: torch.Tensor,
        biases: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.gate, self.up, self.down = frozen(gate), frozen(up), frozen(down)  # [I,H] [I,H] [H,I]
        b = biases or (None, None, None)
        self.gate_bias = None if b[0] is None else frozen(b[0])
        self.up_bias = None if b[1] is None else frozen(b[1])
        self.down_bias = None if b[2] is None else frozen(b[2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.silu(F.linear(x, self.gate, self.gate_bias)) * F.linear(x, self.up, self.up_bias)
        return F.linear(hidden, self.down, self.down_bias)


def expert_forward(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """One expert on its tokens. x [n, H]; gate_up [2I, H] (gate rows, then up rows); down [H, I]."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)  # [n, I] each
    return F.linear(F.silu(gate) * up, down)

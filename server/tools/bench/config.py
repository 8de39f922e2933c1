"""What `emo-serve bench decode` measures: the validated run configuration and its scenarios.

A scenario is one (routing, device tier) pair served through the Engine:
- routing: an expert pool of P per MoE layer, or "full" per-token routing;
- tier: the fraction f of routable experts the device tier holds, as ``ceil(f * |R_l|)`` slots
  per MoE layer (so f = 1/4 holds exactly one EMO default pool, ceil(|R|/4) per layer).
  f = 1.0 means full-resident: every expert on the device (ResidentExpertStore, no paging).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from server.model.dtypes import COMPUTE_DTYPES

RESIDENT = 1.0  # tier fraction served by ResidentExpertStore
CPU_PRESET, GPU_PRESET = "tiny", "emo-1b14b"
Routing = int | Literal["full"]


@dataclass(frozen=True)
class DecodeBenchConfig:
    """``model_dir`` None: a synthetic checkpoint of ``preset`` is written under ``out_dir``.
    ``pools`` None: the model's default pool and half of it (EMO-1b14b: 32 and 16).
    ``tiers``: device-tier fractions in (0, 1]; 1.0 = full-resident (skipped when it does not fit).
    """

    out_dir: Path
    device: str
    dtype: str  # bf16 | fp16 | fp32
    model_dir: Path | None = None
    preset: str = CPU_PRESET
    synth_layers: int | None = None  # synthetic checkpoint only: fewer layers, same per-layer shape
    tiers: tuple[float, ...] = (0.25, 0.5, RESIDENT)
    pools: tuple[int, ...] | None = None
    full_routing: bool = True
    prompt_tokens: int = 64
    decode_tokens: int = 16
    concurrency: int = 16
    domains: int = 4
    repeats: int = 3  # batch-1 decode and warm TTFT: best of this many runs (noise on shared machines)
    seed: int = 0
    reference_modeling: Path | None = None
    pinned_gb_s: float = 53.9  # pinned host->device bandwidth the cold-TTFT target is judged by
    parity: bool = True
    fullgraph: bool = True  # compile the decode step with fullgraph=True for the decode_step report

    def __post_init__(self) -> None:
        if self.dtype not in COMPUTE_DTYPES:
            raise ValueError(f"dtype must be bf16, fp16 or fp32, got {self.dtype!r}")
        if not self.tiers or any(not (isinstance(t, float) and 0.0 < t <= 1.0) for t in self.tiers):
            raise ValueError(f"tiers must be fractions in (0, 1], got {self.tiers!r}")
        if self.pools is not None and any(
                isinstance(p, bool) or not isinstance(p, int) or p < 1 for p in self.pools):
            raise ValueError(f"pools must be integers >= 1, got {self.pools!r}")
        if self.pools == () and not self.full_routing:
            raise ValueError("nothing to measure: no pool and no full routing")
        for name, low in (("prompt_tokens", 2), ("decode_tokens", 2), ("concurrency", 1), ("domains", 1),
                          ("repeats", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.synth_layers is not None and (isinstance(self.synth_layers, bool) or self.synth_layers < 1):
            raise ValueError(f"synth_layers must be an integer >= 1, got {self.synth_layers!r}")
        if not self.pinned_gb_s > 0:
            raise ValueError(f"pinned_gb_s must be > 0, got {self.pinned_gb_s!r}")
        if self.model_dir is not None and not Path(self.model_dir).is_dir():
            raise ValueError(f"model_dir {self.model_dir} is not a directory")
        if self.reference_modeling is not None and not Path(self.reference_modeling).is_file():
            raise ValueError(f"reference_modeling {self.reference_modeling} is not a file")

    @property
    def max_model_len(self) -> int:
        """KV slot length: the longest request the benchmark sends, plus slack."""
        return self.prompt_tokens + self.decode_tokens + 8


@dataclass(frozen=True)
class Scenario:
    routing: Routing
    tier: float

    @property
    def resident(self) -> bool:
        return self.tier >= RESIDENT

    @property
    def name(self) -> str:
        route = "full" if self.routing == "full" else f"pool{self.routing}"
        where = "resident" if self.resident else f"tier{round(self.tier * 100)}%"
        return f"{route}@{where}"


def tier_slots(routable_per_layer: list[int], tier: float) -> int:
    """Device slots of a tier fraction: ceil(tier * |R_l|) per MoE layer, summed."""
    return sum(math.ceil(tier * r - 1e-9) for r in routable_per_layer)


def scenarios(cfg: DecodeBenchConfig, pools: tuple[int, ...]) -> list[Scenario]:
    routings: list[Routing] = [*pools, *(["full"] if cfg.full_routing else [])]  # type: ignore[list-item]
    tiers = sorted(set(cfg.tiers), reverse=True)  # resident first: the baseline of every ratio
    return [Scenario(r, t) for t in tiers for r in routings]

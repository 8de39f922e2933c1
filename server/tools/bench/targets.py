"""The GPU targets of docs/gpu-performance.md, checked against one benchmark run (informative
on CPU; they are set for an H100 serving Emo_1b14b_1T in bf16).

For the default pool P (the first pool measured):
- batch-1 decode with the pool resident >= 600 tokens/s (H100, EMO-1b14b);
- P on a 25% tier decodes at batch 1 at >= 95% of full-resident;
- cold TTFT <= 1.5 x (bytes paged / pinned host->device bandwidth) + warm TTFT;
- N concurrent requests over the domains on a 50% tier >= 70% of full-resident;
- peak device memory <= budget + a fixed workspace (reported as the excess).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from server.tools.bench.scenario import ScenarioResult

PINNED_GB_S = 53.9  # docs/emo.md: pinned host->device, H100 PCIe Gen5 (override with --pinned-gbps)
WORKSPACE_MB = 1024.0  # the fixed workspace allowed above trunk + expert tier + KV slots


@dataclass(frozen=True)
class Target:
    name: str
    value: float | None  # what was measured
    bound: float  # what it must reach (>=) or stay under (<=, see ``at_most``)
    at_most: bool = False

    @property
    def met(self) -> bool | None:
        if self.value is None or not math.isfinite(self.value):
            return None
        return self.value <= self.bound if self.at_most else self.value >= self.bound

    def line(self) -> str:
        value = "-" if self.value is None else f"{self.value:.3g}"
        verdict = {True: "met", False: "NOT met", None: "not measured"}[self.met]
        return f"{self.name}: {value} {'<=' if self.at_most else '>='} {self.bound:.3g}: {verdict}"


def _find(rows: list[ScenarioResult], routing: int | str, tier: float) -> ScenarioResult | None:
    return next((r for r in rows if r.routing == routing and abs(r.tier - tier) < 1e-9 and r.skipped is None),
                None)


def _get(row: ScenarioResult | None, attr: str) -> float | None:
    return None if row is None else float(getattr(row, attr))


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def check_targets(rows: list[ScenarioResult], pool: int, pinned_gb_s: float = PINNED_GB_S) -> list[Target]:
    resident, quarter, half = _find(rows, pool, 1.0), _find(rows, pool, 0.25), _find(rows, pool, 0.5)
    out = [Target(f"pool{pool}@resident batch-1 tok/s", _get(resident, "decode_tps_b1"), 600.0)]
    out.append(Target(f"pool{pool}@tier25% / resident, batch-1",
                      _ratio(_get(quarter, "decode_tps_b1"), _get(resident, "decode_tps_b1")), 0.95))
    if quarter is not None and quarter.ttft_cold_s is not None and quarter.cold_paged_bytes is not None:
        bound = 1.5 * quarter.cold_paged_bytes / (pinned_gb_s * 1e9) + quarter.ttft_warm_s
        out.append(Target(f"pool{pool}@tier25% cold TTFT s", quarter.ttft_cold_s, bound, at_most=True))
    concurrent = _ratio(_get(half, "decode_tps_concurrent"), _get(resident, "decode_tps_concurrent"))
    out.append(Target(f"pool{pool}@tier50% / resident, concurrent", concurrent, 0.70))
    for r in (resident, quarter, half):
        if r is not None and r.budget_bytes and r.peak_device_bytes is not None:
            out.append(Target(f"{r.name} peak - budget, MB", (r.peak_device_bytes - r.budget_bytes) / 1e6,
                              WORKSPACE_MB, at_most=True))
    return out

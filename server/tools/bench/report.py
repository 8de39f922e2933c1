"""The benchmark's outputs: one JSON file, one Markdown table, PNG plots against tier size."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from server.tools.bench.decode_step import MARKDOWN_HEADER as DECODE_STEP_HEADER
from server.tools.bench.decode_step import DecodeStepReport
from server.tools.bench.parity import ParityResult
from server.tools.bench.plot import line_chart
from server.tools.bench.scenario import ScenarioResult
from server.tools.bench.targets import Target

JSON_NAME, MARKDOWN_NAME = "decode_bench.json", "decode_bench.md"
PLOTS = {
    "tokens_per_s_b1.png": ("decode_tps_b1", "Batch-1 decode tokens/s"),
    "tokens_per_s_concurrent.png": ("decode_tps_concurrent", "Concurrent requests: tokens/s"),
    "hit_rate.png": ("hit_rate", "Device-tier hit rate"),
}


@dataclass
class BenchResult:
    header: dict[str, Any]
    rows: list[ScenarioResult] = field(default_factory=list)
    parity: ParityResult | None = None
    decode_step: DecodeStepReport | None = None
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def baseline(self, row: ScenarioResult) -> ScenarioResult | None:
        """The full-resident row with the same routing (what the targets compare against)."""
        return next((b for b in self.rows if b.routing == row.routing and b.tier >= 1.0
                     and b.name != "hf-reference" and b.skipped is None), None)


def _clean(value: Any) -> Any:
    """JSON has no NaN / inf: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def to_json(result: BenchResult) -> dict[str, Any]:
    rows = []
    for row in result.rows:
        base = result.baseline(row)
        ratio = {k: getattr(row, k) / getattr(base, k) if base and getattr(base, k) else None
                 for k in ("decode_tps_b1", "decode_tps_concurrent")}
        rows.append(asdict(row) | {"vs_resident": ratio})
    targets = [asdict(t) | {"met": t.met} for t in result.targets]
    cleaned: dict[str, Any] = _clean({
        "header": result.header, "rows": rows, "targets": targets,
        "parity": None if result.parity is None else asdict(result.parity),
        "decode_step": None if result.decode_step is None else asdict(result.decode_step),
        "notes": result.notes})
    return cleaned


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


def _peak(peak: int | None, budget: int) -> str:
    """"peak / budget"; the peak is "-" where nothing measured it (CPU)."""
    if not budget:
        return "-"
    return f"{'-' if peak is None else _mb(peak)} / {_mb(budget)}"


def markdown(result: BenchResult) -> str:
    h = result.header
    conc = h.get("concurrency", "N")
    lines = [
        f"## emo-serve bench decode: {h.get('checkpoint')} on {h.get('device')} ({h.get('device_name')}), "
        f"{h.get('dtype')}",
        "",
        f"prompt {h.get('prompt_tokens')} tokens, {h.get('decode_tokens')} tokens decoded per request, "
        f"{conc} concurrent requests over {h.get('domains')} domains",
        "",
        f"| scenario | slots | b1 tok/s | x{conc} tok/s | vs resident b1 / x{conc} | TTFT cold s | "
        "TTFT warm s | cold paged | hit rate | paged | H2D GB/s | peak / budget |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result.rows:
        if r.skipped is not None:
            lines.append(f"| {r.name} | skipped: {r.skipped} |" + " |" * 10)
            continue
        base = result.baseline(r)
        vs = "-" if base is None or base is r else (
            f"{r.decode_tps_b1 / base.decode_tps_b1:.2f} / "
            f"{r.decode_tps_concurrent / base.decode_tps_concurrent:.2f}")
        cells = [r.name, str(r.device_slots), _num(r.decode_tps_b1, ".1f"),
                 _num(r.decode_tps_concurrent, ".1f"), vs,
                 _num(r.ttft_cold_s, ".3f"), _num(r.ttft_warm_s, ".3f"),
                 "-" if r.cold_paged_bytes is None else _mb(r.cold_paged_bytes), _num(r.hit_rate, ".1%"),
                 _mb(r.bytes_paged), _num(r.h2d_gb_s, ".2f"),
                 _peak(r.peak_device_bytes, r.budget_bytes)]
        lines.append("| " + " | ".join(cells) + " |")
    if result.decode_step is not None:
        lines += ["", *DECODE_STEP_HEADER, result.decode_step.line()]
    if result.parity is not None:
        lines += ["", result.parity.line()]
    if result.targets:
        lines += ["", "Targets (set for an H100 with EMO-1b14b; informative elsewhere):", ""]
        lines += [f"- {t.line()}" for t in result.targets]
    lines += [""] + [f"- {n}" for n in result.notes]
    for r in result.rows:
        lines += [f"- {r.name}: {n}" for n in r.notes]
    return "\n".join(lines).rstrip() + "\n"


def plot(result: BenchResult, out_dir: Path) -> list[str]:
    """One PNG per metric: x = device-tier fraction, one line per routing. Returns the backends."""
    backends = []
    rows = [r for r in result.rows if r.skipped is None and r.name != "hf-reference"]
    labels = list(dict.fromkeys("full" if r.routing == "full" else f"pool {r.routing}" for r in rows))
    for name, (attr, title) in PLOTS.items():
        series = [(label, [(r.tier, float(getattr(r, attr))) for r in rows
                           if ("full" if r.routing == "full" else f"pool {r.routing}") == label])
                  for label in labels]
        rate = attr == "hit_rate"
        backends.append(line_chart(series, title, "device tier (share of experts)",
                                   "hit rate" if rate else "tokens/s", out_dir / name, 1.0 if rate else None))
    return backends


def write_all(result: BenchResult, out_dir: Path) -> tuple[str, list[Path]]:
    """Write JSON, Markdown and plots into ``out_dir``; returns the Markdown and the files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    text = markdown(result)
    backends = plot(result, out_dir)
    result.header["plot_backend"] = backends[0] if backends else None
    (out_dir / JSON_NAME).write_text(json.dumps(to_json(result), indent=2, allow_nan=False))
    (out_dir / MARKDOWN_NAME).write_text(text)
    return text, [out_dir / JSON_NAME, out_dir / MARKDOWN_NAME, *(out_dir / n for n in PLOTS)]

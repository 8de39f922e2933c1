"""End-to-end serving benchmarks (``emo-serve bench decode``): decode speed, time to first token,
paging and memory of expert pools and per-token offloading against full residency, through the
Engine, with JSON / Markdown / PNG reports."""

from server.bench.config import DecodeBenchConfig, Scenario
from server.bench.run import run_decode_bench

__all__ = ["DecodeBenchConfig", "Scenario", "run_decode_bench"]

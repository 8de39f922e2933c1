"""`emo-serve bench gpu-check`: the first thing to run on a GPU (one H100/H200, no network,
about 5-8 minutes).

On a 4-layer checkpoint of the Emo_1b14b shape (written once under --out, or --model) it checks
and measures, then prints one Markdown table and writes gpu_check.json:
- bf16 CUDA decode logits against the fp32 CPU path (same prompt, pool and tokens);
- CUDA-graph capture of the decode step (per batch bucket) and graph replay against the eager step;
- batch-1 and batch-16 decode tokens/s through the graphs (and batch 1 without them);
- pool 32 on a 25% device tier against full-resident, batch 1;
- device kernels and host syncs per decode token (profiler, sync debug mode);
- paging GB/s (host tier -> device) next to the measured pinned host->device bandwidth;
- peak device memory against the budget (trunk + expert slabs + KV cache).
A failing check is reported in the table, the others still run. On a machine without CUDA it
refuses at once (``GpuUnavailable``).
"""

from __future__ import annotations

import gc
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from server.model.config import load_config
from server.model.kv_cache import KVCache
from server.model.loader import LoadedModel, load_model
from server.tools.bench.decode_step import PoolRow, check_fullgraph, count_cuda_kernels, count_host_syncs

PRESET, LAYERS, SEED = "emo-1b14b", 4, 0
PROMPT_TOKENS, PARITY_TOKENS, B1_TOKENS, B16_TOKENS, BATCH = 64, 8, 128, 32, 16
JSON_NAME = "gpu_check.json"


class GpuUnavailable(RuntimeError):
    """No CUDA device: the check has nothing to measure here."""


@dataclass
class Check:
    name: str
    value: str
    target: str = ""
    ok: bool | None = None  # None: informative


@dataclass
class GpuCheckResult:
    header: dict[str, Any]
    checks: list[Check] = field(default_factory=list)
    numbers: dict[str, Any] = field(default_factory=dict)

    def add(self, name: str, value: str, target: str = "", ok: bool | None = None) -> None:
        self.checks.append(Check(name, value, target, ok))

    def markdown(self) -> str:
        h = self.header
        lines = [f"## emo-serve bench gpu-check: {h['device_name']}, {h['checkpoint_shape']}, bf16",
                 "", "| check | result | target | |", "|---|---|---|---|"]
        mark = {True: "ok", False: "FAIL", None: ""}
        lines += [f"| {c.name} | {c.value} | {c.target} | {mark[c.ok]} |" for c in self.checks]
        return "\n".join(lines) + "\n"


def _checkpoint(out_dir: Path, model_dir: Path | None, log: Callable[[str], None]) -> Path:
    if model_dir is not None:
        return model_dir
    target = out_dir / f"synth-{PRESET}-{LAYERS}layers-seed{SEED}"
    if (target / "config.json").is_file():
        log(f"reusing {target}")
        return target
    from server.tools.synth import write_checkpoint

    log(f"writing a {LAYERS}-layer {PRESET} checkpoint to {target} (bf16, several GB)")
    start = time.perf_counter()
    write_checkpoint(target, PRESET, seed=SEED, overrides={"num_hidden_layers": LAYERS})
    log(f"written in {time.perf_counter() - start:.0f} s")
    return target


def _free(*objects: object) -> None:
    del objects
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _teacher_forced(loaded: LoadedModel, pool: int,
                    forced: list[int] | None) -> tuple[torch.Tensor, list[int]]:
    """Prefill the parity prompt with ``pool``, then decode PARITY_TOKENS tokens; ``forced``:
    feed these tokens (else the greedy ones). Returns float32 logits [N, V] on the CPU, tokens."""
    row = PoolRow(loaded, pool, PROMPT_TOKENS, extra=PARITY_TOKENS + 8)
    logits, tokens = [], []
    try:
        for i in range(PARITY_TOKENS):
            if forced is not None:
                row.token = forced[i]
            tokens.append(row.token)
            logits.append(row.step()[0].float().cpu())
    finally:
        row.release()
    return torch.stack(logits), tokens


def _decode_rate(model: Any, rows: list[PoolRow], steps: int) -> float:
    """Tokens/s of ``steps`` greedy decode steps of ``rows`` as one batch (sampling included)."""
    kv = rows[0].kv
    tables = torch.stack([r.table for r in rows])
    tokens = torch.tensor([r.token for r in rows])
    positions = [r.position for r in rows]
    slots = torch.tensor([r.slot for r in rows])
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(steps):
        logits = model.decode(tokens, torch.tensor([p + i for p in positions]), kv, slots, None,
                              slot_tables=tables)
        tokens = logits.argmax(-1).cpu()  # the sampled tokens cross to the host, as in serving
    torch.cuda.synchronize()
    return len(rows) * steps / (time.perf_counter() - start)


def _batch_rows(loaded: LoadedModel, pool: int, batch: int, steps: int) -> list[PoolRow]:
    """``batch`` pool rows over one KV cache (slot i = row i), prefilled with different prompts."""
    kv = KVCache(loaded.config, batch, PROMPT_TOKENS + steps + 8, loaded.model.device, loaded.model.dtype)
    return [PoolRow(loaded, pool, PROMPT_TOKENS, kv=kv, slot=i, seed=i) for i in range(batch)]


def _budget_bytes(loaded: LoadedModel, kv_bytes: int) -> int:
    store = loaded.model.expert_store
    slabs = {t.data_ptr(): t.numel() * t.element_size()
             for layer in loaded.config.moe_layers for t in store.slab(layer).values()}
    trunk = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    return trunk + sum(slabs.values()) + kv_bytes


def _section(result: GpuCheckResult, name: str, log: Callable[[str], None], fn: Callable[[], None]) -> None:
    log(name)
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - report the failure, run the other checks
        result.add(name, f"error: {type(e).__name__}: {str(e).splitlines()[0][:160]}", ok=False)
        result.numbers[f"{name} error"] = f"{type(e).__name__}: {e}"


def _resident_checks(result: GpuCheckResult, directory: Path, pool: int, forced: list[int],
                     reference: torch.Tensor | None, dev: torch.device, log: Callable[[str], None]) -> None:
    """Everything measured with every expert resident (returns with the model freed)."""
    log("loading bf16 on the GPU (every expert resident)")
    torch.cuda.reset_peak_memory_stats(dev)
    loaded = load_model(directory, device=dev, dtype="bf16")
    model = loaded.model

    def parity() -> None:
        assert reference is not None
        got, _ = _teacher_forced(loaded, pool, forced)
        diff, scale = float((got - reference).abs().max()), float(reference.abs().max())
        agree = float((got.argmax(-1) == reference.argmax(-1)).float().mean())
        result.numbers |= {"parity_max_abs_diff": diff, "parity_logit_scale": scale,
                           "parity_greedy_agreement": agree}
        result.add("bf16 CUDA vs fp32 CPU decode logits", f"max abs diff {diff:.3g} (max logit {scale:.3g}), "
                   f"greedy agreement {agree:.0%} over {PARITY_TOKENS} tokens", "bf16 tolerance",
                   agree >= 0.75 and diff <= 0.1 * scale)

    if reference is not None:
        _section(result, "bf16 CUDA vs fp32 CPU decode logits", log, parity)
    rows = _batch_rows(loaded, pool, BATCH, 2 * B1_TOKENS + B16_TOKENS)
    kv = rows[0].kv

    def eager_speed() -> None:
        rate = _decode_rate(model, rows[:1], B1_TOKENS // 4)
        result.numbers["decode_tps_b1_no_graphs"] = rate

    _section(result, "batch-1 decode without graphs", log, eager_speed)

    def capture() -> None:
        one = rows[0]
        args = (torch.tensor([one.token]), torch.tensor([one.position]), torch.tensor([one.slot]))
        with torch.inference_mode():
            eager = model.decode_step(kv)(args[0].to(dev), args[1].to(dev), args[2].to(dev), one.table[None],
                                          kv.max_len)
        start = time.perf_counter()
        model.capture_decode_graphs(kv, BATCH)
        seconds = time.perf_counter() - start
        replay = model.decode(*args[:2], kv, args[2], None, slot_tables=one.table[None])
        diff = float((replay.float() - eager.float()).abs().max())
        result.numbers |= {"graph_capture_s": seconds, "graph_vs_eager_max_abs_diff": diff}
        result.add("CUDA graphs captured (buckets 1..16)", f"{seconds:.1f} s; replay vs eager step max abs "
                   f"diff {diff:.3g}", "replay = eager", diff <= 1e-2 * max(1.0, float(eager.abs().max())))

    _section(result, "CUDA graphs captured (buckets 1..16)", log, capture)

    def speed() -> None:
        b1 = _decode_rate(model, rows[:1], B1_TOKENS)
        b16 = _decode_rate(model, rows, B16_TOKENS)
        b1_eager = result.numbers.get("decode_tps_b1_no_graphs", math.nan)
        result.numbers |= {"decode_tps_b1": b1, "decode_tps_b16": b16}
        result.add("batch-1 decode tokens/s (pool, resident)", f"{b1:.0f} (without graphs {b1_eager:.0f})",
                   f">= 800 for 16 layers: {800 * 16 // LAYERS} here", None)
        result.add("batch-16 decode tokens/s (pool, resident)", f"{b16:.0f}", "", None)

    _section(result, "decode tokens/s", log, speed)

    def launches() -> None:
        kernels = count_cuda_kernels(rows[0])
        syncs = count_host_syncs(rows[0])
        graph, note = check_fullgraph(rows[0])
        result.numbers |= {"kernels_per_layer": kernels, "host_syncs_per_token": syncs,
                           "fullgraph_inductor": graph}
        result.add("kernels per layer per token (graph replay)", f"{kernels:.1f}", "<= 20", kernels <= 20)
        result.add("host syncs per token", f"{syncs:g}", "0", syncs == 0)
        result.add("torch.compile(fullgraph=True), inductor", "yes" if graph else f"no: {note}", "yes", graph)

    _section(result, "kernels, syncs, fullgraph", log, launches)

    def memory() -> None:
        peak = torch.cuda.max_memory_allocated(dev)
        budget = _budget_bytes(loaded, sum(t.numel() * t.element_size() for t in kv.kv))
        result.numbers |= {"peak_device_bytes": peak, "budget_bytes": budget}
        result.add("peak device memory / budget", f"{peak / 1e9:.2f} GB / {budget / 1e9:.2f} GB",
                   "peak <= budget + workspace", None)

    _section(result, "peak device memory", log, memory)
    for row in rows:
        row.release()


def run_gpu_check(out_dir: Path, model_dir: Path | None = None, device: str = "cuda",
                  log: Callable[[str], None] = print) -> tuple[GpuCheckResult, Path]:
    if not torch.cuda.is_available():
        raise GpuUnavailable("needs a CUDA GPU and torch.cuda.is_available() is False here; nothing was run "
                             "(the CPU figures come from `emo-serve bench decode --device cpu`)")
    dev = torch.device(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    directory = _checkpoint(out_dir, model_dir, log)
    config = load_config(directory)
    pool = config.default_pool_size() or config.pool_bounds()[1]
    result = GpuCheckResult({"device_name": torch.cuda.get_device_name(dev), "checkpoint": str(directory),
                             "checkpoint_shape": f"{config.num_layers} layers of {PRESET}", "pool": pool,
                             "torch": torch.__version__})
    forced: list[int] = []
    reference: dict[str, torch.Tensor] = {}

    def cpu_reference() -> None:
        cpu = load_model(directory, device="cpu", dtype="fp32")
        reference["logits"], tokens = _teacher_forced(cpu, pool, None)
        forced.extend(tokens)
        _free(cpu)

    _section(result, "fp32 CPU reference", log, cpu_reference)

    _resident_checks(result, directory, pool, forced, reference.get("logits"), dev, log)
    _free()

    def tiered() -> None:
        from expert_cache.cache import TieredExpertCache
        from expert_cache.host_tier import host_bytes_for

        caches: list[TieredExpertCache] = []

        def factory(catalog: Any) -> TieredExpertCache:
            eb = catalog.expert_bytes(min(catalog.parts))
            slots = sum(math.ceil(0.25 * len(config.routable_experts(layer))) for layer in config.moe_layers)
            caches.append(TieredExpertCache(catalog, device=dev, device_budget_bytes=slots * eb,
                                            host_budget_bytes=host_bytes_for(eb, len(catalog.chunks), True)))
            return caches[-1]

        paged = load_model(directory, device=dev, dtype="bf16", expert_store_factory=factory)
        try:
            rows = _batch_rows(paged, pool, 1, B1_TOKENS)
            paged.model.capture_decode_graphs(rows[0].kv, 1)
            rate = _decode_rate(paged.model, rows, B1_TOKENS)
            rows[0].release()
        finally:
            caches[0].close()
        base = result.numbers.get("decode_tps_b1")
        ratio = rate / base if base else math.nan
        result.numbers |= {"decode_tps_b1_pool_tier25": rate, "tier25_vs_resident": ratio}
        result.add(f"pool {pool} on a 25% device tier, batch 1",
                   f"{rate:.0f} tok/s = {ratio:.0%} of resident",
                   ">= 95%", ratio >= 0.95 if base else None)
        _free(paged)

    _section(result, f"pool {pool} on a 25% device tier", log, tiered)

    def paging() -> None:
        from server.tools.bench.paging import CacheBenchConfig, run_cache_bench

        cfg = CacheBenchConfig(directory, experts=64, device=device, device_slots=32)
        bench = run_cache_bench(cfg, log=log)
        host = next(r for r in bench.rows if r.name == "host tier -> device")
        pinned = next(r for r in bench.rows if r.name.startswith("reference: pinned"))
        result.numbers |= {"paging_gb_s": host.gb_per_s, "pinned_gb_s": pinned.gb_per_s}
        result.add("paging host tier -> device",
                   f"{host.gb_per_s:.1f} GB/s vs pinned copy {pinned.gb_per_s:.1f} GB/s",
                   "close to pinned", None)

    _section(result, "paging GB/s", log, paging)
    result.header["seconds"] = round(time.perf_counter() - started, 1)
    path = out_dir / JSON_NAME
    path.write_text(json.dumps({"header": result.header, "numbers": result.numbers,
                                "checks": [c.__dict__ for c in result.checks]}, indent=2, default=str))
    return result, path

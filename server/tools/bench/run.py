"""`emo-serve bench decode`: every scenario in one process, then the reference, the bf16 parity
check and the reports."""

from __future__ import annotations

import datetime
import os
import platform
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from server.model.config import ModelConfig, load_config
from server.tools.bench.config import DecodeBenchConfig, scenarios
from server.tools.bench.decode_step import measure_decode_step
from server.tools.bench.parity import bf16_parity
from server.tools.bench.reference import hf_reference
from server.tools.bench.report import BenchResult, write_all
from server.tools.bench.scenario import run_scenario
from server.tools.bench.targets import check_targets

PARITY_MAX_TOKENS = 128


def checkpoint_dir(cfg: DecodeBenchConfig, log: Callable[[str], None]) -> Path:
    """The checkpoint to benchmark: the given one, or a synthetic one kept under ``out_dir``."""
    if cfg.model_dir is not None:
        return Path(cfg.model_dir)
    from server.tools.synth import write_checkpoint

    layers = "" if cfg.synth_layers is None else f"-{cfg.synth_layers}layers"
    target = Path(cfg.out_dir) / f"synth-{cfg.preset}{layers}-seed{cfg.seed}"
    if (target / "config.json").is_file():
        log(f"reusing the synthetic checkpoint {target}")
        return target
    log(f"writing a synthetic {cfg.preset} checkpoint to {target}")
    overrides = None if cfg.synth_layers is None else {"num_hidden_layers": cfg.synth_layers}
    return write_checkpoint(target, cfg.preset, seed=cfg.seed, overrides=overrides)


def default_pools(config: ModelConfig) -> tuple[int, ...]:
    """The model's default pool and half of it (EMO-1b14b: 32 and 16); none for "full" families."""
    pool = config.default_pool_size()
    if pool is None:
        return ()
    low, _ = config.pool_bounds()
    return tuple(dict.fromkeys((pool, max(low, pool // 2))))


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def run_decode_bench(
    cfg: DecodeBenchConfig, log: Callable[[str], None] = print
) -> tuple[BenchResult, str, list[Path]]:
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda requested but CUDA is not available (use --device cpu)")
    model_dir = checkpoint_dir(cfg, log)
    config = load_config(model_dir)
    pools = cfg.pools if cfg.pools is not None else default_pools(config)
    header = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}
    header |= {"checkpoint": str(model_dir), "pools": list(pools), "device_name": _device_name(device),
               "torch": torch.__version__, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                   timespec="seconds"), "tiers": list(cfg.tiers)}
    result = BenchResult(header)
    if not pools:
        result.notes.append("the model has no default expert pool (not EMO): full routing only")
    result.notes += [
        "tier = share of routable experts on the device: ceil(tier x |R|) slots per MoE layer; "
        "100% = full-resident (ResidentExpertStore, nothing paged)",
        f"x{cfg.concurrency} tok/s = all generated tokens / (last token - first submit), prefills included; "
        f"b1 tok/s and TTFT warm: best of {cfg.repeats} runs",
        "TTFT cold: the prompt's experts flushed off the device tier, held in host RAM",
        "hit rate = device hits / (hits + misses) of the store's acquires: pool rows decode from the slots "
        "pinned at admission without acquiring, so for pools it is the prefills' hit rate",
        "peak / budget: torch.cuda.max_memory_allocated over the scenario / trunk + device tier + KV "
        "slots; '-' on CPU, where no allocator measures the peak",
    ]
    for sc in scenarios(cfg, pools):
        log(f"scenario {sc.name}")
        result.rows.append(run_scenario(cfg, sc, model_dir, log))
    if pools:
        result.targets = check_targets(result.rows, pools[0], cfg.pinned_gb_s)
    log("decode step: ops per layer, host syncs, fullgraph")
    result.decode_step = measure_decode_step(model_dir, cfg.device, cfg.dtype, pools[0] if pools else None,
                                             fullgraph=cfg.fullgraph)
    reference = hf_reference(cfg, model_dir)
    if reference.skipped is None:
        result.rows.append(reference)
    else:
        result.notes.append(f"Hugging Face reference skipped: {reference.skipped}")
    if cfg.parity:
        log("bf16 vs fp32 parity")
        tokens = min(cfg.prompt_tokens, PARITY_MAX_TOKENS)
        result.parity = bf16_parity(model_dir, cfg.device, tokens, cfg.seed)
        if device.type != "cuda":
            result.notes.append("parity measured on CPU (bf16 CPU kernels); the GPU figure is owed")
    text, files = write_all(result, Path(cfg.out_dir))
    return result, text, files

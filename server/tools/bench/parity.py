"""bf16 against fp32 on the same device and prompt: how far the fast dtype drifts.

Both models hold every expert (ResidentExpertStore) and use the same expert pool, so the only
difference is the compute dtype. Loaded one after the other, so the device holds one at a time.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

import torch

from server.model.config import load_config
from server.model.kv_cache import KVCache
from server.model.loader import load_model
from server.model.tokenizer import load_tokenizer
from server.tools.bench.workload import domain_prompt


@dataclass(frozen=True)
class ParityResult:
    device: str
    prompt_tokens: int
    pool: int | None
    max_abs_diff: float  # over all positions' logits
    logit_scale: float  # max |fp32 logit|, for scale
    greedy_agreement: float  # fraction of positions whose argmax is the same

    def line(self) -> str:
        return (f"bf16 vs fp32 on {self.device}: {self.prompt_tokens} positions, pool {self.pool or 'full'}: "
                f"max |diff| {self.max_abs_diff:.4g} (max |logit| {self.logit_scale:.3g}), "
                f"greedy agreement {self.greedy_agreement:.1%}")


def _all_logits(model_dir: Path, device: torch.device, dtype: str, ids: list[int],
                pool: int | None) -> torch.Tensor:
    loaded = load_model(model_dir, device=device, dtype=dtype)
    kv = KVCache(loaded.config, 1, len(ids), device, loaded.model.dtype)
    out = loaded.model.prefill(torch.tensor(ids, device=device), kv, 0, pool_size=pool, all_logits=True)
    logits = out.logits.float().cpu()  # [T, V]
    del loaded, kv, out
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return logits


def bf16_parity(model_dir: Path, device: str, prompt_tokens: int, seed: int = 0) -> ParityResult:
    dev = torch.device(device)
    config = load_config(model_dir)
    tokenizer = load_tokenizer(model_dir, config.bos_token_id, config.eos_token_ids)
    ids = domain_prompt(tokenizer, 2, prompt_tokens, seed)
    pool = config.default_pool_size()
    low = _all_logits(model_dir, dev, "bf16", ids, pool)
    high = _all_logits(model_dir, dev, "fp32", ids, pool)
    agree = (low.argmax(-1) == high.argmax(-1)).float().mean().item()
    return ParityResult(str(dev), len(ids), pool, (low - high).abs().max().item(),
                        high.abs().max().item(), agree)

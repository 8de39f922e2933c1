"""The device memory plan of every command that runs a model, made from config.json before any
weight is read.

    trunk        every non-routable tensor (embeddings, attention, norms, routers, lm_head,
                 shared / always-active experts) in the compute dtype
    expert slots the expert cache's device tier (--expert-cache; auto: what is left, capped
                 at all experts; all: every expert, resident)
    KV cache     max_num_seqs slots of max_model_len tokens
    workspace    an estimate of the largest transient tensors: a full-prompt prefill with
                 prompt logprobs ([T, V] fp32 logits), attention scores, MoE activations, and
                 a decode batch's logits
On a CPU device the host tier lives in the same RAM, so it is counted too. A plan whose total
exceeds the free memory is refused with the numbers, before anything is loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from expert_cache.memory import available_host_bytes, default_host_budget_bytes, format_bytes
from server.engine.config import MAX_MODEL_LEN_CAP
from server.model.config import ModelConfig, load_config
from server.model.kv_cache import KVCache
from server.model.weights import expected_tensors
from server.runtime.settings import Settings

AUTO_MARGIN = 0.10  # of free memory, kept back when the expert budget is chosen automatically


class PlanError(ValueError):
    """The plan does not fit the device; the message holds the whole table."""


@dataclass(frozen=True)
class MemoryPlan:
    device: torch.device
    trunk_bytes: int
    expert_slot_bytes: int
    all_experts_bytes: int
    kv_bytes: int
    workspace_bytes: int
    host_cache_bytes: int
    free_bytes: int | None  # None: unknown (no check possible)

    @property
    def needed_bytes(self) -> int:
        host = self.host_cache_bytes if self.device.type == "cpu" else 0
        return self.trunk_bytes + self.expert_slot_bytes + self.kv_bytes + self.workspace_bytes + host

    def describe(self) -> str:
        rows = [("trunk", self.trunk_bytes),
                ("expert slots", self.expert_slot_bytes),
                ("KV cache", self.kv_bytes),
                ("workspace (estimate)", self.workspace_bytes)]
        if self.device.type == "cpu":
            rows.append(("host expert tier (same RAM)", self.host_cache_bytes))
        lines = [f"device memory plan on {self.device}:"]
        lines += [f"  {name:<28} {format_bytes(n):>12}" for name, n in rows]
        lines.append(f"  {'total':<28} {format_bytes(self.needed_bytes):>12}")
        free = "unknown" if self.free_bytes is None else format_bytes(self.free_bytes)
        lines.append(f"  {'free on the device':<28} {free:>12}")
        share = self.expert_slot_bytes / self.all_experts_bytes if self.all_experts_bytes else 1.0
        lines.append(f"  expert slots hold {min(share, 1.0):.0%} of all experts "
                     f"({format_bytes(self.all_experts_bytes)}); host tier "
                     f"{format_bytes(self.host_cache_bytes)}")
        return "\n".join(lines)

    def check(self) -> None:
        if self.free_bytes is not None and self.needed_bytes > self.free_bytes:
            raise PlanError(f"the plan needs {format_bytes(self.needed_bytes)} but only "
                            f"{format_bytes(self.free_bytes)} is free; lower --expert-cache, "
                            f"--max-num-seqs or --max-model-len\n{self.describe()}")


def expert_bytes(mc: ModelConfig, dtype: torch.dtype) -> int:
    """All routable experts: gate_up [2I, H] + down [H, I] each."""
    per_expert = 3 * mc.intermediate_size * mc.hidden_size * dtype.itemsize
    return sum(len(mc.routable_experts(layer)) for layer in mc.moe_layers) * per_expert


def trunk_bytes(mc: ModelConfig, dtype: torch.dtype) -> int:
    total = sum(math.prod(shape) for shape in expected_tensors(mc).values()) * dtype.itemsize
    return total - expert_bytes(mc, dtype)


def workspace_bytes(mc: ModelConfig, max_len: int, max_num_seqs: int, dtype: torch.dtype) -> int:
    T, V, H = max_len, mc.vocab_size, mc.hidden_size
    prefill_logits = T * V * 4
    attention_scores = mc.num_heads * T * T * 4
    moe = T * mc.top_k * 2 * mc.intermediate_size * dtype.itemsize * 2
    activations = T * H * 4 * 8
    decode = max_num_seqs * V * 4 * 2
    return prefill_logits + attention_scores + moe + activations + decode


def free_device_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return available_host_bytes()


def plan_memory(settings: Settings, model_dir: Path, device: torch.device, dtype: torch.dtype,
                free_bytes: int | None = None) -> MemoryPlan:
    """``free_bytes`` None: measured on ``device`` now."""
    mc = load_config(model_dir)
    engine = settings.engine
    max_len = engine.max_model_len or min(mc.max_position_embeddings, MAX_MODEL_LEN_CAP)
    free = free_device_bytes(device) if free_bytes is None else free_bytes
    all_experts = expert_bytes(mc, dtype)
    host = settings.host_cache
    if settings.resident_experts:
        host = 0  # the resident store reads every expert straight onto the device
    elif host is None:
        host = min(all_experts, default_host_budget_bytes())
    fixed = MemoryPlan(device, trunk_bytes(mc, dtype), 0, all_experts,
                       KVCache.bytes_per_slot(mc, max_len, dtype) * engine.max_num_seqs,
                       workspace_bytes(mc, max_len, engine.max_num_seqs, dtype), host, free)
    slots = settings.expert_cache
    if slots == "all":
        slots = all_experts
    elif slots is None:
        room = 0 if free is None else int((free - fixed.needed_bytes) * (1 - AUTO_MARGIN))
        slots = all_experts if free is None else max(0, min(all_experts, room))
    return MemoryPlan(device, fixed.trunk_bytes, slots, all_experts, fixed.kv_bytes,
                      fixed.workspace_bytes, host, free)

"""Recall of the prefill prefetch: how much of layer l+1's real pool the model predicted.

While layer l computes, the model prefetches layer l+1's predicted pool (layer l+1's router on
layer l's hidden states). A store wrapper records each prediction; the prefill's selected pools
are the truth. recall = |predicted & actual| / P, averaged over layers and prompts.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from expert_cache.base import CacheStats, ExpertCatalog, ExpertKey, ExpertStore, ResidencySnapshot
from expert_cache.resident import ResidentExpertStore
from server.model.kv_cache import KVCache
from server.model.loader import load_model
from server.tools.synth import DOMAINS, sample_prompt


class RecordingStore(ExpertStore):
    """Delegates to ``inner``; remembers the keys of every prefetch."""

    def __init__(self, inner: ExpertStore) -> None:
        self.inner, self.lock = inner, inner.lock
        self.prefetched: list[list[ExpertKey]] = []

    def slab(self, layer: int) -> dict[str, torch.Tensor]:
        return self.inner.slab(layer)

    def acquire(self, keys: Sequence[ExpertKey]) -> torch.Tensor:
        return self.inner.acquire(keys)

    def release(self, keys: Sequence[ExpertKey]) -> None:
        self.inner.release(keys)

    def prefetch(self, keys: Sequence[ExpertKey]) -> None:
        self.prefetched.append(list(keys))
        self.inner.prefetch(keys)

    def capacity(self, layer: int) -> int:
        return self.inner.capacity(layer)

    def free_slots(self, layer: int) -> int:
        return self.inner.free_slots(layer)

    def is_resident(self, key: ExpertKey) -> bool:
        return self.inner.is_resident(key)

    def stats(self) -> CacheStats:
        return self.inner.stats()

    def snapshot(self) -> ResidencySnapshot:
        return self.inner.snapshot()


@dataclass(frozen=True)
class RecallResult:
    pool_size: int
    prompts: int
    per_layer: list[float]  # mean recall for each predicted layer (the first MoE layer is never predicted)

    @property
    def mean(self) -> float:
        return sum(self.per_layer) / len(self.per_layer) if self.per_layer else float("nan")

    def table(self) -> str:
        rows = [f"| layer {i + 1} | {r:.3f} |" for i, r in enumerate(self.per_layer)]
        return "\n".join(
            [f"prefetch recall, pool {self.pool_size}, {self.prompts} prompts", "| predicted | recall |",
             "|---|---:|", *rows, f"| mean | {self.mean:.3f} |"]
        )


def measure_prefetch_recall(
    model_dir: Path, *, pool_size: int | None = None, prompts_per_domain: int = 4, prompt_words: int = 48,
    seed: int = 0, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
) -> RecallResult:
    recorder: list[RecordingStore] = []

    def factory(catalog: ExpertCatalog) -> ExpertStore:
        recorder.append(RecordingStore(ResidentExpertStore(catalog, torch.device(device))))
        return recorder[-1]

    loaded = load_model(model_dir, device=device, dtype=dtype, expert_store_factory=factory)
    store, config = recorder[0], loaded.config
    size = pool_size or config.default_pool_size()
    if size is None:
        raise ValueError("this model has no default pool; pass a pool size")
    moe_layers = config.moe_layers
    hits = [0] * (len(moe_layers) - 1)
    rng = random.Random(seed)
    domains = synth_domain_count(model_dir) or len(DOMAINS)
    count = 0
    for domain in range(domains):
        for _ in range(prompts_per_domain):
            ids = torch.tensor(loaded.tokenizer.encode(sample_prompt(domain, prompt_words, rng)))
            kv = KVCache(config, 1, len(ids), loaded.model.device, loaded.model.dtype)
            store.prefetched.clear()
            out = loaded.model.prefill(ids, kv, 0, pool_size=size)
            assert out.pools is not None
            actual = {layer: set(p.tolist()) for layer in moe_layers if (p := out.pools[layer]) is not None}
            for keys in store.prefetched:  # one prediction per MoE layer after the first
                layer = keys[0][0]
                hits[moe_layers.index(layer) - 1] += len(actual[layer] & {e for _, e in keys})
            count += 1
    return RecallResult(size, count, [h / (size * count) for h in hits])


def synth_domain_count(model_dir: Path) -> int:
    """Domains planted by `emo-serve synth` (0 for other checkpoints: then every known domain)."""
    synth = json.loads((Path(model_dir) / "config.json").read_text()).get("emo_synth") or {}
    domains = synth.get("domains") or []
    return len(domains) if isinstance(domains, list) else int(domains)

"""Greedy generation through a few device slots and no host tier gives exactly the tokens of the
all-resident model, for full routing and for a pinned per-request pool."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from expert_cache import TieredExpertCache
from expert_cache.base import ExpertCatalog
from server.model.kv_cache import KVCache
from server.model.loader import LoadedModel, load_model
from server.tools.synth import sample_prompt, write_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny")
    write_checkpoint(directory, "tiny", seed=0)
    return directory


def _greedy(loaded: LoadedModel, prompt: list[int], steps: int, pool_size: int | None) -> list[int]:
    model = loaded.model
    kv = KVCache(loaded.config, 1, len(prompt) + steps, model.device, model.dtype)
    out = model.prefill(torch.tensor(prompt), kv, 0, pool_size=pool_size, pin_pool=pool_size is not None)
    try:
        mask = None if out.pools is None else model.pool_mask_row(out.pools)[None]
        tokens = [int(out.logits[-1].argmax())]
        for i in range(steps - 1):
            position = torch.tensor([len(prompt) + i])
            logits = model.decode(torch.tensor(tokens[-1:]), position, kv, torch.tensor([0]), mask)
            tokens.append(int(logits[0].argmax()))
    finally:
        model.expert_store.release(out.pinned)
    return tokens


@pytest.mark.parametrize("routing", ["full", "pool"])
def test_paged_generation_matches_resident(checkpoint: Path, routing: str) -> None:
    resident = load_model(checkpoint, device="cpu", dtype=torch.float32)
    config = resident.config
    pool_size = config.default_pool_size() if routing == "pool" else None
    # full routing: a few slots, filled group by group; pool: the pinned pools of every layer + 2
    slots = 3 if pool_size is None else pool_size * len(config.moe_layers) + 2
    caches: list[TieredExpertCache] = []

    def factory(catalog: ExpertCatalog) -> TieredExpertCache:
        eb = catalog.expert_bytes(min(catalog.parts))
        caches.append(
            TieredExpertCache(catalog, device="cpu", device_budget_bytes=slots * eb, host_budget_bytes=0)
        )
        return caches[-1]

    paged = load_model(checkpoint, device="cpu", dtype=torch.float32, expert_store_factory=factory)
    cache = caches[0]
    assert cache.capacity(min(paged.catalog.parts)) == slots < len(paged.catalog.chunks)
    rng = random.Random(0)
    for domain in (0, 1):
        prompt = resident.tokenizer.encode(sample_prompt(domain, 12, rng))
        want = _greedy(resident, prompt, 10, pool_size)
        got = _greedy(paged, prompt, 10, pool_size)
        assert got == want, f"domain {domain}"
    s = cache.stats()
    assert s.device.misses > 0 and s.device.evictions > 0 and s.bytes_loaded_from_disk > 0
    assert s.pinned_slots == 0 and s.host.capacity_bytes == 0
    cache.close()


def test_background_prefetch_after_inference_mode_prefill(checkpoint: Path) -> None:
    """The model runs under inference_mode, so buffers the cache allocates lazily during a
    prefill are inference tensors; the loader thread must still be able to fill them."""
    caches: list[TieredExpertCache] = []

    def factory(catalog: ExpertCatalog) -> TieredExpertCache:
        eb = catalog.expert_bytes(min(catalog.parts))
        caches.append(
            TieredExpertCache(catalog, device="cpu", device_budget_bytes=len(catalog.chunks) * eb,
                              host_budget_bytes=len(catalog.chunks) * eb)
        )
        return caches[-1]

    loaded = load_model(checkpoint, device="cpu", dtype=torch.float32, expert_store_factory=factory)
    cache = caches[0]
    prompt = loaded.tokenizer.encode(sample_prompt(0, 12, random.Random(1)))
    _greedy(loaded, prompt, 2, loaded.config.default_pool_size())
    cold = [k for k in sorted(loaded.catalog.chunks) if not cache.is_resident(k)]
    assert cold, "the prompt's pools should leave some experts cold"
    cache.prefetch(cold)  # from this thread, outside inference_mode
    assert cache.wait_for_prefetch(timeout=30)
    assert all(cache.is_resident(k) for k in cold)
    cache.close()

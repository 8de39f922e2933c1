"""Every expert read through each tier equals the checkpoint's tensor, bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from expert_cache import SafetensorsIndex, TieredExpertCache, per_expert_catalog
from tests.expert_cache.helpers import expected_parts, hand_catalog, same_bits, write_checkpoint

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _read_all(cache: TieredExpertCache, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Acquire every expert one at a time and compare its slot with the checkpoint."""
    for key in sorted(cache.catalog.chunks):
        slots = cache.acquire([key])
        slab = cache.slab(key[0])
        for part, want in expected_parts(tensors, key, dtype).items():
            got = slab[part][int(slots[0])]
            assert same_bits(got, want), f"{key} part {part} differs"
        cache.release([key])


@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_tier_round_trips(tmp_path: Path, dtype: torch.dtype, shards: int) -> None:
    tensors = write_checkpoint(tmp_path, dtype=dtype, shards=shards, layers=2, experts=5)
    catalog = hand_catalog(tmp_path, dtype)
    n, eb = len(catalog.keys()), catalog.expert_bytes(0)

    # disk -> staging buffer -> device slots (no host tier), with fewer slots than experts
    with TieredExpertCache(catalog, device="cpu", device_budget_bytes=2 * eb, host_budget_bytes=0) as cache:
        _read_all(cache, tensors, dtype)
        _read_all(cache, tensors, dtype)
        s = cache.stats()
        assert s.host.capacity_bytes == 0 and s.host.hits == 0 and s.bytes_loaded_from_host == 0
        assert s.device.misses == 2 * n and s.bytes_loaded_from_disk == 2 * n * eb

    # disk -> host tier -> device, then host tier -> device (device too small to keep them)
    with TieredExpertCache(
        catalog, device="cpu", device_budget_bytes=3 * eb, host_budget_bytes=n * eb
    ) as cache:
        _read_all(cache, tensors, dtype)
        assert cache.stats().host.misses == n
        _read_all(cache, tensors, dtype)
        s = cache.stats()
        assert s.host.hits == n and s.host.misses == n
        assert s.bytes_loaded_from_host == n * eb and s.bytes_loaded_from_disk == n * eb

    # everything resident: a second pass is all device hits
    with TieredExpertCache(catalog, device="cpu", device_budget_bytes=10**9, host_budget_bytes=0) as cache:
        assert cache.capacity(0) == n  # capped at the number of keys
        _read_all(cache, tensors, dtype)
        _read_all(cache, tensors, dtype)
        assert cache.stats().device.hits == n


@pytest.mark.parametrize(
    ("file_dtype", "slab_dtype"),
    [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16), (torch.float16, torch.bfloat16)],
    ids=str,
)
@pytest.mark.parametrize("host_experts", [0, 100])
def test_dtype_conversion(
    tmp_path: Path, file_dtype: torch.dtype, slab_dtype: torch.dtype, host_experts: int
) -> None:
    tensors = write_checkpoint(tmp_path, dtype=file_dtype, shards=2, experts=3)
    catalog = hand_catalog(tmp_path, slab_dtype)
    eb = catalog.expert_bytes(0)
    budget = host_experts * eb
    with TieredExpertCache(
        catalog, device="cpu", device_budget_bytes=2 * eb, host_budget_bytes=budget
    ) as cache:
        assert cache.slab(0)["gate_up"].dtype == slab_dtype
        _read_all(cache, tensors, slab_dtype)
        _read_all(cache, tensors, slab_dtype)
        file_bytes = sum(c.nbytes for chunks in catalog.chunks[(0, 0)].values() for c in chunks)
        assert file_bytes == eb // slab_dtype.itemsize * file_dtype.itemsize
        s = cache.stats()
        assert s.bytes_loaded_from_disk == s.host.misses * file_bytes


def test_background_prefetch_fills_slots_correctly(tmp_path: Path) -> None:
    tensors = write_checkpoint(tmp_path, dtype=torch.bfloat16, experts=6)
    catalog = hand_catalog(tmp_path, torch.bfloat16)
    eb = catalog.expert_bytes(0)
    with TieredExpertCache(catalog, device="cpu", device_budget_bytes=4 * eb, host_budget_bytes=0) as cache:
        cache.prefetch([(1, 0), (1, 1), (1, 2)])
        assert cache.wait_for_prefetch(timeout=30)
        assert all(cache.is_resident((1, e)) for e in range(3))
        before = cache.stats()
        slots = cache.acquire([(1, 2), (1, 0)])
        after = cache.stats()
        assert after.device.hits - before.device.hits == 2 and after.device.misses == before.device.misses
        slab = cache.slab(1)
        for slot, key in zip(slots.tolist(), [(1, 2), (1, 0)], strict=True):
            for part, want in expected_parts(tensors, key, torch.bfloat16).items():
                assert same_bits(slab[part][slot], want)
        cache.release([(1, 2), (1, 0)])


def test_per_expert_catalog_matches_hand_built(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, dtype=torch.float16, shards=3, layers=3, experts=2)
    index = SafetensorsIndex.from_directory(tmp_path)
    assert per_expert_catalog(index) == hand_catalog(tmp_path, torch.float16)
    only_layer_1 = per_expert_catalog(index, dtype=torch.float32, include=lambda k: k[0] == 1)
    assert only_layer_1.keys() == [(1, 0), (1, 1)] and only_layer_1.dtype == torch.float32

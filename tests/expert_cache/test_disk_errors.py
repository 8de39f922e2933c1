"""Broken checkpoints give a clear error naming the file and the tensor, and leave the cache usable."""

from __future__ import annotations

import dataclasses
import os
import struct
from pathlib import Path

import pytest
import torch

from expert_cache import CheckpointError, SafetensorsIndex, TieredExpertCache
from expert_cache.base import ExpertCatalog
from tests.expert_cache.helpers import expected_parts, expert_name, hand_catalog, same_bits, write_checkpoint


def _cache(catalog: ExpertCatalog, host_experts: int = 0, device_experts: int = 2) -> TieredExpertCache:
    eb = catalog.expert_bytes(0)
    return TieredExpertCache(
        catalog, device="cpu", device_budget_bytes=device_experts * eb, host_budget_bytes=host_experts * eb
    )


def test_file_truncated_before_start(tmp_path: Path) -> None:
    write_checkpoint(tmp_path)
    catalog = hand_catalog(tmp_path, torch.bfloat16)
    path = tmp_path / "model.safetensors"
    size = path.stat().st_size
    index = SafetensorsIndex.from_directory(tmp_path)
    last = next(n for n in index if index.info(n).offset + index.info(n).nbytes == size)
    os.truncate(path, size - 10)
    with pytest.raises(CheckpointError) as err:
        _cache(catalog)
    assert str(path) in str(err.value) and "past the end" in str(err.value)
    assert err.value.tensor == last and last in str(err.value)


@pytest.mark.parametrize("host_experts", [0, 4])
def test_file_truncated_while_serving(tmp_path: Path, host_experts: int) -> None:
    tensors = write_checkpoint(tmp_path, extra=False)
    catalog = hand_catalog(tmp_path, torch.bfloat16)
    path = tmp_path / "model.safetensors"
    original = path.read_bytes()
    with _cache(catalog, host_experts, device_experts=3) as cache:
        cache.acquire([(0, 0)])
        key = (1, 3)
        last = max((c for chunks in catalog.chunks[key].values() for c in chunks), key=lambda c: c.offset)
        os.truncate(path, last.offset + 4)  # the last tensor of (1, 3) in the file is cut
        with pytest.raises(CheckpointError) as err:
            cache.acquire([(1, 2), key])
        assert str(path) in str(err.value) and last.tensor_name in str(err.value)
        assert "end of file" in str(err.value)
        # nothing of the failed call stays pinned or half-loaded; (1, 2) was loaded and stays
        assert cache.stats().pinned_slots == 1 and cache.free_slots(1) == 2
        assert not cache.is_resident(key) and cache.is_resident((1, 2))
        assert cache.stats().host.resident == (2 if host_experts else 0)
        path.write_bytes(original)
        slots = cache.acquire([key]).tolist()
        for part, want in expected_parts(tensors, key, torch.bfloat16).items():
            assert same_bits(cache.slab(1)[part][slots[0]], want)
        cache.release([key])
        cache.release([(0, 0)])


def test_header_claims_more_bytes_than_the_file(tmp_path: Path) -> None:
    write_checkpoint(tmp_path)
    catalog = hand_catalog(tmp_path, torch.bfloat16)
    path = tmp_path / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[:8] = struct.pack("<Q", len(data) + 100)
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt header") as err:
        _cache(catalog)
    assert err.value.path == path


def test_tensor_data_past_the_end(tmp_path: Path) -> None:
    write_checkpoint(tmp_path)
    catalog = hand_catalog(tmp_path, torch.bfloat16)
    name = expert_name((0, 1), "up_proj")
    chunk = catalog.chunks[(0, 1)]["gate_up"][1]
    moved = dataclasses.replace(chunk, offset=chunk.offset + 10**6)
    catalog.chunks[(0, 1)]["gate_up"] = (catalog.chunks[(0, 1)]["gate_up"][0], moved)
    with pytest.raises(CheckpointError, match="outside the tensor's data") as err:
        _cache(catalog)
    assert err.value.tensor == name and err.value.path == chunk.path


def test_wrong_dtype(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, dtype=torch.bfloat16)
    catalog = hand_catalog(tmp_path, torch.bfloat16)
    chunk = catalog.chunks[(1, 0)]["down"][0]
    catalog.chunks[(1, 0)]["down"] = (dataclasses.replace(chunk, dtype=torch.float16),)
    with pytest.raises(CheckpointError, match="wrong dtype") as err:
        _cache(catalog)
    assert err.value.tensor == expert_name((1, 0), "down_proj") and err.value.path == chunk.path
    assert "float16" in str(err.value) and "bfloat16" in str(err.value)


def test_part_size_mismatch_and_missing_tensor(tmp_path: Path) -> None:
    write_checkpoint(tmp_path)
    catalog = hand_catalog(tmp_path, torch.bfloat16)
    gate_up = catalog.chunks[(0, 0)]["gate_up"]
    catalog.chunks[(0, 0)]["gate_up"] = gate_up[:1]
    with pytest.raises(CheckpointError, match="needs 64 elements but its chunks hold 32"):
        _cache(catalog)
    catalog.chunks[(0, 0)]["gate_up"] = (gate_up[0], dataclasses.replace(gate_up[1], tensor_name="nope"))
    with pytest.raises(CheckpointError, match="not in this file") as err:
        _cache(catalog)
    assert err.value.tensor == "nope"


def test_unknown_and_mixed_keys(tmp_path: Path) -> None:
    write_checkpoint(tmp_path)
    catalog = hand_catalog(tmp_path, torch.bfloat16)
    with _cache(catalog) as cache:
        with pytest.raises(KeyError, match=r"\(5, 0\)"):
            cache.acquire([(5, 0)])
        with pytest.raises(ValueError, match="release of expert"):
            cache.release([(0, 0)])
        assert not cache.is_resident((9, 9))
        cache.prefetch([(9, 9)])  # best effort: unknown keys are ignored
    with pytest.raises(ValueError, match="device_budget_bytes"):
        TieredExpertCache(catalog, device="cpu", device_budget_bytes=-1, host_budget_bytes=0)
    with pytest.raises(ValueError, match="leaves no slot"):
        TieredExpertCache(
            catalog, device="cpu", device_budget_bytes=catalog.expert_bytes(0) - 1, host_budget_bytes=0
        )

"""Budget parsing, default budgets, and how budgets become slots in each tier."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from expert_cache import TieredExpertCache, format_bytes, memory, parse_bytes
from expert_cache.base import ExpertCatalog
from expert_cache.host_tier import plan_arenas
from expert_cache.layout import slab_groups, split_slots
from expert_cache.memory import default_host_budget_bytes
from tests.expert_cache.helpers import hand_catalog, write_checkpoint


@pytest.mark.parametrize(
    ("text", "n"),
    [
        ("6GiB", 6 * 1024**3),
        ("512MiB", 512 * 1024**2),
        ("1.5GB", 1_500_000_000),
        ("123", 123),
        (" 2 kib ", 2048),
        ("0", 0),
        # every unit, in mixed case: decimal ones are powers of 1000, binary ones of 1024
        ("7b", 7),
        ("3k", 3000),
        ("3KB", 3000),
        ("2M", 2 * 1000**2),
        ("2mb", 2 * 1000**2),
        ("4g", 4 * 1000**3),
        ("1T", 1000**4),
        ("1tb", 1000**4),
        ("0.5KiB", 512),
        (".5k", 500),
        ("3MIB", 3 * 1024**2),
        ("1TiB", 1024**4),
        ("1.9", 1),
        ("2Ki", None),
        ("2 MiBs", None),
        (77, 77),
        ("1e", None),
        ("-5", None),
        ("GiB", None),
        ("5 parsecs", None),
    ],
)
def test_parse_bytes(text: str | int, n: int | None) -> None:
    if n is None:
        with pytest.raises(ValueError, match="host budget"):
            parse_bytes(text, what="host budget")
    else:
        assert parse_bytes(text) == n


def test_format_bytes() -> None:
    assert format_bytes(1536 * 1024**2) == "1.50 GiB" and format_bytes(10) == "10 B"


@pytest.mark.parametrize(
    ("available_gib", "total_gib", "cgroup_gib", "budget_gib"),
    [
        (40, 64, None, 40 - 6.4),  # margin: 10% of total RAM
        (10, 16, None, 8),  # margin: at least 2 GiB
        (40, 64, 12, 12 - 6.4),  # a container's cgroup headroom is the tighter bound
        (1, 16, None, 0),  # less than the margin: nothing
    ],
)
def test_default_host_budget(
    monkeypatch: pytest.MonkeyPatch,
    available_gib: float,
    total_gib: float,
    cgroup_gib: float | None,
    budget_gib: float,
) -> None:
    """The machine's /proc/meminfo is given, not read: a second read could see other numbers."""
    gib = 1024**3
    meminfo = {"MemAvailable": int(available_gib * gib), "MemTotal": int(total_gib * gib)}
    monkeypatch.setattr(memory, "_meminfo", lambda: meminfo)
    headroom = None if cgroup_gib is None else int(cgroup_gib * gib)
    monkeypatch.setattr(memory, "_cgroup_headroom", lambda: headroom)
    assert default_host_budget_bytes() == pytest.approx(budget_gib * gib, abs=1)


def test_pinned_arenas_stay_within_budget() -> None:
    slot = 12_582_912  # one Emo_1b14b expert in bf16
    for budget in [0, slot, 10**9, 8 * 2**30, 25 * 2**30]:
        for pinned in (True, False):
            plan = plan_arenas(slot, 2048, budget, pinned)
            size = sum((1 << (k * slot - 1).bit_length()) if pinned else k * slot for k in plan)
            assert size <= budget and sum(plan) <= 2048
            if not pinned:
                assert sum(plan) == min(2048, budget // slot)
    assert sum(plan_arenas(slot, 2048, 8 * 2**30, True)) >= 0.97 * 8 * 2**30 // slot  # little waste


def _two_shape_catalog(tmp_path: Path) -> ExpertCatalog:
    write_checkpoint(tmp_path / "a", layers=2, experts=4, hidden=8, inter=4, extra=False)
    write_checkpoint(tmp_path / "b", layers=1, experts=4, hidden=8, inter=8, extra=False)
    a, b = hand_catalog(tmp_path / "a", torch.float32), hand_catalog(tmp_path / "b", torch.float32)
    # layers 0 and 1 share one shape, layer 2 has a wider intermediate size
    chunks = dict(a.chunks) | {(2, e): c for (_, e), c in b.chunks.items()}
    return ExpertCatalog(parts=a.parts | {2: b.parts[0]}, chunks=chunks, dtype=torch.float32)


def test_layers_with_equal_parts_share_a_slab(tmp_path: Path) -> None:
    catalog = _two_shape_catalog(tmp_path)
    groups, layer_group = slab_groups(catalog)
    assert len(groups) == 2 and layer_group == {0: 0, 1: 0, 2: 1}
    small, big = catalog.expert_bytes(0), catalog.expert_bytes(2)
    assert big == 2 * small and groups[0].num_keys == 8 and groups[1].num_keys == 4
    assert split_slots(groups, 10**9, [small, big]) == [8, 4]
    budget = 8 * small + 1
    with TieredExpertCache(catalog, device="cpu", device_budget_bytes=budget, host_budget_bytes=0) as cache:
        assert cache.slab(1)["down"].data_ptr() == cache.slab(0)["down"].data_ptr()  # one slab
        n0, n2 = cache.capacity(0), cache.capacity(2)
        assert n0 * small + n2 * big <= budget and n0 >= 1 and n2 >= 1
        assert cache.stats().device.capacity_bytes == n0 * small + n2 * big
        assert cache.slab(2)["gate_up"].shape == (n2, 16, 8)
        with pytest.raises(ValueError, match="one slab group"):
            cache.acquire([(0, 0), (2, 0)])
        cache.acquire([(1, 1), (0, 1)])
        cache.acquire([(2, 3)])
        assert cache.free_slots(0) == n0 - 2 and cache.free_slots(2) == n2 - 1
        cache.release([(2, 3)])
        cache.release([(0, 1), (1, 1)])

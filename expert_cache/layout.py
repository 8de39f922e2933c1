"""Slab groups: layers whose experts have the same parts share one slab of slots, per tier.

A budget is split between groups in proportion to each group's share of the catalog's expert
bytes, and a group never gets more slots than it has keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from expert_cache.base import ExpertCatalog, ExpertKey, PartSpec


@dataclass(frozen=True)
class SlabGroup:
    """Experts of ``layers`` all have ``parts``; ``num_keys`` of them are in the catalog."""

    index: int
    parts: tuple[PartSpec, ...]
    layers: tuple[int, ...]
    num_keys: int
    dtype: torch.dtype

    def part_bytes(self, part: PartSpec) -> int:
        return math.prod(part.shape) * self.dtype.itemsize

    @property
    def expert_bytes(self) -> int:
        return sum(self.part_bytes(p) for p in self.parts)

    @property
    def total_bytes(self) -> int:
        return self.num_keys * self.expert_bytes


def slab_groups(catalog: ExpertCatalog) -> tuple[list[SlabGroup], dict[int, int]]:
    """The groups of ``catalog`` and ``layer -> group index``; validates the catalog's shape."""
    by_parts: dict[tuple[PartSpec, ...], list[int]] = {}
    for layer in sorted(catalog.parts):
        parts = catalog.parts[layer]
        if not parts:
            raise ValueError(f"expert catalog: layer {layer} has no parts")
        if len({p.name for p in parts}) != len(parts):
            raise ValueError(f"expert catalog: layer {layer} repeats a part name")
        for p in parts:
            if not p.shape or any(d <= 0 for d in p.shape):
                raise ValueError(f"expert catalog: layer {layer} part '{p.name}' has shape {p.shape}")
        by_parts.setdefault(parts, []).append(layer)
    counts: dict[int, int] = {}
    for layer, _expert in catalog.chunks:
        if layer not in catalog.parts:
            raise ValueError(f"expert catalog: chunks given for layer {layer}, which has no parts")
        counts[layer] = counts.get(layer, 0) + 1
    groups: list[SlabGroup] = []
    layer_group: dict[int, int] = {}
    for parts, layers in by_parts.items():
        index = len(groups)
        num_keys = sum(counts.get(layer, 0) for layer in layers)
        groups.append(SlabGroup(index, parts, tuple(layers), num_keys, catalog.dtype))
        for layer in layers:
            layer_group[layer] = index
    return groups, layer_group


def split_slots(groups: list[SlabGroup], budget_bytes: int, slot_bytes: list[int]) -> list[int]:
    """Slots per group so that ``sum(slots[g] * slot_bytes[g]) <= budget_bytes``.

    Everything fits -> every key gets a slot. Otherwise each group first gets its share of the
    budget in proportion to its catalog bytes, then leftover bytes go, one slot at a time, to
    groups in order while they fit.
    """
    if budget_bytes < 0:
        raise ValueError(f"budget must be >= 0 bytes, got {budget_bytes}")
    need = [g.num_keys * b for g, b in zip(groups, slot_bytes, strict=True)]
    if sum(need) <= budget_bytes:
        return [g.num_keys for g in groups]
    total = sum(need)
    slots = [
        min(g.num_keys, (budget_bytes * n // total) // b)
        for g, n, b in zip(groups, need, slot_bytes, strict=True)
    ]
    left = budget_bytes - sum(s * b for s, b in zip(slots, slot_bytes, strict=True))
    grew = True
    while grew:
        grew = False
        for i, g in enumerate(groups):
            if slots[i] < g.num_keys and slot_bytes[i] <= left:
                slots[i] += 1
                left -= slot_bytes[i]
                grew = True
    return slots


def keys_by_group(catalog: ExpertCatalog, layer_group: dict[int, int]) -> dict[ExpertKey, int]:
    return {key: layer_group[key[0]] for key in catalog.chunks}

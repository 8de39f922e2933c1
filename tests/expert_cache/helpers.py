"""Small checkpoints in the per-expert layout, and the catalog built by hand from their names."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from expert_cache.base import ExpertCatalog, ExpertKey, PartSpec, TensorChunk
from expert_cache.safetensors_index import SafetensorsIndex


def expert_name(key: ExpertKey, proj: str) -> str:
    return f"model.layers.{key[0]}.mlp.experts.{key[1]}.{proj}.weight"


def write_checkpoint(
    directory: Path,
    *,
    layers: int = 2,
    experts: int = 4,
    hidden: int = 8,
    inter: int = 4,
    dtype: torch.dtype = torch.bfloat16,
    shards: int = 1,
    seed: int = 0,
    extra: bool = True,
) -> dict[str, torch.Tensor]:
    """Write random expert weights (plus a router and an embedding when ``extra``) as
    ``shards`` safetensors files with an HF index when sharded; returns the tensors."""
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    if extra:
        tensors["model.embed_tokens.weight"] = torch.randn(16, hidden, generator=gen).to(dtype)
    for layer in range(layers):
        if extra:
            tensors[f"model.layers.{layer}.mlp.gate.weight"] = torch.randn(experts, hidden, generator=gen).to(
                dtype
            )
        for e in range(experts):
            key = (layer, e)
            tensors[expert_name(key, "gate_proj")] = torch.randn(inter, hidden, generator=gen).to(dtype)
            tensors[expert_name(key, "up_proj")] = torch.randn(inter, hidden, generator=gen).to(dtype)
            tensors[expert_name(key, "down_proj")] = torch.randn(hidden, inter, generator=gen).to(dtype)
    directory.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    if shards == 1:
        save_file(tensors, str(directory / "model.safetensors"))
        return tensors
    weight_map: dict[str, str] = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::shards]}  # interleaved: an expert spans files
        save_file(part, str(directory / fname))
        weight_map.update(dict.fromkeys(part, fname))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return tensors


def hand_catalog(directory: Path, dtype: torch.dtype) -> ExpertCatalog:
    """gate_proj/up_proj/down_proj -> parts gate_up (2I, H) and down (H, I), built directly."""
    index = SafetensorsIndex.from_directory(directory)
    parts: dict[int, tuple[PartSpec, ...]] = {}
    chunks: dict[ExpertKey, dict[str, tuple[TensorChunk, ...]]] = {}
    for name in index:
        bits = name.split(".")
        if len(bits) != 8 or bits[4] != "experts":
            continue
        key = (int(bits[2]), int(bits[5]))
        if key in chunks:
            continue

        def chunk(proj: str, key: ExpertKey = key) -> TensorChunk:
            info = index.info(expert_name(key, proj))
            return TensorChunk(info.path, info.name, info.offset, info.nbytes, info.dtype, info.numel)

        inter, hidden = index.info(expert_name(key, "gate_proj")).shape
        parts[key[0]] = (PartSpec("gate_up", (2 * inter, hidden)), PartSpec("down", (hidden, inter)))
        chunks[key] = {"gate_up": (chunk("gate_proj"), chunk("up_proj")), "down": (chunk("down_proj"),)}
    return ExpertCatalog(parts=parts, chunks=chunks, dtype=dtype)


def expected_parts(
    tensors: dict[str, torch.Tensor], key: ExpertKey, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    gate_up = torch.cat([tensors[expert_name(key, "gate_proj")], tensors[expert_name(key, "up_proj")]])
    return {"gate_up": gate_up.to(dtype), "down": tensors[expert_name(key, "down_proj")].to(dtype)}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (NaN payloads and -0.0 included)."""
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
    )

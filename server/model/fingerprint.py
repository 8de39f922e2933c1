"""A checkpoint's routing fingerprint: what a saved expert pool is only valid for.

A pool names experts by id, and an id means something only relative to the routers that
chose it: another checkpoint (retrained routers, another model, another expert layout) gives
the same ids another meaning, while serving the same checkpoint on another device or in
another dtype keeps it. So the fingerprint hashes the parsed ``config.json`` (canonical JSON: key order and
spacing do not count) and the stored bytes of every MoE layer's router, in layer order. It
does not depend on the serving device or dtype, and costs reading the routers only.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from expert_cache.safetensors_index import SafetensorsIndex, read_bytes_into
from server.model.config import ModelConfig

FINGERPRINT_CHARS = 32


def checkpoint_fingerprint(directory: Path, config: ModelConfig,
                           index: SafetensorsIndex | None = None) -> str:
    """Hex digest (``FINGERPRINT_CHARS`` long) of config.json and the router weights."""
    index = SafetensorsIndex.from_directory(directory) if index is None else index
    digest = hashlib.sha256()
    raw = json.loads((Path(directory) / "config.json").read_text())
    digest.update(json.dumps(raw, sort_keys=True, separators=(",", ":")).encode())
    names = config.names
    for layer in config.moe_layers:
        name = names.layer_tensor(layer, f"{names.mlp}.{names.router}.weight")
        info = index.info(name)
        digest.update(f"{name}:{info.dtype}:{list(info.shape)}:".encode())
        stored = torch.empty(info.nbytes, dtype=torch.uint8)
        read_bytes_into(info.path, info.offset, stored)
        digest.update(stored.numpy().tobytes())
    return digest.hexdigest()[:FINGERPRINT_CHARS]

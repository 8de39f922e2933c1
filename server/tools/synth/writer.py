"""Write a synthetic EMO checkpoint directory; find its planted experts; the cached demo model."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from server.cache_dir import cache_root
from server.model.dtypes import COMPUTE_DTYPES, torch_name
from server.model.families.emo import as_written_by_authors
from server.tools.synth.spec import SYNTH_KEY, SynthSpec, make_spec
from server.tools.synth.stream import INDEX_FILE, plan_shards, write_index, write_shards
from server.tools.synth.vocab import (
    BOS,
    DOMAINS,
    EOS,
    PAD,
    build_tokenizer,
    build_vocab,
    domain_index,
    token_domains,
    tokenizer_config,
)
from server.tools.synth.weights import PlantedWeights

DEMO_NAME = "demo-tiny-v1"  # bump when the tiny preset's bytes change


def write_checkpoint(
    out_dir: Path,
    preset: str = "tiny",
    *,
    seed: int = 0,
    domains: int | None = None,
    dtype: str = "bf16",
    shard_bytes: int = 2 * 1024**3,
    overrides: dict[str, Any] | None = None,
) -> Path:
    """Write the checkpoint of ``preset`` (with config ``overrides``) into ``out_dir``."""
    spec = make_spec(preset, seed=seed, domains=domains, dtype=dtype, overrides=overrides)
    return write_spec(Path(out_dir), spec, shard_bytes=shard_bytes)


def write_spec(
    out_dir: Path, spec: SynthSpec, *, shard_bytes: int, progress: Callable[[int, int], None] | None = None
) -> Path:
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir}: not empty; synth writes only into a new or empty directory")
    shards = plan_shards(spec.tensors(), spec.dtype, shard_bytes)  # validates before any write
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = build_vocab(spec.config["vocab_size"])
    ids = {tok: vocab.id(tok) for tok in (BOS, EOS, PAD)}
    config = {
        **spec.config,
        "bos_token_id": ids[BOS],
        "eos_token_id": ids[EOS],
        "pad_token_id": ids[PAD],
        "torch_dtype": torch_name(COMPUTE_DTYPES[spec.dtype]),
        SYNTH_KEY: spec.synth_record(),
    }
    D = len(spec.domains)
    weights = PlantedWeights(spec, token_domains(vocab, D), token_domains(vocab, D, spaced_only=True))
    threads = torch.get_num_threads()
    # One thread: the same bytes whatever the machine's core count (float reductions), and
    # these small ops run faster unthreaded than fighting over busy cores.
    torch.set_num_threads(1)
    try:
        write_shards(out_dir, shards, spec.dtype, weights.blocks, progress)
    finally:
        torch.set_num_threads(threads)
    write_index(out_dir, shards)
    build_tokenizer(vocab).save(str(out_dir / "tokenizer.json"))
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config(spec.config["max_position_embeddings"]))
    _write_json(out_dir / "special_tokens_map.json", {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD})
    _write_json(out_dir / "generation_config.json", {
        "bos_token_id": ids[BOS], "eos_token_id": ids[EOS], "pad_token_id": ids[PAD],
        "do_sample": True, "temperature": 0.8, "top_p": 0.95,
    })
    # last: its presence marks a complete write
    _write_json(out_dir / "config.json", as_written_by_authors(config))
    return out_dir


def _write_json(path: Path, obj: object) -> None:
    text = json.dumps(obj, indent=2)
    # one line per innermost list of integers (the planted expert ids), not one line per id
    text = re.sub(r"\[[\d\s,]*\]", lambda m: json.dumps(json.loads(m.group(0))), text)
    path.write_text(text + "\n")


def planted_experts(config_or_dir: Path | str | Mapping[str, Any], domain: str | int,
                    layer: int | None = None) -> list[int]:
    """Routable expert ids planted for ``domain`` (name or index into DOMAINS), read from a
    synthetic checkpoint's config.json (a directory, the file, or its parsed dict). The sets
    are the same in every MoE layer unless the layers' routable sets differ; then pass
    ``layer``."""
    if isinstance(config_or_dir, Mapping):
        config, where = config_or_dir, "config"
    else:
        path = Path(config_or_dir)
        path = path / "config.json" if path.is_dir() else path
        config, where = json.loads(path.read_text()), str(path)
    record = config.get(SYNTH_KEY)
    if not isinstance(record, dict):
        raise ValueError(f"{where}: no '{SYNTH_KEY}' entry; not a checkpoint written by emo-serve synth")
    name = DOMAINS[domain_index(domain)]
    if name not in record["domains"]:
        raise ValueError(f"{where}: domain {name!r} is not planted (planted: {record['domains']})")
    d = record["domains"].index(name)
    per_layer = [p[d] for p in record["planted_experts"] if p is not None]
    if layer is not None:
        entry = record["planted_experts"][layer]
        if entry is None:
            raise ValueError(f"{where}: layer {layer} is dense, it has no experts")
        return list(entry[d])
    if any(p != per_layer[0] for p in per_layer):
        raise ValueError(f"{where}: planted experts differ between layers; pass layer=")
    return list(per_layer[0])


def demo_checkpoint_dir() -> Path:
    """The tiny preset under $EMO_SERVE_CACHE (default ~/.cache/emo-serve), written once.

    Written into a temporary sibling directory and renamed into place, so a reader never sees
    a half-written demo; concurrent first calls both succeed (the loser discards its copy)."""
    root = cache_root()
    final = root / DEMO_NAME
    if (final / "config.json").exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEMO_NAME}.tmp-", dir=root))
    try:
        write_checkpoint(tmp, "tiny")
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


__all__ = ["INDEX_FILE", "demo_checkpoint_dir", "planted_experts", "write_checkpoint", "write_spec"]

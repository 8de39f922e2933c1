"""One training run end to end: corpus + tokenizer -> trained checkpoint with its record."""

from __future__ import annotations

import json
import platform
import sys
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from server.tools.demo.corpus import load_documents
from server.tools.demo.tokenizer_train import EOS, PAD, special_id
from server.tools.demo.train.config import DemoModelConfig
from server.tools.demo.train.data import batches, split_chunks, tokenize
from server.tools.demo.train.export import save_checkpoint
from server.tools.demo.train.loop import TrainConfig, TrainResult, train
from server.tools.demo.train.model import EmoForTraining

PRESETS: dict[str, DemoModelConfig] = {
    # The shipped model: see docs/demo.md and the training record for why this shape.
    "demo": DemoModelConfig(),
    # A few-second CPU configuration for tests and smoke runs.
    "smoke": DemoModelConfig(
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        num_kv_heads=2,
        intermediate_size=16,
        num_experts=9,
        top_k=3,
        max_position_embeddings=256,
    ),
}


def run_training(
    corpus: Path,
    tokenizer_dir: Path,
    out: Path,
    preset: str,
    cfg: TrainConfig,
    log: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    model_config = replace(PRESETS[preset], vocab_size=tokenizer.get_vocab_size())
    eos_id, pad_id = special_id(tokenizer, EOS), special_id(tokenizer, PAD)
    documents = load_documents(corpus, "train")
    chunks = split_chunks(tokenize(documents, tokenizer, eos_id), cfg.seq_len)
    if not chunks:
        raise ValueError(f"{corpus}: the training split has no document of 8 tokens or more")
    model = EmoForTraining(model_config)
    model.init_weights(cfg.seed)
    result = train(model, cfg, batches(chunks, cfg.batch_size, cfg.seq_len, pad_id, cfg.seed), log)
    save_checkpoint(
        model, out, tokenizer_dir, training_record(model_config, cfg, preset, result, len(chunks))
    )
    return result


def training_record(
    model_config: DemoModelConfig, cfg: TrainConfig, preset: str, result: TrainResult, chunks: int
) -> dict[str, Any]:
    return {
        "command": " ".join(sys.argv),
        "recipe": "EMO document pools (random size per document and layer)"
        if cfg.use_pools
        else "standard MoE control (per-token routing, no document pools)",
        "preset": preset,
        "model": model_config.as_dict(),
        "train": asdict(cfg),
        "steps": result.steps,
        "tokens_seen": result.tokens_seen,
        "training_chunks": chunks,
        "seconds": round(result.seconds, 1),
        "final_ce": result.final("ce") if result.history else None,
        "final_lb": result.final("lb") if result.history else None,
        "history": result.history,
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {platform.processor()} threads={torch.get_num_threads()}",
    }


def read_record(checkpoint: Path) -> dict[str, Any]:
    record: dict[str, Any] = json.loads((checkpoint / "training_record.json").read_text())
    return record

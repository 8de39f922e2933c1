"""Tiny checkpoints for the model tests: EMO configs with random weights, a word-level
tokenizer, and transformers-made models of the other families."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers

from server.model.families.emo import as_written_by_authors

SPECIALS = ["<unk>", "<bos>", "<eos>", "<pad>"]

EMO_BASE: dict[str, Any] = {
    "model_type": "emo", "architectures": ["EmoForCausalLM"], "vocab_size": 96, "hidden_size": 32,
    "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
    "intermediate_size": 16, "num_experts": 10, "num_experts_per_tok": 4, "num_shared_experts": 1,
    "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 256,
    "norm_topk_prob": False, "attention_bias": False, "tie_word_embeddings": False,
    "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
}


def write_tokenizer(directory: Path, vocab_size: int, **tok_config: Any) -> None:
    """A word-level tokenizer: specials, then words w4, w5, ... up to vocab_size."""
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIALS), vocab_size)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(SPECIALS)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
              "add_bos_token": True, "chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"}
    config.update(tok_config)
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [2], "temperature": 0.7}))


def emo_tensors(
    config: dict[str, Any], seed: int, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Random EMO weights under the tensor names of docs/emo.md."""
    g = torch.Generator().manual_seed(seed)
    H, V, D = config["hidden_size"], config["vocab_size"], config["head_dim"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    inter = config["intermediate_size"]
    L = config["num_hidden_layers"]
    per_layer = config.get("num_experts_per_layer") or [config["num_experts"]] * L

    def rnd(*shape: int, scale: float = 0.2) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    t = {"model.embed_tokens.weight": rnd(V, H, scale=1.0), "model.norm.weight": 1 + rnd(H, scale=0.1),
         "lm_head.weight": rnd(V, H)}
    for layer in range(L):
        p = f"model.layers.{layer}."
        t[p + "pre_attention_layernorm.weight"] = 1 + rnd(H, scale=0.1)
        t[p + "pre_feedforward_layernorm.weight"] = 1 + rnd(H, scale=0.1)
        for proj, rows, cols in (("q", heads * D, H), ("k", kv_heads * D, H), ("v", kv_heads * D, H),
                                 ("o", H, heads * D)):
            t[f"{p}self_attn.{proj}_proj.weight"] = rnd(rows, cols)
            if config.get("attention_bias"):
                t[f"{p}self_attn.{proj}_proj.bias"] = rnd(rows, scale=0.1)
        E = per_layer[layer]
        if E == 0:
            Id = config["dense_intermediate_size"]
            for part, shape in (("gate", (Id, H)), ("up", (Id, H)), ("down", (H, Id))):
                t[f"{p}mlp.{part}_proj.weight"] = rnd(*shape)
                if config.get("dense_mlp_bias"):
                    t[f"{p}mlp.{part}_proj.bias"] = rnd(shape[0], scale=0.1)
            continue
        t[p + "mlp.gate.weight"] = rnd(E, H, scale=1.0)  # spread router probabilities
        for e in range(E):
            q = f"{p}mlp.experts.{e}."
            t[q + "gate_proj.weight"] = rnd(inter, H)
            t[q + "up_proj.weight"] = rnd(inter, H)
            t[q + "down_proj.weight"] = rnd(H, inter)
    return t


def write_emo(directory: Path, seed: int = 0, shards: int = 1, dtype: torch.dtype = torch.float32,
              **overrides: Any) -> dict[str, Any]:
    """config.json + safetensors (sharded with an index when shards > 1) + tokenizer files."""
    directory.mkdir(parents=True, exist_ok=True)
    config = as_written_by_authors({**EMO_BASE, **overrides})  # with nulls, as real configs have
    tensors = emo_tensors(config, seed, dtype)
    (directory / "config.json").write_text(json.dumps(config))
    write_tokenizer(directory, config["vocab_size"])
    write_shards(directory, tensors, shards)
    return config


def write_shards(directory: Path, tensors: dict[str, torch.Tensor], shards: int) -> None:
    names = sorted(tensors)
    if shards == 1:
        save_file({n: tensors[n].contiguous() for n in names}, str(directory / "model.safetensors"))
        return
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = names[s::shards]
        save_file({n: tensors[n].contiguous() for n in part}, str(directory / fname))
        weight_map.update({n: fname for n in part})
    index = {"metadata": {}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))

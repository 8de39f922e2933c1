"""Greedy continuation through the serving path (server.model's loader, prefill and decode).

Used for the shipped model's recorded continuations and the README samples, so both exercise
exactly what `emo-serve serve` runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from server.model.kv_cache import KVCache
from server.model.loader import LoadedModel, load_model


@dataclass(frozen=True)
class Continuation:
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    pools: list[list[int]] | None  # per layer sorted expert ids; None under full routing


def load_for_generation(checkpoint: Path) -> LoadedModel:
    return load_model(checkpoint, device="cpu", dtype=torch.float32)


@torch.no_grad()
def greedy(loaded: LoadedModel, prompt: str, max_new_tokens: int, pool_size: int | None) -> Continuation:
    """Greedy decoding of `prompt`; stops at an EOS token or after `max_new_tokens`."""
    model, tokenizer = loaded.model, loaded.tokenizer
    prompt_ids = tokenizer.encode(prompt)
    if not prompt_ids:
        raise ValueError("greedy needs a prompt with at least one token")
    kv = KVCache(loaded.config, 1, len(prompt_ids) + max_new_tokens + 1, "cpu", torch.float32)
    out = model.prefill(torch.tensor(prompt_ids), kv, 0, pool_size=pool_size)
    mask = model.pool_mask_row(out.pools)[None]  # [1, L, E_max]
    eos = set(tokenizer.eos_token_ids)
    generated: list[int] = []
    logits = out.logits[-1]
    while len(generated) < max_new_tokens:
        token = int(torch.argmax(logits))
        if token in eos:
            break
        generated.append(token)
        position = torch.tensor([len(prompt_ids) + len(generated) - 1])
        logits = model.decode(torch.tensor([token]), position, kv, torch.tensor([0]), mask)[0]
    pools = None if out.pools is None else [p.tolist() for p in out.pools if p is not None]
    return Continuation(prompt_ids, generated, tokenizer.decode(generated), pools)

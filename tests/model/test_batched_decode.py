"""Batched decode equals one-at-a-time decode: mixed prompt lengths, slots and pools."""

from __future__ import annotations

from pathlib import Path

import torch

from server.model.kv_cache import KVCache
from server.model.loader import load_model
from tests.model.checkpoints import write_emo

PROMPTS = [[1, 5, 9], [1, 30, 31, 32, 33, 34, 35], [1, 60, 7, 61, 8, 62, 9, 63, 10, 64, 11],
           [1, 44, 45, 46, 47]]
POOLS = [None, 3, 9, 5]  # full routing, smallest pool, P = |R| (full), a middle pool
SLOTS = [4, 0, 2, 1]
STEPS = 8


def test_batched_greedy_equals_single(tmp_path: Path) -> None:
    write_emo(tmp_path, seed=11)
    loaded = load_model(tmp_path, device="cpu", dtype=torch.float32)
    model, config = loaded.model, loaded.config

    def prefill_all(kv: KVCache) -> tuple[list[int], torch.Tensor]:
        first, rows = [], []
        for prompt, pool, slot in zip(PROMPTS, POOLS, SLOTS, strict=True):
            out = model.prefill(torch.tensor(prompt), kv, slot, pool_size=pool)
            first.append(int(out.logits[0].argmax()))
            rows.append(model.pool_mask_row(out.pools))
        return first, torch.stack(rows)  # [B, L, E_max]

    # one sequence at a time
    kv = KVCache(config, num_slots=5, max_len=40, device="cpu", dtype=torch.float32)
    first, masks = prefill_all(kv)
    single_tokens, single_logits = [], []
    for b in range(len(PROMPTS)):
        token, tokens, logits_b = first[b], [], []
        for step in range(STEPS):
            tokens.append(token)
            logits = model.decode(torch.tensor([token]), torch.tensor([len(PROMPTS[b]) + step]), kv,
                                  torch.tensor([SLOTS[b]]), masks[b: b + 1])
            logits_b.append(logits[0])
            token = int(logits[0].argmax())
        single_tokens.append(tokens)
        single_logits.append(torch.stack(logits_b))

    # all together, each row at its own position
    kv = KVCache(config, num_slots=5, max_len=40, device="cpu", dtype=torch.float32)
    tokens_now, masks = prefill_all(kv)
    batch_tokens: list[list[int]] = [[] for _ in PROMPTS]
    batch_logits: list[list[torch.Tensor]] = [[] for _ in PROMPTS]
    for step in range(STEPS):
        for b, t in enumerate(tokens_now):
            batch_tokens[b].append(t)
        positions = torch.tensor([len(p) + step for p in PROMPTS])
        logits = model.decode(torch.tensor(tokens_now), positions, kv, torch.tensor(SLOTS), masks)
        for b in range(len(PROMPTS)):
            batch_logits[b].append(logits[b])
        tokens_now = [int(row.argmax()) for row in logits]

    assert batch_tokens == single_tokens
    for b in range(len(PROMPTS)):
        torch.testing.assert_close(torch.stack(batch_logits[b]), single_logits[b], atol=1e-5, rtol=0)
    # a P = |R| row and a full-routing row decode the same way as pool_mask=None
    assert masks[0].all() and masks[2].all()


def test_pool_mask_none_equals_all_true(tmp_path: Path) -> None:
    write_emo(tmp_path, seed=2)
    loaded = load_model(tmp_path, device="cpu", dtype=torch.float32)
    model, config = loaded.model, loaded.config
    results = []
    for mask in (None, model.pool_mask_row(None)[None].expand(2, -1, -1)):
        kv = KVCache(config, num_slots=2, max_len=16, device="cpu", dtype=torch.float32)
        for slot, prompt in enumerate(PROMPTS[:2]):
            model.prefill(torch.tensor(prompt), kv, slot, pool_size=None)
        logits = model.decode(torch.tensor([3, 4]), torch.tensor([3, 7]), kv, torch.tensor([0, 1]), mask)
        results.append(logits)
    assert torch.equal(results[0], results[1])

"""Loading in fp32 / bf16 / fp16, from bf16 files, with tied embeddings; logits are float32."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from server.model.kv_cache import KVCache
from server.model.loader import load_model
from tests.model.checkpoints import write_emo

PROMPT = torch.tensor([1, 7, 23, 40, 9, 81])
NAMED = {"bf16": torch.bfloat16, "float16": torch.float16, "fp32": torch.float32}  # what --dtype says


def logits(directory: Path, dtype: torch.dtype | str) -> torch.Tensor:
    loaded = load_model(directory, device="cpu", dtype=dtype)
    model = loaded.model
    assert model.dtype == (dtype if isinstance(dtype, torch.dtype) else NAMED[dtype])
    assert loaded.catalog.dtype == model.dtype
    assert all(t.dtype == model.dtype for s in [model.expert_store.slab(0)] for t in s.values())
    kv = KVCache(loaded.config, 1, 16, "cpu", model.dtype)
    out = model.prefill(PROMPT, kv, 0, pool_size=None, all_logits=True).logits
    assert out.dtype == torch.float32
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, "bf16", "float16"])
def test_half_precision_close_to_fp32(tmp_path: Path, dtype: torch.dtype | str) -> None:
    write_emo(tmp_path, seed=1)
    reference = logits(tmp_path, torch.float32)
    half = logits(tmp_path, dtype)
    assert (half - reference).abs().max() < 0.1 * reference.abs().max()


def test_bf16_files_auto_dtype(tmp_path: Path) -> None:
    write_emo(tmp_path, seed=1, dtype=torch.bfloat16)
    loaded = load_model(tmp_path)  # no dtype: the checkpoint's own
    assert loaded.model.dtype == torch.bfloat16
    assert logits(tmp_path, torch.float32).shape == (6, 96)


def test_tied_embeddings(tmp_path: Path) -> None:
    write_emo(tmp_path, seed=1, tie_word_embeddings=True)  # lm_head.weight in the file is ignored
    loaded = load_model(tmp_path, dtype=torch.float32)
    assert loaded.model.lm_head is loaded.model.embed

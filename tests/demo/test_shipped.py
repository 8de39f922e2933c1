"""The shipped demo checkpoint: loads through the normal loader, recorded greedy continuations,
and domain-specific pools (a code prompt and a licence prompt share fewer experts than two
held-out documents of one domain do on average)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from server.demo import demo_model_dir
from server.demo.generate import greedy, load_for_generation
from server.demo.samples import FIXED_PROMPTS
from server.model.loader import LoadedModel

EXPECTED = Path(__file__).parent / "shipped_expectations.json"
CHECKPOINT = demo_model_dir()
pytestmark = pytest.mark.skipif(
    CHECKPOINT is None, reason="no demo checkpoint shipped in server/demo/checkpoint"
)


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    assert CHECKPOINT is not None
    return load_for_generation(CHECKPOINT)


def jaccard(a: list[list[int]], b: list[list[int]]) -> float:
    sa = {(layer, e) for layer, ids in enumerate(a) for e in ids}
    sb = {(layer, e) for layer, ids in enumerate(b) for e in ids}
    return len(sa & sb) / len(sa | sb)


def test_loads_through_the_normal_loader(loaded: LoadedModel) -> None:
    assert loaded.config.family == "emo"
    assert loaded.config.default_pool_size() == 8
    assert loaded.tokenizer.chat_template and loaded.tokenizer.eos_token_ids
    assert CHECKPOINT is not None and sum(p.stat().st_size for p in CHECKPOINT.iterdir()) < 64 * 2**20


@pytest.mark.parametrize("name", sorted(FIXED_PROMPTS))
def test_greedy_continuations_equal_the_recorded_tokens(loaded: LoadedModel, name: str) -> None:
    expected = json.loads(EXPECTED.read_text())[name]
    got = greedy(loaded, FIXED_PROMPTS[name], len(expected["token_ids"]), expected["pool_size"])
    assert got.prompt_ids == expected["prompt_ids"]
    assert got.token_ids == expected["token_ids"]
    assert got.pools == expected["pools"]


def test_code_and_licence_prompts_get_different_pools(loaded: LoadedModel) -> None:
    assert CHECKPOINT is not None
    same_domain = json.loads((CHECKPOINT / "evaluation.json").read_text())["jaccard"]["emo"]["same_domain"]
    pool = loaded.config.default_pool_size()
    with torch.no_grad():
        code = greedy(loaded, FIXED_PROMPTS["code"], 1, pool).pools
        licence = greedy(loaded, FIXED_PROMPTS["licence"], 1, pool).pools
    assert code is not None and licence is not None
    assert jaccard(code, licence) < same_domain

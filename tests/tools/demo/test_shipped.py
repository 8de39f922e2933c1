"""The shipped demo checkpoint: loads through the normal loader, its logits and pools equal the
independent loop reference (tests/model/reference.py), recorded greedy continuations, and pools
that follow the content domain: prompts of one domain overlap far more than random pools of the
same size would, prompts of different domains about as little."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from server.demo_model import demo_model_dir
from server.model.kv_cache import KVCache
from server.model.loader import LoadedModel
from server.tools.demo.generate import greedy, load_for_generation
from server.tools.demo.samples import FIXED_PROMPTS
from tests.model.reference import EmoReference
from tests.tools.demo.domain_prompts import DOMAIN_PROMPTS

EXPECTED = Path(__file__).parent / "shipped_expectations.json"


@pytest.fixture(scope="module")
def checkpoint() -> Path:
    found = demo_model_dir()
    assert found is not None, "server/demo_model/checkpoint is part of the package; it is missing"
    return found


@pytest.fixture(scope="module")
def loaded(checkpoint: Path) -> LoadedModel:
    return load_for_generation(checkpoint)


def pool_set(pools: list[list[int]]) -> set[tuple[int, int]]:
    return {(layer, e) for layer, ids in enumerate(pools) for e in ids}


def jaccard(a: set[tuple[int, int]], b: set[tuple[int, int]]) -> float:
    return len(a & b) / len(a | b)


def test_loads_through_the_normal_loader(checkpoint: Path, loaded: LoadedModel) -> None:
    assert loaded.config.family == "emo"
    assert loaded.config.default_pool_size() == 8
    assert loaded.tokenizer.chat_template and loaded.tokenizer.eos_token_ids
    assert sum(p.stat().st_size for p in checkpoint.iterdir()) < 64 * 2**20


@pytest.mark.parametrize("pool", [None, 8])
def test_logits_and_pools_equal_the_loop_reference(checkpoint: Path, loaded: LoadedModel,
                                                   pool: int | None) -> None:
    ids = loaded.tokenizer.encode(FIXED_PROMPTS["licence"])[:16]
    kv = KVCache(loaded.config, 1, len(ids), "cpu", torch.float32)
    with torch.no_grad():
        out = loaded.model.prefill(torch.tensor(ids), kv, 0, pool_size=pool, all_logits=True)
    want, want_pools = EmoReference(checkpoint).forward(ids, pool_size=pool)
    assert (out.logits - want).abs().max() < 1e-3 * want.abs().max()
    got_pools = None if out.pools is None else [p.tolist() for p in out.pools if p is not None]
    assert got_pools == (None if pool is None else want_pools)


@pytest.mark.parametrize("name", sorted(FIXED_PROMPTS))
def test_greedy_continuations_equal_the_recorded_tokens(loaded: LoadedModel, name: str) -> None:
    """A regression pin (recorded with this code's greedy()); correctness is the reference test."""
    expected = json.loads(EXPECTED.read_text())[name]
    got = greedy(loaded, FIXED_PROMPTS[name], len(expected["token_ids"]), expected["pool_size"])
    assert got.prompt_ids == expected["prompt_ids"]
    assert got.token_ids == expected["token_ids"]
    assert got.pools == expected["pools"]


def random_pool_jaccard(layers: int, routable: int, size: int, draws: int = 10_000) -> float:
    """Mean Jaccard overlap of two random pools (`size` of `routable` experts in every layer)."""
    generator = torch.Generator().manual_seed(0)
    ranks = torch.rand(2, draws, layers, routable, generator=generator).argsort(-1).argsort(-1)
    chosen = (ranks < size).reshape(2, draws, -1)
    inter = (chosen[0] & chosen[1]).sum(-1)
    return float((inter / (2 * layers * size - inter)).mean())


def test_pools_follow_the_domain_far_beyond_random(loaded: LoadedModel) -> None:
    config = loaded.config
    size = config.default_pool_size()
    assert size is not None
    layers = config.moe_layers
    random_mean = random_pool_jaccard(len(layers), len(config.routable_experts(layers[0])), size)
    assert 0.13 < random_mean < 0.16  # 8 of 32 in each of 4 layers: 0.145
    with torch.no_grad():
        pools = {(domain, i): pool_set(greedy(loaded, prompt, 1, size).pools or [])
                 for domain, prompts in DOMAIN_PROMPTS.items() for i, prompt in enumerate(prompts)}
    pairs = list(itertools.combinations(pools, 2))
    for domain in DOMAIN_PROMPTS:
        same = [jaccard(pools[a], pools[b]) for a, b in pairs if a[0] == b[0] == domain]
        assert sum(same) / len(same) > random_mean + 0.15, (domain, same)  # measured: 0.37 to 0.70
    different = [jaccard(pools[a], pools[b]) for a, b in pairs if a[0] != b[0]]
    assert sum(different) / len(different) < random_mean + 0.05, different  # measured: 0.136

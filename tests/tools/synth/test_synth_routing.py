"""Planted domains through the real model: a prompt of domain d pools d's experts at every layer."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import jinja2
import pytest
import torch

from server.model import kv_cache, loader
from server.tools.synth import planted_experts, sample_prompt, write_checkpoint
from server.tools.synth.words import DOMAIN_WORDS


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("synth") / "tiny", "tiny")


def _load(path: Path, dtype: str = "float32"):  # -> LoadedModel
    return loader.load_model(path, device="cpu", dtype=dtype)


def _record_router_logits(model: torch.nn.Module) -> dict[int, torch.Tensor]:
    """Keep each MoE layer's last router logits [T, E] (the pool-deciding call of a prefill)."""
    seen: dict[int, torch.Tensor] = {}
    for index, layer in enumerate(model.layers):
        mlp = layer.mlp
        if not hasattr(mlp, "router_logits"):
            continue
        original: Callable[[torch.Tensor], torch.Tensor] = mlp.router_logits

        def record(x: torch.Tensor, original=original, index=index) -> torch.Tensor:
            out = original(x)
            seen[index] = out.detach().float()
            return out

        mlp.router_logits = record
    return seen


def _check_domain_prompt(lm, path: Path, domain: str, ids: list[int], min_mass: float = 0.8) -> None:
    planted = planted_experts(path, domain)
    kv = kv_cache.KVCache(lm.config, 1, len(ids), "cpu", lm.model.dtype)
    logits = _record_router_logits(lm.model)
    out = lm.model.prefill(torch.tensor(ids), kv, 0, pool_size=len(planted))
    assert out.pools is not None and len(out.pools) == lm.config.num_layers
    moe_layers = lm.config.moe_layers
    assert sorted(logits) == moe_layers, "router logits were not observed at every MoE layer"
    for layer in moe_layers:
        assert out.pools[layer].tolist() == planted, (domain, layer)
        routable = lm.config.routable_experts(layer)
        probs = torch.softmax(logits[layer][:, routable], dim=-1).sum(dim=0)  # [|R|] summed over T
        mass = float(probs[[routable.index(e) for e in planted]].sum() / len(ids))
        assert mass >= min_mass, (domain, layer, mass)
    for layer in set(range(lm.config.num_layers)) - set(moe_layers):
        assert out.pools[layer] is None


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_domain_pools_its_planted_experts_at_every_layer(tiny: Path, dtype: str) -> None:
    lm = _load(tiny, dtype)
    rng = random.Random(0)
    for domain in ("code", "medicine", "law", "sports"):
        for n_words in (12, 40):
            _check_domain_prompt(lm, tiny, domain, lm.tokenizer.encode(sample_prompt(domain, n_words, rng)))


def test_chat_formatted_prompts_too(tiny: Path) -> None:
    lm = _load(tiny)
    template = jinja2.Environment().from_string(lm.tokenizer.chat_template)
    rng = random.Random(1)
    for domain in ("code", "medicine", "law", "sports"):
        text = template.render(messages=[{"role": "user", "content": sample_prompt(domain, 16, rng)}],
                               add_generation_prompt=True, bos_token="<|bos|>", eos_token="<|endoftext|>")
        # the 3 leading template tokens have no domain to inherit: ~0.87 of the mass, not ~0.99
        _check_domain_prompt(lm, tiny, domain, lm.tokenizer.encode(text))


def test_default_pool_contains_the_planted_experts(tiny: Path) -> None:
    lm = _load(tiny)
    pool_size = lm.config.default_pool_size()
    assert pool_size == 8  # ceil(31 / 4)
    for domain in range(4):
        ids = lm.tokenizer.encode(sample_prompt(domain, 20, random.Random(domain)))
        kv = kv_cache.KVCache(lm.config, 1, len(ids), "cpu", torch.float32)
        out = lm.model.prefill(torch.tensor(ids), kv, 0, pool_size=pool_size)
        for pool in out.pools:
            assert set(planted_experts(tiny, domain)) <= set(pool.tolist())


def test_variants_always_active_experts_and_a_dense_layer(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path / "v", "tiny", seed=9, domains=3, overrides={
        "num_hidden_layers": 3, "num_experts_per_layer": [0, 32, 32], "dense_intermediate_size": 64,
        "num_shared_experts": 0, "always_active_experts": [4, 20],
    })
    lm = _load(path)
    assert lm.config.moe_layers == [1, 2]
    for domain in ("code", "medicine", "law"):
        ids = lm.tokenizer.encode(sample_prompt(domain, 30, random.Random(domain)))
        _check_domain_prompt(lm, path, domain, ids)


def test_generation_stays_in_domain_and_is_not_degenerate(tiny: Path) -> None:
    lm = _load(tiny)
    model, domain = lm.model, "medicine"
    ids = lm.tokenizer.encode(sample_prompt(domain, 20, random.Random(5)))
    steps = 12
    kv = kv_cache.KVCache(lm.config, 1, len(ids) + steps, "cpu", torch.float32)
    out = model.prefill(torch.tensor(ids), kv, 0, pool_size=7)
    mask = model.pool_mask_row(out.pools)[None]  # [1, L, E]
    token = int(out.logits[-1].argmax())
    generated = [token]
    for step in range(steps - 1):
        logits = model.decode(torch.tensor([token]), torch.tensor([len(ids) + step]), kv,
                              torch.tensor([0]), mask)
        assert logits.isfinite().all()
        token = int(logits[0].argmax())
        generated.append(token)
    words = lm.tokenizer.decode(generated).split()
    assert sum(w in DOMAIN_WORDS[domain] for w in words) >= 0.8 * len(generated), words
    assert len(set(generated)) >= 8, words  # planted successor chains, not a t t t loop

"""Pools made from examples (named pools) and prefills on a given pool, against the plain
reference in tests/model/reference.py."""

from __future__ import annotations

import pytest
import torch

from server.model.kv_cache import KVCache
from server.model.loader import LoadedModel, load_model
from tests.model.checkpoints import write_emo
from tests.model.reference import EmoReference

EXAMPLES = [[1, 7, 23, 40, 9, 81], [15, 33, 60, 12], [5, 90, 91, 92, 93, 2, 4]]


@pytest.fixture(scope="module", params=["one_shared", "dense_layer"])
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
          ) -> tuple[LoadedModel, EmoReference]:
    variant = {"one_shared": {}, "dense_layer": {"num_experts_per_layer": [10, 0, 10],
                                                  "dense_intermediate_size": 20}}[request.param]
    directory = tmp_path_factory.mktemp(request.param)
    write_emo(directory, seed=5, **variant)  # type: ignore[arg-type]
    return load_model(directory, device="cpu", dtype=torch.float32), EmoReference(directory)


def as_lists(pools: list[torch.Tensor | None] | None) -> list[list[int] | None]:
    assert pools is not None
    return [None if p is None else p.tolist() for p in pools]


def test_one_example_gives_the_pool_its_prefill_chooses(built: tuple[LoadedModel, EmoReference]) -> None:
    loaded, _ = built
    low, high = loaded.config.pool_bounds()
    for size in (low, high - 1):
        for ids in EXAMPLES:
            kv = KVCache(loaded.config, num_slots=1, max_len=16, device="cpu", dtype=torch.float32)
            prefilled = loaded.model.prefill(torch.tensor(ids), kv, 0, pool_size=size)
            assert as_lists(loaded.model.pools_from_examples([torch.tensor(ids)], size)) == as_lists(
                prefilled.pools)


def test_several_examples_sum_their_scores_layer_by_layer(built: tuple[LoadedModel, EmoReference]) -> None:
    loaded, ref = built
    size = loaded.config.pool_bounds()[0] + 1
    got = as_lists(loaded.model.pools_from_examples([torch.tensor(e) for e in EXAMPLES], size))
    assert got == ref.pools_from_examples(EXAMPLES, size)
    # the union is a different pool from each example's own in at least one layer: the test can tell
    assert any(got != ref.pools_from_examples([e], size) for e in EXAMPLES)


def test_prefill_on_a_given_pool_ignores_the_prompt(built: tuple[LoadedModel, EmoReference]) -> None:
    loaded, ref = built
    size = loaded.config.pool_bounds()[0] + 1
    given = ref.pools_from_examples(EXAMPLES[:2], size)
    prompt = EXAMPLES[2]
    kv = KVCache(loaded.config, num_slots=1, max_len=16, device="cpu", dtype=torch.float32)
    tensors = [None if p is None else torch.tensor(p) for p in given]
    out = loaded.model.prefill(torch.tensor(prompt), kv, 0, pool_size=size, all_logits=True,
                               given_pools=tensors)
    expected, used = ref.forward(prompt, given=given)
    assert as_lists(out.pools) == used == given
    torch.testing.assert_close(out.logits, expected, atol=1e-4, rtol=0)
    own, _ = ref.forward(prompt, pool_size=size)
    assert not torch.allclose(own, expected, atol=1e-4)  # the prompt's own pool would differ


def test_bad_given_pools_are_refused(built: tuple[LoadedModel, EmoReference]) -> None:
    loaded, _ = built
    size = loaded.config.pool_bounds()[0]
    kv = KVCache(loaded.config, num_slots=1, max_len=16, device="cpu", dtype=torch.float32)
    layers = loaded.config.num_layers
    moe = loaded.config.moe_layers[0]
    short = [torch.arange(size - 1) if layer == moe else (torch.arange(size) if loaded.config.is_moe(layer)
             else None) for layer in range(layers)]
    with pytest.raises(ValueError, match=f"layer {moe} needs {size} distinct routable"):
        loaded.model.prefill(torch.tensor([1, 2]), kv, 0, pool_size=size, given_pools=short)
    with pytest.raises(ValueError, match="one entry per layer"):
        loaded.model.prefill(torch.tensor([1, 2]), kv, 0, pool_size=size, given_pools=short[:-1])
    with pytest.raises(ValueError, match="non-empty"):
        loaded.model.pools_from_examples([], size)

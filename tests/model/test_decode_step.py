"""The static decode step: it compiles whole (fullgraph) and matches eager, recompiles for no
input value, reads pinned slots through slot tables on a paging store without calling it, stays
within the op budget, and refuses CUDA graphs on the CPU."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from expert_cache import TieredExpertCache
from expert_cache.base import ExpertCatalog
from server.demo_model import demo_model_dir
from server.model.decode_graphs import GraphedDecode, batch_buckets
from server.model.decode_step import attend_bucket
from server.model.kv_cache import KVCache
from server.model.loader import LoadedModel, load_model
from server.tools.bench.decode_step import OpCounter, PoolRow, count_cpu_ops
from tests.model.checkpoints import write_emo

SYNC_OPS = ("_local_scalar_dense", "item", "nonzero", "unique", "tolist")


@pytest.fixture(scope="module")
def demo() -> LoadedModel:
    directory = demo_model_dir()
    assert directory is not None, "the demo checkpoint ships with the package"
    return load_model(directory, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def gqa_shared(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    directory = tmp_path_factory.mktemp("gqa")
    config = write_emo(directory, seed=3)  # 4 query heads over 2 KV heads, 1 shared expert
    assert config["num_key_value_heads"] < config["num_attention_heads"] and config["num_shared_experts"] == 1
    return load_model(directory, device="cpu", dtype=torch.float32)


def counting_backend() -> tuple[list[int], Callable[..., Any]]:
    """aot_eager (whole-graph capture, functionalised) that records each compilation."""
    compiled: list[int] = []
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Any:
        compiled.append(len(gm.graph.nodes))
        return aot_eager(gm, example_inputs)

    return compiled, backend


@pytest.mark.parametrize("which", ["demo", "gqa_shared"])
def test_batch1_pool_row_step_compiles_fullgraph_and_matches_eager(which: str,
                                                                   request: pytest.FixtureRequest) -> None:
    loaded: LoadedModel = request.getfixturevalue(which)
    pool = loaded.config.default_pool_size()
    assert pool is not None
    row = PoolRow(loaded, pool)
    step = loaded.model.decode_step(row.kv)
    compiled_graphs, backend = counting_backend()
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=backend, dynamic=False)
    try:
        with torch.inference_mode():
            for position in (row.position, row.position + 1):  # new values, same shapes
                token = torch.tensor([row.token])
                args = (token, torch.tensor([position]), torch.tensor([0]), row.table[None])
                eager = step(*args, row.kv.max_len)
                got = compiled(*args, row.kv.max_len)
                torch.testing.assert_close(got, eager, atol=1e-5, rtol=0)
                assert int(got.argmax()) == int(eager.argmax())
                row.token = int(eager.argmax())
    finally:
        row.release()
    assert len(compiled_graphs) == 1, "a new position or token must not recompile the step"


def test_demo_step_stays_within_the_op_budget_and_never_syncs(demo: LoadedModel) -> None:
    row = PoolRow(demo, demo.config.default_pool_size())
    try:
        assert count_cpu_ops(row) <= 40  # was 134 on the eager paging path
        counter = OpCounter()
        row.step(counter)
    finally:
        row.release()
    syncing = [op for op in counter.counts if any(name in op for name in SYNC_OPS)]
    assert syncing == []


def test_pool_row_on_a_paging_store_reads_its_pinned_slots(tmp_path: Path) -> None:
    """On a partial device tier the pinned pool sits in arbitrary slots: the table must carry
    them, and a step must neither pin nor page (store counters unchanged)."""
    write_emo(tmp_path, seed=8, num_experts=12)
    resident = load_model(tmp_path, device="cpu", dtype=torch.float32)
    caches: list[TieredExpertCache] = []

    def factory(catalog: ExpertCatalog) -> TieredExpertCache:
        slots = 13  # one slab for the 3 layers' 33 routable experts; the pinned pools take 9
        caches.append(TieredExpertCache(catalog, device="cpu", host_budget_bytes=0,
                                        device_budget_bytes=slots * catalog.expert_bytes(0)))
        return caches[-1]

    paged = load_model(tmp_path, device="cpu", dtype=torch.float32, expert_store_factory=factory)
    assert paged.model.resident_table() is None  # full routing would page: no table for it
    prompt = torch.tensor([1, 17, 40, 33, 9, 61, 5, 70, 12])
    tokens: list[list[int]] = []
    for loaded in (resident, paged):
        model = loaded.model
        kv = KVCache(loaded.config, 2, 24, "cpu", torch.float32)
        out = model.prefill(prompt, kv, 1, pool_size=3, pin_pool=True)
        table = model.slot_table_row(out.pools, dict(zip(out.pinned, out.pinned_slots, strict=True)))
        before = model.expert_store.stats()
        token, got = int(out.logits[-1].argmax()), []
        for i in range(6):
            position = torch.tensor([len(prompt) + i])
            logits = model.decode(torch.tensor([token]), position, kv, torch.tensor([1]), None,
                                  slot_tables=table[None])
            token = int(logits[0].argmax())
            got.append(token)
        after = model.expert_store.stats()
        assert (after.device.hits, after.device.misses) == (before.device.hits, before.device.misses)
        assert after.pinned_slots == len(out.pinned)
        model.expert_store.release(out.pinned)
        tokens.append(got)
    assert tokens[0] == tokens[1]
    identity = resident.model.resident_table()
    assert identity is not None and caches[0].capacity(0) == 13
    pinned = table >= 0
    assert not torch.equal(table[pinned], identity[pinned])  # the pinned slots are not the resident ones
    caches[0].close()


def test_cuda_graphs_are_refused_on_cpu(gqa_shared: LoadedModel) -> None:
    kv = KVCache(gqa_shared.config, 2, 16, "cpu", torch.float32)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        GraphedDecode(gqa_shared.model.decode_step(kv), 4)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        gqa_shared.model.capture_decode_graphs(kv, 4)
    assert batch_buckets(1) == [1] and batch_buckets(16) == [1, 2, 4, 8, 16] and batch_buckets(12)[-1] == 12


def test_attend_bucket() -> None:
    assert [attend_bucket(n, 100) for n in (1, 16, 17, 64, 65, 100)] == [16, 16, 32, 64, 100, 100]
    with pytest.raises(ValueError, match="past the KV cache length"):
        attend_bucket(101, 100)

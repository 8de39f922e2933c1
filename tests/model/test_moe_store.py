"""The MoE block through the ExpertStore: only selected experts are acquired, groups fit the
free slots, everything is released, pool pins and prefetch hints follow the contract."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from expert_cache.base import ExpertCatalog, ExpertKey, SlotsExhausted
from expert_cache.resident import ResidentExpertStore
from server.model.kv_cache import KVCache
from server.model.loader import LoadedModel, load_model
from tests.model.checkpoints import write_emo

PROMPT = [1, 7, 23, 40, 9, 81, 15, 33, 60, 12, 5, 70, 71, 72]


class FewSlotStore(ResidentExpertStore):
    """Holds everything, but lets only ``limit`` distinct experts be pinned at once, and logs
    every call, so the model is exercised as against a device tier of ``limit`` slots."""

    def __init__(self, catalog: ExpertCatalog, limit: int) -> None:
        super().__init__(catalog, "cpu")
        self.limit, self.events, self.peak = limit, [], 0
        self.acquired: list[ExpertKey] = []

    def capacity(self, layer: int) -> int:
        return self.limit

    def free_slots(self, layer: int) -> int:
        pinned = sum(1 for key in self._pins if key[0] == layer)
        return self.limit - pinned

    def acquire_slots(self, keys: Sequence[ExpertKey]) -> list[int]:  # acquire() goes through it too
        layer = keys[0][0]
        new = {k for k in keys if self.pin_count(k) == 0}
        if len(new) > self.free_slots(layer):
            raise SlotsExhausted(layer, len(new), self.free_slots(layer), self.limit)
        slots = super().acquire_slots(keys)
        self.events.append(("acquire", tuple(keys)))
        self.acquired.extend(keys)
        self.peak = max(self.peak, sum(1 for key in self._pins if key[0] == layer))
        return slots

    def prefetch(self, keys: Sequence[ExpertKey]) -> None:
        self.events.append(("prefetch", tuple(keys)))


def load(tmp_path: Path, limit: int) -> tuple[LoadedModel, FewSlotStore]:
    if not (tmp_path / "config.json").exists():
        write_emo(tmp_path, seed=5)
    stores: list[FewSlotStore] = []
    loaded = load_model(tmp_path, dtype=torch.float32,
                        expert_store_factory=lambda c: stores.append(FewSlotStore(c, limit)) or stores[-1])
    return loaded, stores[0]


def kv_for(loaded: LoadedModel) -> KVCache:
    return KVCache(loaded.config, num_slots=1, max_len=32, device="cpu", dtype=torch.float32)


def test_full_routing_with_two_slots_equals_resident(tmp_path: Path) -> None:
    wide, _ = load(tmp_path, limit=64)
    narrow, store = load(tmp_path, limit=2)
    ids = torch.tensor(PROMPT)
    expected = wide.model.prefill(ids, kv_for(wide), 0, pool_size=None, all_logits=True).logits
    got = narrow.model.prefill(ids, kv_for(narrow), 0, pool_size=None, all_logits=True).logits
    assert torch.equal(got, expected)
    assert store.peak <= 2 and store.stats().pinned_slots == 0
    per_layer = {layer: {e for (lay, e) in store.acquired if lay == layer} for layer in range(3)}
    assert all(len(s) > 2 for s in per_layer.values())  # needed more experts than slots


def test_only_selected_experts_are_acquired(tmp_path: Path) -> None:
    """The eager paging path (full routing on a partial tier) pins only the experts chosen."""
    loaded, store = load(tmp_path, limit=64)
    model, kv = loaded.model, kv_for(loaded)
    model.fast_decode = False
    out = model.prefill(torch.tensor(PROMPT), kv, 0, pool_size=4)
    assert out.pools is not None
    store.acquired.clear()
    model.decode(torch.tensor([9]), torch.tensor([len(PROMPT)]), kv, torch.tensor([0]),
                 model.pool_mask_row(out.pools)[None])
    for layer, pool in enumerate(out.pools):
        got = [e for (lay, e) in store.acquired if lay == layer]
        assert len(got) == len(set(got)) == loaded.config.num_routed(layer)  # one token: its K-S picks
        assert set(got) <= set(pool.tolist())
    assert 9 not in {e for _, e in store.acquired}  # the shared expert (id 9) is trunk
    assert store.stats().pinned_slots == 0


def test_no_free_slot_raises_slots_exhausted(tmp_path: Path) -> None:
    loaded, store = load(tmp_path, limit=0)
    with pytest.raises(SlotsExhausted):
        loaded.model.prefill(torch.tensor(PROMPT), kv_for(loaded), 0, pool_size=None)
    assert store.stats().pinned_slots == 0


def test_pin_pool_and_prefetch(tmp_path: Path) -> None:
    loaded, store = load(tmp_path, limit=64)
    out = loaded.model.prefill(torch.tensor(PROMPT), kv_for(loaded), 0, pool_size=4, pin_pool=True)
    assert out.pools is not None
    assert sorted(out.pinned) == sorted((layer, e) for layer, p in enumerate(out.pools) for e in p.tolist())
    assert all(store.pin_count(key) == 1 for key in out.pinned)
    assert store.stats().pinned_slots == len(out.pinned)
    # layer l + 1's predicted pool is prefetched before layer l's experts are acquired
    for layer in (0, 1):
        hint = next(i for i, (kind, keys) in enumerate(store.events)
                    if kind == "prefetch" and keys[0][0] == layer + 1)
        pin, compute = [i for i, (kind, keys) in enumerate(store.events)
                        if kind == "acquire" and keys[0][0] == layer][:2]  # the pool pin, then compute
        assert len(store.events[hint][1]) == 4 and pin < hint < compute
    store.release(out.pinned)
    assert store.stats().pinned_slots == 0


def test_pin_pool_failure_releases_everything(tmp_path: Path) -> None:
    loaded, store = load(tmp_path, limit=3)  # a pool of 4 cannot be pinned
    with pytest.raises(SlotsExhausted):
        loaded.model.prefill(torch.tensor(PROMPT), kv_for(loaded), 0, pool_size=4, pin_pool=True)
    assert store.stats().pinned_slots == 0


def test_pinned_pool_fills_every_slot_and_still_runs(tmp_path: Path) -> None:
    loaded, store = load(tmp_path, limit=4)  # the pinned pool of 4 takes every slot of a layer
    model, kv = loaded.model, kv_for(loaded)
    out = model.prefill(torch.tensor(PROMPT), kv, 0, pool_size=4, pin_pool=True)
    assert all(store.free_slots(layer) == 0 for layer in range(3))
    model.decode(torch.tensor([9]), torch.tensor([len(PROMPT)]), kv, torch.tensor([0]),
                 model.pool_mask_row(out.pools)[None])
    assert store.stats().pinned_slots == len(out.pinned) == 12
    store.release(out.pinned)


def test_pool_row_decode_reads_slot_table_without_store_calls(tmp_path: Path) -> None:
    """A pinned pool's slots (from prefill) fill the row's slot table; decoding through it never
    calls the store and gives the eager path's logits."""
    loaded, store = load(tmp_path, limit=64)
    model = loaded.model
    logits = []
    for fast in (False, True):
        model.fast_decode = fast
        kv = kv_for(loaded)
        out = model.prefill(torch.tensor(PROMPT), kv, 0, pool_size=4, pin_pool=True)
        assert out.pools is not None and len(out.pinned_slots) == len(out.pinned)
        table = model.slot_table_row(out.pools, dict(zip(out.pinned, out.pinned_slots, strict=True)))
        for layer, pool in enumerate(out.pools):
            allowed = set(pool.tolist())
            for e in loaded.config.routable_experts(layer):
                expected = store.slots_of([(layer, e)])[0] if e in allowed else -1
                assert int(table[layer, e]) == expected
        store.events.clear()
        logits.append(model.decode(torch.tensor([9]), torch.tensor([len(PROMPT)]), kv, torch.tensor([0]),
                                   model.pool_mask_row(out.pools)[None], table[None] if fast else None))
        if fast:
            assert store.events == []  # no acquire, no release inside the step
        store.release(out.pinned)
    torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=0)
    assert logits[1].argmax() == logits[0].argmax()

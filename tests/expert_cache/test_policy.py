"""The slot table alone: pins, LRU order, busy keys, protection."""

from __future__ import annotations

import pytest

from expert_cache.policy import SlotTable


def test_lru_eviction_order_and_pins() -> None:
    t: SlotTable[str] = SlotTable(3)
    assert [t.insert(k) for k in "abc"] == [(0, None), (1, None), (2, None)]
    assert t.lru_order() == ["a", "b", "c"]
    t.pin("a")
    t.touch("b")
    assert t.lru_order() == ["c", "b"] and t.unpinned_slots == 2
    assert t.insert("d") == (2, "c")  # least recently used unpinned
    assert t.unpin("a") is True and t.lru_order() == ["b", "d", "a"]
    t.pin("b")
    t.pin("b")
    assert t.unpin("b") is False and t.pins("b") == 1 and t.pinned == 1


def test_pinned_busy_and_protected_keys_are_never_victims() -> None:
    t: SlotTable[int] = SlotTable(3)
    for k in range(3):
        t.insert(k)
    t.pin(0)
    t.set_busy(1, True)
    assert t.victims_available() == 1 and t.victims_available(exclude=[2]) == 0
    with pytest.raises(LookupError):
        t.insert(9, protect={2})
    assert t.insert(9) == (2, 2)
    with pytest.raises(LookupError):
        t.insert(10, protect={9})  # 0 pinned, 1 busy, 9 protected
    t.set_busy(1, False)
    assert t.insert(10, protect={9}) == (1, 1)


def test_remove_needed_to_pin_and_errors() -> None:
    t: SlotTable[str] = SlotTable(2)
    t.insert("a")
    t.pin("a")
    with pytest.raises(ValueError, match="pinned"):
        t.remove("a")
    with pytest.raises(ValueError, match="already resident"):
        t.insert("a")
    assert t.needed_to_pin(["a", "b", "b", "c"]) == 2
    t.unpin("a")
    with pytest.raises(ValueError, match="not pinned"):
        t.unpin("a")
    assert t.remove("a") == 0 and "a" not in t and len(t) == 0
    assert t.insert("z") == (0, None)
    with pytest.raises(ValueError):
        SlotTable(-1)

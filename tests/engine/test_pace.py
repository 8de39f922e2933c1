"""Prefill pacing: a piece of prefill is sized from measured decode-step and prefill-row times."""

from __future__ import annotations

import pytest

from server.engine.pace import PrefillPace


def test_piece_is_a_share_of_a_decode_step_capped_by_max_rows() -> None:
    pace = PrefillPace(max_rows=2048, share=0.5)
    assert pace.budget(decoding=True) == 2048  # nothing measured yet
    pace.decoded(0.100)
    pace.prefilled(rows=1000, seconds=1.0)  # 1 ms per row
    assert pace.budget(decoding=True) == 50  # half of 100 ms
    assert pace.budget(decoding=False) == 2048  # nobody to keep waiting
    pace.prefilled(rows=1000, seconds=0.001)  # much faster now: the average moves towards it
    assert 50 < pace.budget(decoding=True) <= 2048
    fast = PrefillPace(max_rows=300, share=0.5)
    fast.decoded(1.0)
    fast.prefilled(rows=10, seconds=0.001)
    assert fast.budget(decoding=True) == 300
    off = PrefillPace(max_rows=64, share=0.0)
    off.decoded(0.001)
    off.prefilled(rows=1, seconds=1.0)
    assert off.budget(decoding=True) == 64
    slow = PrefillPace(max_rows=64, share=0.5)
    slow.decoded(0.001)
    slow.prefilled(rows=1, seconds=1.0)
    assert slow.budget(decoding=True) == 1  # at least one unit of work


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="max_rows"):
        PrefillPace(max_rows=0, share=0.5)
    with pytest.raises(ValueError, match="share"):
        PrefillPace(max_rows=1, share=-1)

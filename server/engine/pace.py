"""How much prefill work one engine step may do.

Between two decode steps of the running batch the engine runs at most one piece of prefill, so a
stream's gap between tokens is a decode step plus that piece. Keeping the piece within ``share``
of a decode step keeps the gaps within ``1 + share`` times their usual size, on any hardware: the
piece's size in token rows comes from the measured time of decode steps and of prefill rows
(moving averages), capped by ``max_rows``. With nothing decoding, or before anything has been
measured, a piece is ``max_rows``. ``share`` 0 turns the pacing off (pieces of ``max_rows``).
"""

from __future__ import annotations

ALPHA = 0.2  # weight of the newest sample in the moving averages


class PrefillPace:
    def __init__(self, max_rows: int, share: float) -> None:
        if max_rows < 1 or share < 0:
            raise ValueError(f"PrefillPace: max_rows must be >= 1 and share >= 0, got {max_rows}, {share}")
        self.max_rows, self.share = max_rows, share
        self.decode_s: float | None = None  # one decode step
        self.row_s: float | None = None  # one token row of prefill work

    def decoded(self, seconds: float) -> None:
        self.decode_s = seconds if self.decode_s is None else (1 - ALPHA) * self.decode_s + ALPHA * seconds

    def prefilled(self, rows: int, seconds: float) -> None:
        if rows <= 0:
            return
        per_row = seconds / rows
        self.row_s = per_row if self.row_s is None else (1 - ALPHA) * self.row_s + ALPHA * per_row

    def budget(self, decoding: bool) -> int:
        """Token rows the next piece may take (at least one unit of work always runs)."""
        if not decoding or self.share == 0 or self.decode_s is None or not self.row_s:
            return self.max_rows
        return max(1, min(self.max_rows, int(self.share * self.decode_s / self.row_s)))

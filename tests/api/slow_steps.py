"""Decode steps slowed by a fixed sleep, so that a test needing a request still running (drain,
disconnect) gets one on any machine: N tokens take at least N x delay seconds, however fast the
CPU. Run as a module it is `python -m server` with the steps slowed: the first argument is the
delay in seconds, the rest the CLI's arguments."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from server.engine.model_runner import ModelRunner
from server.engine.sequence import Sequence


def slow_decode_steps(delay_s: float) -> None:
    decode = ModelRunner.decode

    def slowed(self: ModelRunner, seqs: list[Sequence]) -> torch.Tensor:
        time.sleep(delay_s)
        return decode(self, seqs)

    ModelRunner.decode = slowed  # type: ignore[method-assign]


@contextmanager
def slowed_decode_steps(delay_s: float) -> Iterator[None]:
    decode = ModelRunner.decode
    slow_decode_steps(delay_s)
    try:
        yield
    finally:
        ModelRunner.decode = decode  # type: ignore[method-assign]


if __name__ == "__main__":
    from server.cli import main

    slow_decode_steps(float(sys.argv[1]))
    sys.exit(main(sys.argv[2:]))

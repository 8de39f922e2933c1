"""`emo-serve` with a fault planted, for tests that need a real process and its exit code.

    python -m tests.api.faulty_serve serve [serve flags...]

The first decode step raises the CUDA error that an illegal memory access gives (the fault is
injected by replacing the model's decode; everything else is the real server)."""

from __future__ import annotations

import sys
from typing import Any

from server.cli import main
from server.model.model import MoETransformer

ILLEGAL_ADDRESS = "CUDA error: an illegal memory access was encountered"


def poisoned_decode(self: MoETransformer, *args: Any, **kwargs: Any) -> Any:
    raise RuntimeError(ILLEGAL_ADDRESS)


if __name__ == "__main__":
    MoETransformer.decode = poisoned_decode  # type: ignore[assignment,method-assign]
    sys.exit(main(sys.argv[1:]))

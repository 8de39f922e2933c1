"""Fixtures shared by every test package: small synthetic checkpoints, written once per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# Tests are many small tensor ops; extra threads only contend on the 2-core CI machine.
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def emo_serve_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """$EMO_SERVE_CACHE for every test and the processes they start: a fresh directory of this
    session, so no test writes outside tmp and none reuses weights a previous version wrote."""
    path = tmp_path_factory.mktemp("emo-serve-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EMO_SERVE_CACHE", str(path))
        yield path


@pytest.fixture(scope="session")
def tiny_emo_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic `tiny` EMO checkpoint (planted domains, seed 0), fp32 weights."""
    from server.model.synth import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("tiny-emo"), "tiny", seed=0, dtype="fp32")

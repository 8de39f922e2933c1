"""Fixtures shared by every test package: small synthetic checkpoints, written once per session."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis.configuration import set_hypothesis_home_dir

# Tests are many small tensor ops; extra threads only contend on the 2-core CI machine.
torch.set_num_threads(1)


def pytest_configure(config: pytest.Config) -> None:
    """Hypothesis' storage (example database, constants cache; ./.hypothesis by default, inside
    the checkout) goes to a temporary directory. It is set before collection, which already
    writes to it, so before any fixture could."""
    storage = Path(tempfile.mkdtemp(prefix="emo-serve-hypothesis-"))
    set_hypothesis_home_dir(storage)
    config.add_cleanup(lambda: shutil.rmtree(storage, ignore_errors=True))


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
    from server.tools.synth import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("tiny-emo"), "tiny", seed=0, dtype="fp32")

"""Optional test dependencies (transformers, the prometheus binaries): a developer machine
without one skips the tests that need it; CI (``CI`` set, and not "0"/"false") fails them,
because there a skip would report a check that never ran as if nothing were wrong."""

from __future__ import annotations

import importlib
import os
import shutil
from types import ModuleType

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing(what: str, install: str) -> None:
    """Skip (or, in CI, fail) the calling test: ``what`` is absent, ``install`` provides it."""
    if in_ci():
        pytest.fail(f"{what} is required in CI ({install})")
    pytest.skip(f"{what} is not installed ({install})", allow_module_level=True)


def require_module(name: str, install: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        # only the optional package itself may be missing; a missing module of ours must error
        if e.name is None or name.split(".")[0] != e.name.split(".")[0]:
            raise
        missing(f"the Python package {e.name!r}", install)
        raise  # unreachable: missing() raises


def require_binary(name: str, install: str) -> str:
    path = shutil.which(name)
    if path is None:
        missing(f"the {name!r} binary", install)
        raise AssertionError("unreachable")
    return path

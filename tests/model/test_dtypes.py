"""The one table of compute dtype names agrees with torch and serves every entry point alike."""

from __future__ import annotations

import pytest
import torch

from server.model.dtypes import COMPUTE_DTYPES, DTYPE_NAMES, resolve_dtype, torch_name


@pytest.mark.parametrize("name", sorted(DTYPE_NAMES))
def test_every_spelling_is_torch_s_or_a_short_name_of_a_compute_dtype(name: str) -> None:
    dtype = DTYPE_NAMES[name]
    assert dtype in COMPUTE_DTYPES.values()
    assert name in COMPUTE_DTYPES or getattr(torch, name) is dtype
    assert resolve_dtype(name, torch.device("cpu")) is dtype


@pytest.mark.parametrize("dtype", list(COMPUTE_DTYPES.values()))
def test_config_json_name_reads_back(dtype: torch.dtype) -> None:
    assert DTYPE_NAMES[torch_name(dtype)] is dtype and getattr(torch, torch_name(dtype)) is dtype


def test_flags_list_the_short_names_in_order() -> None:
    assert list(COMPUTE_DTYPES) == ["bf16", "fp16", "fp32"]
    with pytest.raises(ValueError, match="int8"):
        resolve_dtype("int8", torch.device("cpu"))

"""The names of the compute dtypes: the one table that flags, configs and writers read.

A model computes in bfloat16, float16 or float32. Each has a short name (``bf16``, ``fp16``,
``fp32``: what flags offer, in this order) and torch's own name (``bfloat16``, ``float16``,
``float32``: what transformers writes as ``torch_dtype`` in config.json); ``half`` and ``float``
are accepted too, as torch's aliases. The dtype codes inside safetensors files (``BF16``,
``F32``, ``I64``, ...) are another namespace, the file format's, covering integer dtypes as
well: they stay with the reader, in ``expert_cache/safetensors_index.py``.
"""

from __future__ import annotations

import torch

# short name -> dtype, in the order flags list them
COMPUTE_DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
}

# every accepted spelling -> dtype
DTYPE_NAMES: dict[str, torch.dtype] = {
    **COMPUTE_DTYPES,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "float": torch.float32,
}


def torch_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``: the spelling of config.json's ``torch_dtype``."""
    return str(dtype).removeprefix("torch.")

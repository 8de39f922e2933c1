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


def resolve_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The one meaning of a ``--dtype`` value: 'auto' / None -> bf16 on CUDA, fp32 on CPU (a CPU
    has no fast bf16 matmul); otherwise any spelling above, or a compute dtype itself."""
    if isinstance(name, torch.dtype):
        if name not in COMPUTE_DTYPES.values():
            raise ValueError(f"dtype: {name} is not supported (bf16, fp16, fp32)")
        return name
    if name in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype: {name!r} is not supported (use auto, bf16, fp16 or fp32)")
    return DTYPE_NAMES[name]


def short_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bf16"``: the spelling flags and reports use."""
    return next(name for name, d in COMPUTE_DTYPES.items() if d is dtype)


def torch_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``: the spelling of config.json's ``torch_dtype``."""
    return str(dtype).removeprefix("torch.")

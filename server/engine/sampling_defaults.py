"""What a request gets for each sampling parameter it leaves out: one rule for the API and `generate`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


def _number(values: Mapping[str, Any], name: str, fallback: float) -> float:
    value = values.get(name)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else fallback


@dataclass(frozen=True)
class SamplingDefaults:
    """The checkpoint's generation_config.json values where it gives them, else OpenAI's
    defaults (temperature 1, top_p 1, no top-k / min-p / repetition penalty). An explicit
    ``"do_sample": false`` means greedy, as transformers' ``generate`` reads it; an absent
    ``do_sample`` leaves sampling on (transformers would decode greedily, but OpenAI clients expect
    temperature 1 unless told otherwise, which is also what vLLM does)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    @classmethod
    def from_generation_config(cls, values: Mapping[str, Any]) -> SamplingDefaults:
        greedy = values.get("do_sample") is False
        return cls(temperature=0.0 if greedy else _number(values, "temperature", 1.0),
                   top_p=_number(values, "top_p", 1.0),
                   top_k=max(0, int(_number(values, "top_k", 0))),
                   min_p=_number(values, "min_p", 0.0),
                   repetition_penalty=_number(values, "repetition_penalty", 1.0))

"""Field readers shared by the family adapters: typed, with errors naming the field."""

from __future__ import annotations

from typing import Any

from server.model.config import RopeConfig

_MISSING = object()
ROPE_FIELDS = ("rope_parameters", "rope_scaling")


def drop_nulls(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with every ``null`` removed, inside the rope dicts too.

    transformers' ``save_pretrained`` writes every optional field of a config class, ``null``
    when unset (``"dense_intermediate_size": null``, ``"rope_scaling": null``); the model code
    reading it treats those as "not given". Reading null as absent everywhere gives one rule.
    """
    out = {k: v for k, v in raw.items() if v is not None}
    for name in ROPE_FIELDS:
        if isinstance(out.get(name), dict):
            out[name] = {k: v for k, v in out[name].items() if v is not None}
    return out


def with_defaults(raw: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """Nulls dropped, then the family's own defaults (its config class's) for absent fields:
    what transformers builds from a config.json that leaves a field out. One exception: a null
    ``num_key_value_heads`` keeps the Llama family's backward-compatible meaning, one KV head per
    attention head, whatever the default for an absent field."""
    if "num_key_value_heads" in raw and raw["num_key_value_heads"] is None:
        defaults = {k: v for k, v in defaults.items() if k != "num_key_value_heads"}
    return {**defaults, **drop_nulls(raw)}


def get_int(raw: dict[str, Any], name: str, default: Any = _MISSING) -> int:
    value = raw.get(name, default)
    if value is _MISSING:
        raise ValueError(f"config field {name} is missing")
    if value is None and default is None:
        return None  # type: ignore[return-value]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"config field {name} must be an integer, got {value!r}")
    return value


def get_float(raw: dict[str, Any], name: str, default: Any = _MISSING) -> float:
    value = raw.get(name, default)
    if value is _MISSING:
        raise ValueError(f"config field {name} is missing")
    if value is None and default is None:
        return None  # type: ignore[return-value]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"config field {name} must be a number, got {value!r}")
    return float(value)


def get_bool(raw: dict[str, Any], name: str, default: bool) -> bool:
    value = raw.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValueError(f"config field {name} must be true or false, got {value!r}")
    return value


def get_int_list(raw: dict[str, Any], name: str, length: int | None = None) -> list[int] | None:
    value = raw.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
        raise ValueError(f"config field {name} must be a list of integers, got {value!r}")
    if length is not None and len(value) != length:
        raise ValueError(f"config field {name} must have {length} entries (one per layer), got {len(value)}")
    return value


def token_ids(value: Any, name: str) -> tuple[int, ...]:
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    if any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        raise ValueError(f"config field {name} must be an integer or a list of integers, got {value!r}")
    return tuple(values)


def parse_rope(raw: dict[str, Any], max_position_embeddings: int) -> RopeConfig:
    """Read ``rope_parameters`` (transformers >= 5) or ``rope_theta`` + ``rope_scaling`` (older)."""
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if isinstance(params, dict):
        params = {k: v for k, v in params.items() if v is not None}
    if not isinstance(params, dict):
        raise ValueError(f"config field rope_parameters/rope_scaling must be an object, got {params!r}")
    if any(isinstance(v, dict) for v in params.values()):
        raise ValueError("config field rope_parameters: per-layer-type rope parameters are not supported")
    sub = dict(params)
    sub.setdefault("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = sub.get("rope_type", sub.get("type", "default"))
    partial = sub.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ValueError(f"config field partial_rotary_factor: only 1.0 is supported, got {partial!r}")
    original = sub.get("original_max_position_embeddings", raw.get("original_max_position_embeddings"))
    if rope_type in ("llama3", "yarn") and original is None:
        original = max_position_embeddings
    factor = sub.get("factor")
    if factor is None:
        if rope_type == "yarn":
            assert original is not None  # defaulted above for llama3 / yarn
            factor = max_position_embeddings / original
        elif rope_type != "default":
            raise ValueError(f"config field rope_parameters.factor is missing for rope type {rope_type!r}")
        else:
            factor = 1.0
    try:
        return RopeConfig(
            rope_type=str(rope_type),
            theta=float(get_float(sub, "rope_theta")),
            factor=float(factor),
            original_max_position_embeddings=None if original is None else int(original),
            low_freq_factor=float(sub.get("low_freq_factor", 1.0)),
            high_freq_factor=float(sub.get("high_freq_factor", 4.0)),
            attention_factor=None if sub.get("attention_factor") is None else float(sub["attention_factor"]),
            beta_fast=float(sub.get("beta_fast") or 32.0),
            beta_slow=float(sub.get("beta_slow") or 1.0),
            mscale=None if sub.get("mscale") is None else float(sub["mscale"]),
            mscale_all_dim=None if sub.get("mscale_all_dim") is None else float(sub["mscale_all_dim"]),
            truncate=bool(sub.get("truncate", True)),
        )
    except ValueError as e:
        raise ValueError(f"config field rope_parameters: {e}") from e


def common_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """Fields every family spells the same way (the Llama convention)."""
    hidden = get_int(raw, "hidden_size")
    heads = get_int(raw, "num_attention_heads")
    head_dim = get_int(raw, "head_dim", None)
    if head_dim is None and heads > 0:
        if hidden % heads:
            raise ValueError(
                f"config field head_dim is missing and hidden_size ({hidden}) is not a multiple of "
                f"num_attention_heads ({heads})"
            )
        head_dim = hidden // heads
    max_pos = get_int(raw, "max_position_embeddings")
    window = raw.get("sliding_window")
    if raw.get("use_sliding_window") or (
        "use_sliding_window" not in raw and isinstance(window, int) and 0 < window < max_pos
    ):
        raise ValueError("config field sliding_window: sliding-window attention is not supported")
    return dict(
        vocab_size=get_int(raw, "vocab_size"),
        hidden_size=hidden,
        num_layers=get_int(raw, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=get_int(raw, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        max_position_embeddings=max_pos,
        rms_norm_eps=get_float(raw, "rms_norm_eps", 1e-6),
        tie_word_embeddings=get_bool(raw, "tie_word_embeddings", False),
        hidden_act=raw.get("hidden_act", "silu"),
        rope=parse_rope(raw, max_pos),
        bos_token_id=get_int(raw, "bos_token_id", None),
        eos_token_ids=token_ids(raw.get("eos_token_id"), "eos_token_id"),
    )


def sparse_layers(raw: dict[str, Any], num_layers: int, num_experts: int) -> list[bool]:
    """Qwen-MoE layer pattern: MoE iff not in mlp_only_layers and (l + 1) % decoder_sparse_step == 0."""
    step = get_int(raw, "decoder_sparse_step", 1)
    if step <= 0:
        raise ValueError(f"config field decoder_sparse_step must be >= 1, got {step}")
    only = set(get_int_list(raw, "mlp_only_layers") or [])
    return [num_experts > 0 and layer not in only and (layer + 1) % step == 0 for layer in range(num_layers)]

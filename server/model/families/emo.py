"""allenai EMO (``model_type: emo``): shared experts, always-active experts, dense layers.

Read the way the authors' ``EmoConfig`` / ``EmoModel`` read a config.json (see
docs/checkpoints.md, "EMO config.json"): null is absent, absent fields take EmoConfig's
defaults, and the routing structure is resolved per layer exactly as their model builds it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from server.model.config import ModelConfig, TensorNames
from server.model.families._common import (
    common_fields,
    get_bool,
    get_int,
    get_int_list,
    with_defaults,
)

NAMES = TensorNames(attn_norm="pre_attention_layernorm", mlp_norm="pre_feedforward_layernorm")

# EmoConfig.__init__'s defaults (fields the decoder reads; None defaults are simply absent)
DEFAULTS: dict[str, Any] = {
    "vocab_size": 100352, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "hidden_act": "silu", "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6, "eos_token_id": 100257, "tie_word_embeddings": False, "rope_theta": 500000.0,
    "attention_bias": False, "num_experts_per_tok": 5, "num_experts": 7, "norm_topk_prob": False,
    "num_shared_experts": 0, "dense_mlp_bias": False,
}
# EmoModel has no q/k norm and no qkv clipping: "qk_norm" / "clip_qkv" keys are ignored as it does
# the authors' model raises NotImplementedError with this reason; we refuse at load instead
NORM_TOPK_REFUSAL = ("norm_topk_prob is not implemented for the case where num_shared_experts > 0 "
                     "or always_active_experts is set")


def _always_active(raw: dict[str, Any], L: int) -> list[tuple[int, ...]]:
    """Per layer, as EmoModel resolves them: the per-layer list wins; else one global list
    for every layer. A null (or empty) entry means none at that layer."""
    per_layer = raw.get("always_active_experts_per_layer")
    if per_layer is None:
        ids = get_int_list(raw, "always_active_experts") or []
        return [tuple(ids)] * L
    if not isinstance(per_layer, list) or len(per_layer) != L or any(
        a is not None and (not isinstance(a, list)
                           or any(isinstance(x, bool) or not isinstance(x, int) for x in a))
        for a in per_layer
    ):
        raise ValueError(f"config field always_active_experts_per_layer must be {L} lists of integers "
                         f"(or nulls), got {per_layer!r}")
    return [tuple(a or ()) for a in per_layer]


def parse(raw: dict[str, Any]) -> ModelConfig:
    raw = with_defaults(raw, DEFAULTS)
    base = common_fields(raw)
    L = base["num_layers"]
    num_experts = get_int(raw, "num_experts")
    shared = get_int(raw, "num_shared_experts")
    if shared > num_experts:
        raise ValueError(f"config field num_shared_experts ({shared}) cannot be greater than "
                         f"num_experts ({num_experts})")
    per_layer = get_int_list(raw, "num_experts_per_layer", L)
    if per_layer is None:  # EmoModel then reads neither per-layer field: every layer alike
        per_layer, shared_per_layer = [num_experts] * L, [shared] * L
    else:
        shared_per_layer = (get_int_list(raw, "num_shared_experts_per_layer", L)
                            or [min(shared, e) for e in per_layer])
    always = _always_active(raw, L)
    norm_topk = get_bool(raw, "norm_topk_prob", False)
    for layer in range(L):
        if per_layer[layer] == 0:  # a dense MLP: its shared / always-active entries mean nothing
            shared_per_layer[layer], always[layer] = 0, ()
            continue
        if norm_topk and (shared_per_layer[layer] > 0 or always[layer]):
            raise ValueError(f"config field norm_topk_prob: {NORM_TOPK_REFUSAL} (layer {layer})")
        if always[layer]:  # always-active experts win: the "shared" ids are routed like the rest
            shared_per_layer[layer] = 0
    attention_bias = get_bool(raw, "attention_bias", False)
    return ModelConfig(
        family="emo",
        **base,
        intermediate_size=get_int(raw, "intermediate_size"),
        top_k=get_int(raw, "num_experts_per_tok"),
        num_experts=tuple(per_layer),
        num_shared_experts=tuple(shared_per_layer),
        always_active_experts=tuple(always),
        norm_topk_prob=norm_topk,
        dense_intermediate_size=get_int(raw, "dense_intermediate_size", 0),
        dense_mlp_bias=get_bool(raw, "dense_mlp_bias", False),
        qkv_bias=attention_bias,
        o_bias=attention_bias,
        names=NAMES,
        pool_fraction=0.25,
    )


# What the authors' EmoConfig.save_pretrained writes besides the fields given: every optional
# field, null when unset, and the training-only fields with their defaults.
AUTHORS_WRITTEN: dict[str, Any] = {
    "num_experts_per_layer": None, "num_shared_experts_per_layer": None, "always_active_experts": None,
    "always_active_experts_per_layer": None, "dense_intermediate_size": None, "dense_mlp_bias": False,
    "rope_scaling": None, "attention_dropout": 0.0, "initializer_range": 0.02,
    "output_router_logits": False, "router_aux_loss_coef": 0.01, "use_cache": True,
}


def as_written_by_authors(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` completed to the key set the authors' code writes, keys sorted as
    transformers writes them: our own checkpoints then look like real ones."""
    return dict(sorted({**AUTHORS_WRITTEN, **config}.items()))

"""EMO checkpoints as the authors' code writes them (fixtures made by their EmoConfig /
EmoForCausalLM, see tests/fixtures/emo_reference/NOTES.md), every family's config.json with
nulls where transformers writes them, and EMO's structural rules as their model applies them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from expert_cache.errors import CheckpointError
from server.model.config import ModelConfig, load_config
from server.model.families import FAMILIES
from server.model.kv_cache import KVCache
from server.model.loader import load_model
from tests.model.checkpoints import EMO_BASE, write_tokenizer
from tests.optional import require_module

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "emo_reference"
RELEASE_CONFIGS = sorted(FIXTURES.glob("emo_1b14b_1t.transformers-*.config.json"))
SMALL_CASES = ("small_shared", "small_mixed")


def test_fixtures_cover_both_transformers_generations() -> None:
    versions = {p.name.split("transformers-")[1].split(".")[0] for p in RELEASE_CONFIGS}
    assert versions == {"4", "5"}  # rope_scaling: null (4.x) and rope_parameters (5.x)


@pytest.mark.parametrize("path", RELEASE_CONFIGS, ids=lambda p: p.name)
def test_release_shape_config_written_by_the_authors_loads(path: Path, tmp_path: Path) -> None:
    raw = json.loads(path.read_text())
    assert raw["dense_intermediate_size"] is None and raw["always_active_experts"] is None
    shutil.copy(path, tmp_path / "config.json")
    config = load_config(tmp_path)
    assert (config.vocab_size, config.hidden_size, config.num_layers) == (100352, 2048, 16)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (16, 16, 128)
    assert config.num_experts == (128,) * 16 and config.num_shared_experts == (1,) * 16
    assert config.always_active_experts == ((),) * 16 and config.top_k == 8
    assert config.intermediate_size == 1024 and config.rms_norm_eps == 1e-6
    assert (config.rope.rope_type, config.rope.theta) == ("default", 500000.0)
    assert config.fixed_experts(0) == [127] and config.pool_bounds() == (7, 127)
    assert config.default_pool_size() == 32
    assert config.eos_token_ids == (100257,) and not config.tie_word_embeddings


def load_small(case: str, tmp_path: Path) -> tuple[Any, dict[str, torch.Tensor]]:
    directory = tmp_path / case
    shutil.copytree(FIXTURES / case, directory)
    write_tokenizer(directory, json.loads((directory / "config.json").read_text())["vocab_size"])
    reference = load_file(directory / "reference.safetensors")
    return load_model(directory, device="cpu", dtype=torch.float32), reference


@pytest.mark.parametrize("case", SMALL_CASES)
def test_logits_match_the_authors_model(case: str, tmp_path: Path) -> None:
    """Prefill of the prompt and decode of the continuation, over our KV cache, against the
    authors' EmoForCausalLM on the whole sequence: full routing, then the request's pool."""
    loaded, ref = load_small(case, tmp_path)
    model, ids, T = loaded.model, ref["input_ids"], int(ref["prompt_length"])
    for pool_size, expected in ((None, ref["full_logits"]), (int(ref["pool_size"]), ref["pool_logits"])):
        kv = KVCache(loaded.config, num_slots=2, max_len=32, device="cpu", dtype=torch.float32)
        out = model.prefill(ids[:T], kv, 1, pool_size=pool_size, all_logits=True)
        torch.testing.assert_close(out.logits, expected[:T], atol=1e-4, rtol=0)
        mask = None
        if pool_size is not None:
            assert out.pools is not None
            got = [[-1] * pool_size if p is None else p.tolist() for p in out.pools]
            assert got == ref["pools"].tolist()
            mask = model.pool_mask_row(out.pools)[None]
        for pos in range(T, len(ids)):
            logits = model.decode(ids[pos:pos + 1], torch.tensor([pos]), kv, torch.tensor([1]), mask)
            torch.testing.assert_close(logits[0], expected[pos], atol=1e-4, rtol=0)


def test_small_mixed_resolves_structure_as_the_authors_model() -> None:
    config = load_config(FIXTURES / "small_mixed")
    assert config.num_experts == (0, 8, 6) and config.dense_intermediate_size == 12
    assert config.dense_mlp_bias and config.qkv_bias and config.o_bias
    # layer 1: always-active [2] next to num_shared_experts 1 -> [2] wins, expert 7 is routed
    assert config.fixed_experts(1) == [2] and 7 in config.routable_experts(1)
    assert config.fixed_experts(2) == [5]  # min(num_shared_experts, 6) = 1 shared: the last id
    assert (config.rope.rope_type, config.rope.factor, config.rope.theta) == ("linear", 2.0, 500000.0)


# ---- null means absent, in every family ---------------------------------------------------

SMALL_SHAPE: dict[str, Any] = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=128)
FAMILY_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "olmoe": ("OlmoeConfig", dict(num_experts=8, num_experts_per_tok=2, intermediate_size=16)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=16)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=8)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=8)),
}
# the fields each config class declares optional (None allowed), as its config.json may carry them
OPTIONAL: dict[str, tuple[str, ...]] = {
    "emo": ("num_key_value_heads", "bos_token_id", "pad_token_id", "rope_scaling", "rope_parameters",
            "num_experts_per_layer", "num_shared_experts_per_layer", "always_active_experts",
            "always_active_experts_per_layer", "dense_intermediate_size", "head_dim"),
    "olmoe": ("num_key_value_heads", "bos_token_id", "pad_token_id", "eos_token_id", "rope_parameters",
              "rope_scaling", "clip_qkv", "head_dim"),
    "mixtral": ("head_dim", "bos_token_id", "pad_token_id", "eos_token_id", "sliding_window",
                "rope_parameters", "rope_scaling"),
    "qwen2_moe": ("num_key_value_heads", "sliding_window", "mlp_only_layers", "layer_types", "bos_token_id",
                  "pad_token_id", "eos_token_id", "rope_parameters", "rope_scaling", "head_dim"),
    "qwen3_moe": ("sliding_window", "mlp_only_layers", "bos_token_id", "pad_token_id", "eos_token_id",
                  "rope_parameters", "rope_scaling", "head_dim"),
}
ROPE_KEYS = ("factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow",
             "mscale", "mscale_all_dim", "low_freq_factor", "high_freq_factor", "partial_rotary_factor",
             "truncate", "rope_type", "type")


def saved_config(family: str) -> dict[str, Any]:
    """config.json as written by the family's own writer (the authors' EmoConfig for EMO)."""
    if family == "emo":
        return json.loads((FIXTURES / "small_mixed" / "config.json").read_text())
    transformers = require_module("transformers", "pip install 'emo-serve[test]'")
    name, extra = FAMILY_CONFIGS[family]
    return dict(getattr(transformers, name)(**SMALL_SHAPE, **extra).to_dict())


def parse(family: str, raw: dict[str, Any]) -> ModelConfig | str:
    try:
        return FAMILIES[family](raw)
    except (ValueError, TypeError, KeyError) as e:
        return f"error: {e}"


TABLE = [(family, field) for family, fields in OPTIONAL.items() for field in fields]


@pytest.mark.parametrize(("family", "field"), TABLE, ids=[f"{f}-{k}" for f, k in TABLE])
def test_null_field_reads_as_absent(family: str, field: str) -> None:
    raw = saved_config(family)
    absent = {k: v for k, v in raw.items() if k != field}
    if field == "num_key_value_heads":  # null: the Llama family's "as many as attention heads"
        absent[field] = raw["num_attention_heads"]
    nulled = parse(family, {**raw, field: None})
    if (family, field) == ("emo", "dense_intermediate_size"):  # the base has a dense layer, which
        assert nulled == "error: config field dense_intermediate_size must be > 0 when a layer is dense"
    else:  # needs it: the authors' model refuses too
        assert not isinstance(nulled, str), nulled
    assert nulled == parse(family, absent)


@pytest.mark.parametrize("family", list(OPTIONAL))
@pytest.mark.parametrize("key", ROPE_KEYS)
def test_null_rope_key_reads_as_absent(family: str, key: str) -> None:
    raw = saved_config(family)
    for field in ("rope_scaling", "rope_parameters"):
        base = {**{k: v for k, v in raw.items() if k not in ("rope_scaling", "rope_parameters")},
                field: {"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0,
                        "original_max_position_embeddings": 64}}
        absent = {**base, field: {k: v for k, v in base[field].items() if k != key}}
        nulled = {**base, field: {**base[field], key: None}}
        assert parse(family, nulled) == parse(family, absent)


def test_every_null_at_once_loads() -> None:
    raw = saved_config("emo")
    for field in OPTIONAL["emo"]:
        raw[field] = None
    config = FAMILIES["emo"](raw)
    assert config.num_experts == (8, 8, 8) and config.num_shared_experts == (1, 1, 1)


@pytest.mark.parametrize(("family", "field", "value"), [
    ("emo", "rope_theta", 500000.0), ("emo", "rms_norm_eps", 1e-6), ("emo", "num_shared_experts", 0),
    ("emo", "num_experts_per_tok", 5), ("emo", "eos_token_id", 100257),
    ("olmoe", "rope_theta", 10000.0), ("olmoe", "rms_norm_eps", 1e-5),
    ("mixtral", "rope_theta", 1000000.0), ("mixtral", "rms_norm_eps", 1e-5),
    ("mixtral", "num_key_value_heads", 8),
    ("qwen2_moe", "num_key_value_heads", 16), ("qwen2_moe", "rms_norm_eps", 1e-6),
    ("qwen3_moe", "num_key_value_heads", 4), ("qwen3_moe", "rope_theta", 10000.0),
])
def test_absent_fields_take_the_family_defaults(family: str, field: str, value: Any) -> None:
    raw = {k: v for k, v in saved_config(family).items()
           if k not in (field, "rope_parameters", "rope_scaling") and not (field == "num_key_value_heads"
                                                                       and k == "num_attention_heads")}
    raw.setdefault("num_attention_heads", 16)  # a multiple of every default num_key_value_heads
    config = FAMILIES[family](raw)
    read = {"rope_theta": config.rope.theta, "rms_norm_eps": config.rms_norm_eps,
            "num_key_value_heads": config.num_kv_heads, "eos_token_id": (config.eos_token_ids or (None,))[0],
            "num_experts_per_tok": config.top_k, "num_shared_experts": config.num_shared_experts[0]}[field]
    assert read == value


# ---- EMO's structure, as EmoModel builds it ------------------------------------------------

def emo(**changes: Any) -> ModelConfig:
    return FAMILIES["emo"]({**EMO_BASE, **changes})


def test_always_active_wins_over_shared() -> None:
    config = emo(num_experts=10, num_shared_experts=1, always_active_experts=[0, 3])
    assert config.num_shared_experts == (0, 0, 0)
    assert config.fixed_experts(0) == [0, 3] and 9 in config.routable_experts(0)
    assert config.num_routed(0) == 2


def test_dense_layer_ignores_shared_and_always_active_entries() -> None:
    config = emo(num_experts_per_layer=[10, 0, 10], dense_intermediate_size=20,
                 num_shared_experts_per_layer=[1, 1, 1], always_active_experts_per_layer=[None, [4], [4]])
    assert config.num_experts == (10, 0, 10)
    assert config.num_shared_experts == (1, 0, 0) and config.always_active_experts == ((), (), (4,))


def test_per_layer_shared_counts_need_per_layer_expert_counts() -> None:
    # EmoModel reads num_shared_experts_per_layer only alongside num_experts_per_layer
    config = emo(num_shared_experts=1, num_shared_experts_per_layer=[2, 0, 2])
    assert config.num_shared_experts == (1, 1, 1)
    derived = emo(num_shared_experts=2, num_experts_per_layer=[10, 0, 10], dense_intermediate_size=8,
                  num_experts_per_tok=4, always_active_experts_per_layer=[None, None, [0]])
    assert derived.num_shared_experts == (2, 0, 0)  # min(num_shared_experts, layer experts), then A wins


@pytest.mark.parametrize("changes", [
    {"num_shared_experts": 1},
    {"num_shared_experts": 0, "always_active_experts": [1]},
    {"num_shared_experts": 0, "num_experts_per_layer": [10, 10, 10],
     "num_shared_experts_per_layer": [0, 1, 0]},
], ids=["shared", "always_active", "per_layer_shared"])
def test_norm_topk_prob_with_fixed_experts_is_refused_like_the_reference(changes: dict[str, Any],
                                                                      tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({**EMO_BASE, **changes, "norm_topk_prob": True}))
    with pytest.raises(CheckpointError, match="norm_topk_prob is not implemented for the case where "
                                              "num_shared_experts > 0 or always_active_experts is set"):
        load_config(tmp_path)


def test_norm_topk_prob_with_empty_always_active_is_plain_routing() -> None:
    config = emo(num_shared_experts=0, always_active_experts=[], norm_topk_prob=True)
    assert config.norm_topk_prob and config.fixed_experts(0) == []


def test_more_shared_than_experts_is_refused() -> None:
    with pytest.raises(ValueError, match="num_shared_experts .* cannot be greater than num_experts"):
        emo(num_experts=4, num_shared_experts=5)

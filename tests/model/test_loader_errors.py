"""Bad checkpoints are refused with a message naming the file and the tensor or field, before
anything is allocated for the experts or the trunk on the device."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from expert_cache.resident import ResidentExpertStore
from server.model.loader import load_model
from tests.model.checkpoints import write_emo

ROUTER = "model.layers.1.mlp.gate.weight"
EXPERT = "model.layers.2.mlp.experts.4.down_proj.weight"


def load_expecting_error(directory: Path, *patterns: str) -> str:
    """Load must fail with every pattern in the message and without creating the store."""
    created: list[object] = []

    def factory(catalog: object) -> ResidentExpertStore:
        created.append(catalog)
        return ResidentExpertStore(catalog, "cpu")  # type: ignore[arg-type]

    with pytest.raises(ValueError) as info:
        load_model(directory, device="cpu", dtype=torch.float32, expert_store_factory=factory)
    message = str(info.value)
    for pattern in patterns:
        assert pattern in message, message
    assert created == [], "the expert store was created before validation finished"
    return message


def edit_tensors(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def edit_config(directory: Path, **changes: object) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def test_valid_checkpoint_loads(tmp_path: Path) -> None:
    write_emo(tmp_path, shards=3)
    loaded = load_model(tmp_path, dtype="float32")
    assert loaded.config.family == "emo" and len(loaded.catalog.keys()) == 3 * 9


def test_missing_tensor(tmp_path: Path) -> None:
    write_emo(tmp_path)
    edit_tensors(tmp_path / "model.safetensors", lambda t: t.pop(EXPERT))
    load_expecting_error(tmp_path, "model.safetensors", EXPERT, "missing tensor")


def test_missing_tensor_in_sharded_checkpoint_names_the_index(tmp_path: Path) -> None:
    write_emo(tmp_path, shards=2)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = tmp_path / index["weight_map"].pop(ROUTER)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    edit_tensors(shard, lambda t: t.pop(ROUTER))
    load_expecting_error(tmp_path, "model.safetensors.index.json", ROUTER, "missing tensor")


def test_missing_shard_file(tmp_path: Path) -> None:
    write_emo(tmp_path, shards=2)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    load_expecting_error(tmp_path, "model-00002-of-00002.safetensors", "missing")


def test_wrong_shape(tmp_path: Path) -> None:
    write_emo(tmp_path)
    edit_tensors(tmp_path / "model.safetensors", lambda t: t.update({ROUTER: torch.zeros(9, 32)}))
    load_expecting_error(tmp_path, "model.safetensors", ROUTER, "wrong shape [9, 32], expected [10, 32]")


def test_wrong_dtype(tmp_path: Path) -> None:
    write_emo(tmp_path)
    name = "model.norm.weight"
    bad = torch.ones(32, dtype=torch.int32)
    edit_tensors(tmp_path / "model.safetensors", lambda t: t.update({name: bad}))
    load_expecting_error(tmp_path, "model.safetensors", name, "wrong dtype")


def test_truncated_file(tmp_path: Path) -> None:
    write_emo(tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    load_expecting_error(tmp_path, "model.safetensors", "truncated")


def test_header_past_the_end(tmp_path: Path) -> None:
    write_emo(tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(data) * 2) + data[8:])
    load_expecting_error(tmp_path, "model.safetensors", "corrupt header")


def test_corrupt_header(tmp_path: Path) -> None:
    write_emo(tmp_path)
    path = tmp_path / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:12] = b"!!!!"
    path.write_bytes(bytes(data))
    load_expecting_error(tmp_path, "model.safetensors", "not valid JSON")


def test_unknown_model_type(tmp_path: Path) -> None:
    write_emo(tmp_path)
    edit_config(tmp_path, model_type="llama4_moe")
    load_expecting_error(tmp_path, "config.json", "model_type", "llama4_moe")


@pytest.mark.parametrize("changes,field", [
    ({"num_experts_per_tok": 11}, "num_experts_per_tok"),
    ({"hidden_size": -4}, "hidden_size"),
    ({"num_attention_heads": "four"}, "num_attention_heads"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"num_experts_per_layer": [10, 10]}, "num_experts_per_layer"),
    ({"always_active_experts": [1, 12], "num_shared_experts": 0}, "always_active_experts"),
    ({"num_experts_per_layer": [10, 0, 10]}, "dense_intermediate_size"),
    ({"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, "longrope"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_bad_config_values(tmp_path: Path, changes: dict[str, object], field: str) -> None:
    write_emo(tmp_path)
    edit_config(tmp_path, **changes)
    load_expecting_error(tmp_path, "config.json", field)


def test_missing_config_and_tokenizer(tmp_path: Path) -> None:
    write_emo(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    load_expecting_error(tmp_path, "tokenizer.json", "missing")
    (tmp_path / "config.json").unlink()
    load_expecting_error(tmp_path, "config.json", "missing")


def test_pickle_only_checkpoint_is_refused_not_unpickled(tmp_path: Path) -> None:
    write_emo(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04 this would be unpickled")
    message = load_expecting_error(tmp_path, "pytorch_model.bin", "save_pretrained",
                                   "safe_serialization=True")
    assert "never unpickled" in message


def test_bad_dtype_and_device_arguments(tmp_path: Path) -> None:
    write_emo(tmp_path)
    with pytest.raises(ValueError, match="dtype"):
        load_model(tmp_path, dtype="int8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            load_model(tmp_path, device="cuda")

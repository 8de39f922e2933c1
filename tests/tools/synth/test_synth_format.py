"""Synthetic checkpoint format: files, index, config keys, tokenizer, chat template, CLI."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import jinja2
import pytest
from safetensors import safe_open
from tokenizers import Tokenizer

from expert_cache.safetensors_index import SafetensorsIndex
from server.cli import synth as synth_cli
from server.tools.synth import DOMAINS, demo_checkpoint_dir, planted_experts, sample_prompt, write_checkpoint
from server.tools.synth.spec import make_spec
from server.tools.synth.words import COMMON_WORDS, DOMAIN_WORDS

AUTHORS_CONFIG = Path(__file__).resolve().parents[2] / "fixtures" / "emo_reference" / \
    "emo_1b14b_1t.transformers-4.57.1.config.json"  # written by the authors' EmoConfig
OUR_EXTRA_KEYS = {"head_dim", "bos_token_id", "torch_dtype", "emo_synth"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("synth") / "tiny", "tiny", shard_bytes=512 * 1024)


def test_files_index_and_headers_agree(tiny: Path) -> None:
    names = {p.name for p in tiny.iterdir()}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
            "model.safetensors.index.json"} <= names
    shards = sorted(tiny.glob("*.safetensors"))
    assert len(shards) > 1 and all(p.name.endswith(f"-of-{len(shards):05d}.safetensors") for p in shards)
    index = json.loads((tiny / "model.safetensors.index.json").read_text())
    seen: dict[str, str] = {}
    total = 0
    for shard in shards:
        with safe_open(shard, framework="pt") as f:  # the reference safetensors reader
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                seen[name] = shard.name
                t = f.get_tensor(name)
                assert t.isfinite().all(), name
                total += t.numel() * t.element_size()
    assert seen == index["weight_map"]
    assert index["metadata"]["total_size"] == total
    assert set(SafetensorsIndex.from_directory(tiny)) == set(seen)  # the project's own reader


def test_config_keys_and_values(tiny: Path) -> None:
    config = json.loads((tiny / "config.json").read_text())
    authors = set(json.loads(AUTHORS_CONFIG.read_text())) - {"transformers_version"}
    assert set(config) == authors | OUR_EXTRA_KEYS  # every key their code writes, nulls included
    assert config["dense_intermediate_size"] is None and config["rope_scaling"] is None
    assert config["model_type"] == "emo" and config["architectures"] == ["EmoForCausalLM"]
    assert config["tie_word_embeddings"] is False and config["torch_dtype"] == "bfloat16"
    assert config["num_shared_experts"] == 1 and config["num_experts"] == 32
    shard = json.loads((tiny / "model.safetensors.index.json").read_text())["weight_map"]["lm_head.weight"]
    with safe_open(tiny / shard, framework="pt") as f:
        assert tuple(f.get_slice("lm_head.weight").get_shape()) == (2048, 64)
    tok = Tokenizer.from_file(str(tiny / "tokenizer.json"))
    assert tok.get_vocab_size() == config["vocab_size"]
    for key, text in (("bos", "<|bos|>"), ("eos", "<|endoftext|>"), ("pad", "<|pad|>")):
        assert tok.token_to_id(text) == config[f"{key}_token_id"]
    gen = json.loads((tiny / "generation_config.json").read_text())
    assert gen["eos_token_id"] == config["eos_token_id"]


def test_emo_1b14b_preset_is_the_released_shape() -> None:
    spec = make_spec("emo-1b14b")
    c = spec.config
    assert (c["vocab_size"], c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"],
            c["head_dim"], c["num_key_value_heads"], c["num_experts"], c["intermediate_size"],
            c["num_experts_per_tok"], c["num_shared_experts"]) == (100352, 2048, 16, 16, 128, 16, 128,
                                                                   1024, 8, 1)
    assert c["rope_theta"] == 500000.0 and c["rms_norm_eps"] == 1e-6 and not c["tie_word_embeddings"]
    experts = sum(t.shape[0] * t.shape[1] for t in spec.tensors() if t.expert >= 0)
    assert experts * 2 == 3 * 2048 * 1024 * 2 * 128 * 16  # 25.8 GB of experts in bf16


def test_domain_words_are_single_tokens_and_text_round_trips(tiny: Path) -> None:
    tok = Tokenizer.from_file(str(tiny / "tokenizer.json"))
    for words in (*DOMAIN_WORDS.values(), COMMON_WORDS):
        for word in words:
            for text in (word, "the " + word):
                enc = tok.encode(text)
                assert len(enc.ids) == len(text.split()), text
                assert tok.decode(enc.ids) == text
    for text in ("Héllo, wörld! 日本語\n\tcode 123", sample_prompt("music", 30, random.Random(3))):
        assert tok.decode(tok.encode(text).ids) == text


def test_chat_template_renders_with_jinja(tiny: Path) -> None:
    tc = json.loads((tiny / "tokenizer_config.json").read_text())
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "kernel mutex"},
                {"role": "assistant", "content": "compiler"}, {"role": "user", "content": "stack"}]
    text = jinja2.Environment().from_string(tc["chat_template"]).render(
        messages=messages, add_generation_prompt=True, bos_token=tc["bos_token"], eos_token=tc["eos_token"]
    )
    assert text == ("<|bos|><|system|>\nbe brief\n<|user|>\nkernel mutex\n<|assistant|>\ncompiler"
                    "<|endoftext|>\n<|user|>\nstack\n<|assistant|>\n")
    tok = Tokenizer.from_file(str(tiny / "tokenizer.json"))
    tokens = tok.encode(text, add_special_tokens=False).tokens
    assert tokens[:3] == ["<|bos|>", "<|system|>", "Ċ"] and tokens[-2:] == ["<|assistant|>", "Ċ"]
    assert tok.decode(tok.encode(text).ids, skip_special_tokens=True) == (
        "\nbe brief\n\nkernel mutex\n\ncompiler\n\nstack\n\n"
    )


def test_sample_prompt() -> None:
    a = sample_prompt("law", 40, random.Random(7))
    assert a == sample_prompt(DOMAINS.index("law"), 40, random.Random(7))
    words = a.replace(",", " ").replace(";", " ").rstrip(".").split()
    assert len(words) == 40 and words[0] in DOMAIN_WORDS["law"]
    in_domain = sum(w in DOMAIN_WORDS["law"] for w in words)
    assert in_domain >= 20 and all(w in DOMAIN_WORDS["law"] or w in COMMON_WORDS for w in words)
    with pytest.raises(ValueError, match="unknown domain"):
        sample_prompt("poetry", 5, random.Random(0))
    with pytest.raises(ValueError, match="n_words"):
        sample_prompt("law", 0, random.Random(0))


def test_planted_experts_partition_the_routable_experts(tiny: Path) -> None:
    config = json.loads((tiny / "config.json").read_text())
    sets = [planted_experts(tiny, d) for d in range(4)]
    assert sets[1] == planted_experts(config, "medicine") == planted_experts(tiny / "config.json", 1)
    flat = [e for s in sets for e in s]
    assert len(flat) == len(set(flat)) == 28 and all(len(s) == 7 for s in sets)
    assert set(flat) <= set(range(31))  # 31 is the shared expert
    with pytest.raises(ValueError, match="not planted"):
        planted_experts(tiny, "finance")  # only 4 domains in the tiny preset


def test_structure_overrides(tmp_path: Path) -> None:
    out = write_checkpoint(tmp_path / "v", "tiny", domains=2, dtype="fp32", overrides={
        "num_hidden_layers": 3, "num_experts_per_layer": [0, 16, 16], "dense_intermediate_size": 48,
        "num_shared_experts": 0, "always_active_experts": [0, 5], "attention_bias": True,
    })
    index = SafetensorsIndex.from_directory(out)
    assert index.info("model.layers.0.mlp.gate_proj.weight").shape == (48, 64)
    assert "model.layers.0.mlp.gate.weight" not in index
    assert index.info("model.layers.1.self_attn.q_proj.bias").shape == (64,)
    assert index.info("model.layers.2.mlp.experts.15.down_proj.weight").dtype.itemsize == 4
    planted = [planted_experts(out, d) for d in range(2)]
    assert all(len(p) == 7 for p in planted) and not {0, 5} & set(planted[0] + planted[1])
    with pytest.raises(ValueError, match="dense"):
        planted_experts(out, 0, layer=0)


@pytest.mark.parametrize("kwargs, match", [
    ({"preset": "huge"}, "unknown preset"),
    ({"overrides": {"hidden_sise": 8}}, "hidden_sise"),
    ({"overrides": {"num_experts_per_tok": 1}}, "num_experts_per_tok"),
    ({"domains": 9}, "domains"),
    ({"dtype": "int8"}, "dtype"),
    ({"shard_bytes": 0}, "shard size"),
])
def test_bad_arguments_are_named(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        write_checkpoint(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


def test_refuses_a_non_empty_directory(tiny: Path) -> None:
    with pytest.raises(FileExistsError, match="not empty"):
        write_checkpoint(tiny)


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    synth_cli.add_arguments(parser)
    return synth_cli.run(parser.parse_args(argv))


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "c"
    assert _cli([str(out), "--seed", "3", "--domains", "2", "--dtype", "fp16", "--shard-size", "200KiB",
                 "--set", "num_hidden_layers=2", "--set", "rope_theta=1e5"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["num_hidden_layers"], config["rope_theta"], config["torch_dtype"]) == (2, 1e5, "float16")
    assert config["emo_synth"]["seed"] == 3 and config["emo_synth"]["domains"] == ["code", "medicine"]
    assert len(list(out.glob("*.safetensors"))) > 1
    assert str(out) in capsys.readouterr().out
    assert _cli([str(tmp_path / "d"), "--set", "nope=1"]) == 2
    assert "nope" in capsys.readouterr().err
    assert _cli([str(out)]) == 1
    assert synth_cli.parse_size("2GiB") == 2 * 1024**3 and synth_cli.parse_size("500MB") == 500 * 10**6
    assert synth_cli.parse_size("1.5k") == 1500  # the shared parser's units (parse_bytes)
    for bad in ("2 parsecs", "0", "-1MB"):
        with pytest.raises(argparse.ArgumentTypeError):
            synth_cli.parse_size(bad)


def test_demo_checkpoint_is_written_once_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMO_SERVE_CACHE", str(tmp_path / "cache"))
    demo = demo_checkpoint_dir()
    assert demo == tmp_path / "cache" / "demo-tiny-v1"
    assert json.loads((demo / "config.json").read_text())["emo_synth"]["domains"] == DOMAINS[:4]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["demo-tiny-v1"]  # no temp dir left
    stamp = (demo / "config.json").stat().st_mtime_ns
    assert demo_checkpoint_dir() == demo and (demo / "config.json").stat().st_mtime_ns == stamp
    assert _files_equal(demo, write_checkpoint(tmp_path / "again", "tiny"))


def _files_equal(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names
    )

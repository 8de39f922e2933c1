"""TokenizerBundle: encode/decode, BOS, EOS sources, special tokens, chat template, defaults."""

from __future__ import annotations

import json
from pathlib import Path

from server.model.tokenizer import generation_defaults, load_tokenizer
from tests.model.checkpoints import write_tokenizer


def test_bundle_reads_every_file(tmp_path: Path) -> None:
    write_tokenizer(tmp_path, 32)
    bundle = load_tokenizer(tmp_path, config_bos=None, config_eos=(3,))
    assert bundle.encode("w5 w6 w31") == [1, 5, 6, 31]  # add_bos_token
    assert bundle.decode([5, 6]) == "w5 w6"
    assert bundle.eos_token_ids == [2, 3]  # generation_config, tokenizer_config, then config.json
    assert bundle.bos_token_id == 1
    assert bundle.special_tokens == {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
                                     "unk_token": "<unk>"}
    assert bundle.chat_template is not None and "messages" in bundle.chat_template
    assert generation_defaults(tmp_path) == {"temperature": 0.7}


def test_added_token_objects_and_jinja_template(tmp_path: Path) -> None:
    write_tokenizer(tmp_path, 32, add_bos_token=False, chat_template=None,
                    eos_token={"content": "<pad>", "special": True})
    (tmp_path / "generation_config.json").unlink()
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0].content }}")
    bundle = load_tokenizer(tmp_path)
    assert bundle.encode("w5") == [5]
    assert bundle.eos_token_ids == [3]
    assert bundle.chat_template == "{{ messages[0].content }}"
    assert generation_defaults(tmp_path) == {}


def test_named_chat_templates(tmp_path: Path) -> None:
    write_tokenizer(tmp_path, 32, chat_template=[{"name": "tool_use", "template": "T"},
                                                 {"name": "default", "template": "D"}])
    assert load_tokenizer(tmp_path).chat_template == "D"
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["bos_token"] == "<bos>"

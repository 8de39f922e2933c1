"""Tokenizer files of a checkpoint: tokenizer.json (via ``tokenizers``), tokenizer_config.json,
generation_config.json, chat template."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from expert_cache.errors import CheckpointError

SPECIAL_NAMES = ("bos_token", "eos_token", "pad_token", "unk_token")


def read_json(path: Path, required: bool = False) -> dict[str, Any]:
    if not path.exists():
        if required:
            raise CheckpointError(path, "missing")
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(path, f"unreadable JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(path, "not a JSON object")
    return data


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        content = value.get("content")
        if isinstance(content, str):
            return content  # a serialised AddedToken
    return None


def _ids(value: Any) -> list[int]:
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]


@dataclass
class TokenizerBundle:
    tokenizer: Tokenizer
    eos_token_ids: list[int]
    bos_token_id: int | None
    chat_template: str | None
    special_tokens: dict[str, str] = field(default_factory=dict)
    add_bos: bool = False

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def load_tokenizer(
    checkpoint_dir: Path, config_bos: int | None = None, config_eos: tuple[int, ...] = ()
) -> TokenizerBundle:
    d = Path(checkpoint_dir)
    path = d / "tokenizer.json"
    if not path.exists():
        raise CheckpointError(path, "missing (a tokenizers tokenizer.json is required)")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for bad files
        raise CheckpointError(path, f"cannot load tokenizer ({e})") from e
    tok_config = read_json(d / "tokenizer_config.json")
    gen_config = read_json(d / "generation_config.json")
    special = {n: t for n in SPECIAL_NAMES if (t := _token_text(tok_config.get(n))) is not None}

    def token_id(name: str) -> int | None:
        text = special.get(name)
        return None if text is None else tokenizer.token_to_id(text)

    eos: list[int] = []
    for candidate in (_ids(gen_config.get("eos_token_id")), [token_id("eos_token")], list(config_eos)):
        eos.extend(i for i in candidate if i is not None and i not in eos)
    bos = token_id("bos_token")
    if bos is None:
        bos = next(iter(_ids(gen_config.get("bos_token_id"))), config_bos)
    return TokenizerBundle(
        tokenizer=tokenizer,
        eos_token_ids=eos,
        bos_token_id=bos,
        chat_template=_chat_template(d, tok_config),
        special_tokens=special,
        add_bos=bool(tok_config.get("add_bos_token", False)),
    )


def _chat_template(d: Path, tok_config: dict[str, Any]) -> str | None:
    template = tok_config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if isinstance(template, str):
        return template
    jinja = d / "chat_template.jinja"
    return jinja.read_text() if jinja.exists() else None


GENERATION_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens",
                   "do_sample", "presence_penalty", "frequency_penalty")


def generation_defaults(checkpoint_dir: Path) -> dict[str, Any]:
    """Sampling defaults from generation_config.json (only the keys present)."""
    data = read_json(Path(checkpoint_dir) / "generation_config.json")
    return {k: data[k] for k in GENERATION_KEYS if k in data}

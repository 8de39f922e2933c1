"""Render chat messages with the checkpoint's chat template, as Hugging Face does.

The template runs in jinja2's immutable sandbox (a template from a checkpoint is untrusted
code) with HF's conventions: ``messages``, ``add_generation_prompt``, ``bos_token``,
``eos_token`` (and the other special tokens), ``raise_exception``, ``strftime_now`` and a
``tojson`` filter that keeps non-ASCII text. The rendered text already holds any BOS the
template wants, so it is tokenized without adding special tokens.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any, NoReturn

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from server.api.errors import APIError, bad_request


class TemplateError(Exception):
    """The template called raise_exception: the messages break the template's own rules."""


def _raise_exception(message: str) -> NoReturn:
    raise TemplateError(message)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False,
            sort_keys: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=4)
def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def render_chat(
    template: str | None,
    messages: Sequence[Mapping[str, Any]],
    special_tokens: Mapping[str, str],
    *,
    add_generation_prompt: bool = True,
) -> str:
    """The prompt text; 400 when the model has no template or the template refuses the messages."""
    if not template:
        raise bad_request("This model has no chat template: use /v1/completions with a prompt",
                          param="messages", code="chat_template_missing")
    try:
        compiled = compile_template(template)
    except jinja2.TemplateSyntaxError as exc:
        raise APIError(500, f"The model's chat template does not compile: {exc.message}",
                       code="chat_template_invalid") from None
    variables: dict[str, Any] = {"bos_token": "", "eos_token": "", **special_tokens}
    try:
        return compiled.render(messages=[dict(m) for m in messages],
                               add_generation_prompt=add_generation_prompt, **variables)
    except TemplateError as exc:
        raise bad_request(f"The chat template refused these messages: {exc}", param="messages",
                          code="chat_template_error") from None
    except jinja2.TemplateError as exc:
        raise bad_request(f"The chat template failed on these messages: {exc}", param="messages",
                          code="chat_template_error") from None

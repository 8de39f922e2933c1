"""Chat templates: HF conventions, the sandbox, and 400s a client can act on."""

from __future__ import annotations

import pytest

from server.api.chat_template import render_chat
from server.api.errors import APIError

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "héllo"}]
SPECIAL = {"bos_token": "<s>", "eos_token": "</s>"}
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_renders_with_hf_variables() -> None:
    text = render_chat(TEMPLATE, MESSAGES, SPECIAL)
    assert text == "<s><|system|>be brief</s><|user|>héllo</s><|assistant|>"
    assert not render_chat(TEMPLATE, MESSAGES, SPECIAL, add_generation_prompt=False).endswith("<|assistant|>")
    as_json = render_chat("{{ messages | tojson }}", MESSAGES[1:], SPECIAL)
    assert as_json == '[{"role": "user", "content": "héllo"}]'


def test_no_template_is_a_clear_400() -> None:
    with pytest.raises(APIError) as err:
        render_chat(None, MESSAGES, SPECIAL)
    assert err.value.status == 400 and err.value.code == "chat_template_missing"
    assert "/v1/completions" in err.value.message


def test_template_refusals_and_sandbox_are_400() -> None:
    strict = ("{% if messages[0]['role'] != 'user' %}"
              "{{ raise_exception('first message must be user') }}{% endif %}")
    with pytest.raises(APIError) as refused:
        render_chat(strict, MESSAGES, SPECIAL)
    assert refused.value.status == 400 and "first message must be user" in refused.value.message
    escape = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(APIError) as sandboxed:
        render_chat(escape, MESSAGES, SPECIAL)
    assert sandboxed.value.status == 400 and sandboxed.value.code == "chat_template_error"


def test_broken_template_is_a_server_error() -> None:
    with pytest.raises(APIError) as err:
        render_chat("{% for %}", MESSAGES, SPECIAL)
    assert err.value.status == 500 and err.value.code == "chat_template_invalid"

"""Incremental detokenization: UTF-8 safety, stop strings, equality with the full decode."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from server.engine.detokenizer import Detokenizer, StopMatcher, TokenTexts


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    """A byte-level BPE like dolma2's: characters outside the training text stay split into
    single-byte tokens, so multi-byte characters cross token boundaries."""
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"])
    t.train_from_iterator(["hello world, the stop word is here. héllo wörld"] * 20, trainer)
    return t


def stream(tok: Tokenizer, ids: list[int], stop: tuple[str, ...] = (), prompt: list[int] | None = None,
           skip: bool = True) -> tuple[list[str], Detokenizer]:
    d = Detokenizer(tok, prompt or [], skip_special_tokens=skip, stop=stop)
    chunks = []
    for i in ids:
        chunks.append(d.push(i))
        if d.stopped_on is not None:
            return chunks, d
    chunks.append(d.finish())
    return chunks, d


TEXTS = ["héllo 😀 中文 world", "Ünïcödé ✓ done", "🎉🎉", "plain hello world"]


@pytest.mark.parametrize("text", TEXTS)
def test_multibyte_characters_are_never_emitted_broken(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text).ids
    chunks, d = stream(tok, ids)
    assert all("\ufffd" not in c for c in chunks)
    assert "".join(chunks) == d.text == tok.decode(ids) == text
    if text != "plain hello world":
        assert any(c == "" for c in chunks[:-1])  # something was held back mid-character


def test_prompt_context_does_not_change_the_text(tok: Tokenizer) -> None:
    prompt = tok.encode("the stop word é").ids
    ids = tok.encode(" héllo 😀 world").ids
    chunks, _ = stream(tok, ids, prompt=prompt)
    assert "".join(chunks) == tok.decode(ids)


def test_generation_ending_mid_character_flushes_the_full_decode(tok: Tokenizer) -> None:
    ids = tok.encode("ok 😀").ids[:-1]  # the emoji's last byte is missing
    chunks, d = stream(tok, ids)
    assert d.text == tok.decode(ids) and d.text.endswith("\ufffd")
    assert "\ufffd" in chunks[-1]  # only the final flush carries it


@pytest.mark.parametrize("stop", ["STOP", "world", "d STO", "😀", "OP"])
def test_stop_string_across_token_boundaries(tok: Tokenizer, stop: str) -> None:
    text = "hello wörld 😀 and STOP more world"
    ids = tok.encode(text).ids
    chunks, d = stream(tok, ids, stop=(stop, "never-there"))
    expected = text[: text.index(stop)]
    assert d.stopped_on == stop
    assert "".join(chunks) == d.text == expected
    emitted = ""
    for c in chunks:  # every intermediate state is a prefix of the final text: nothing retracted
        emitted += c
        assert expected.startswith(emitted)


def test_text_that_may_become_a_stop_string_is_held_then_released(tok: Tokenizer) -> None:
    text = "hello wor"  # ends with a prefix of the stop string "world!"
    ids = tok.encode(text).ids
    d = Detokenizer(tok, [], skip_special_tokens=True, stop=("world!",))
    pushed = "".join(d.push(i) for i in ids)
    assert pushed == "hello " and d.stopped_on is None
    assert d.finish() == "wor" and d.text == text


def test_earliest_stop_string_wins() -> None:
    m = StopMatcher(["cd", "bcdx", "e"])
    assert m.push("ab") == "a"  # "b" may start "bcdx"
    assert m.push("cde") == "b" and m.matched == "cd"
    assert m.push("more") == "" and m.flush() == ""


def test_stop_matcher_char_by_char() -> None:
    m = StopMatcher(["</s>", "##"])
    out = "".join(m.push(ch) for ch in "a<b#c</x</s>tail")
    assert out == "a<b#c</x" and m.matched == "</s>"


def test_special_tokens_skipped_or_kept(tok: Tokenizer) -> None:
    eos = tok.token_to_id("<eos>")
    ids = tok.encode("hello").ids + [eos] + tok.encode(" world").ids
    assert "".join(stream(tok, ids, skip=True)[0]) == "hello world"
    assert "".join(stream(tok, ids, skip=False)[0]) == "hello<eos> world"


def test_token_texts_memoises_single_token_decodes(tok: Tokenizer) -> None:
    texts = TokenTexts(tok)
    ids = tok.encode("hello world").ids
    assert "".join(texts(i) for i in ids) == "hello world"
    assert texts(tok.token_to_id("<eos>")) == "<eos>"

"""The synthetic model's tokenizer, its token -> domain map, chat template and prompt sampler.

Byte-level BPE built with ``tokenizers``: the 256 byte symbols make any text encodable and the
round trip exact; every common and domain word is a whole vocabulary entry, both at the start of
a text ("kernel") and after a space ("Ġkernel"), and ``ignore_merges`` makes such a word one
token without any merge rule. Unknown words fall back to single bytes. Filler entries pad the
vocabulary to the preset's size; no text encodes to them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from server.tools.synth.words import COMMON_WORDS, DOMAIN_WORDS, PUNCTUATION

DOMAINS: list[str] = list(DOMAIN_WORDS)
BOS, EOS, PAD = "<|bos|>", "<|endoftext|>", "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (BOS, EOS, PAD, *ROLE_TOKENS)
COMMON, FILLER = -1, -2  # token_domains() values for tokens of no planted domain

# HF conventions: `messages`, `add_generation_prompt`, `bos_token`, `eos_token`.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' }}"
    "{% else %}{{ '<|user|>\n' }}{% endif %}"
    "{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Vocab:
    tokens: list[str]  # id -> vocabulary string (byte-level alphabet)
    word_domain: dict[str, int]  # vocabulary string -> index into DOMAINS (all 8, planted or not)

    def id(self, token: str) -> int:
        return self.tokens.index(token)


def build_vocab(vocab_size: int) -> Vocab:
    """Ids: 256 bytes, common words, domain words (domain-major), special tokens, fillers."""
    tokens = sorted(pre_tokenizers.ByteLevel.alphabet())
    word_domain: dict[str, int] = {}
    tokens += [form for word in COMMON_WORDS for form in (word, "Ġ" + word)]
    for d, words in enumerate(DOMAIN_WORDS.values()):
        for word in words:
            tokens += [word, "Ġ" + word]
            word_domain[word] = word_domain["Ġ" + word] = d
    tokens = list(dict.fromkeys(tokens + list(SPECIAL_TOKENS)))  # one-letter words are bytes too
    if len(tokens) > vocab_size:
        raise ValueError(f"config field vocab_size: the synthetic vocabulary needs {len(tokens)} "
                         f"tokens, got vocab_size={vocab_size}")
    tokens += [f"<filler_{i}>" for i in range(vocab_size - len(tokens))]
    return Vocab(tokens, word_domain)


def token_domains(vocab: Vocab, num_domains: int, *, spaced_only: bool = False) -> list[int]:
    """Per id: the planted domain index (< num_domains), COMMON, or FILLER.

    Words of domains beyond the first ``num_domains`` are ordinary common words here; with
    ``spaced_only`` so are the forms without a leading space ("kernel" but not "Ġkernel")."""
    out = []
    for tok in vocab.tokens:
        d = vocab.word_domain.get(tok, COMMON) if tok.startswith("Ġ") or not spaced_only else COMMON
        out.append(FILLER if tok.startswith("<filler_") else d if d < num_domains else COMMON)
    return out


def build_tokenizer(vocab: Vocab) -> Tokenizer:
    ids = {tok: i for i, tok in enumerate(vocab.tokens)}
    tok = Tokenizer(models.BPE(vocab=ids, merges=[], ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # Already in the vocabulary, so these keep their ids; special => skipped when decoding.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def tokenizer_config(model_max_length: int) -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "add_bos_token": False,  # the chat template writes bos_token itself
        "add_eos_token": False,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def domain_index(domain: str | int) -> int:
    if isinstance(domain, bool):
        raise TypeError(f"domain must be a name or an index, got {domain!r}")
    if isinstance(domain, int):
        if not 0 <= domain < len(DOMAINS):
            raise ValueError(f"domain index {domain} is out of range [0, {len(DOMAINS)})")
        return domain
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r} (known: {', '.join(DOMAINS)})")
    return DOMAINS.index(domain)


def sample_prompt(domain: str | int, n_words: int, rng: random.Random) -> str:
    """``n_words`` words of ``domain``: about 3 in 4 from its vocabulary, the rest common words,
    starting with a domain word; occasional commas, a final full stop."""
    if isinstance(n_words, bool) or not isinstance(n_words, int) or n_words < 1:
        raise ValueError(f"n_words must be a positive integer, got {n_words!r}")
    words = DOMAIN_WORDS[DOMAINS[domain_index(domain)]]
    out = []
    for i in range(n_words):
        use_domain = i == 0 or rng.random() < 0.75
        word = rng.choice(words) if use_domain else rng.choice(COMMON_WORDS)
        if i < n_words - 1 and rng.random() < 0.08:
            word += rng.choice(PUNCTUATION[1:3])
        out.append(word)
    return " ".join(out) + "."

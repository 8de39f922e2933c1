"""Incremental detokenization and stop strings.

Invariants of what a request streams out:
- never a broken UTF-8 character: text is held back while the decode of the pending tokens
  ends with U+FFFD (a byte-level BPE token may carry half a character);
- never a stop string, and never text that might still become one: the longest suffix of the
  pending text that is a prefix of some stop string is held back until it is decided;
- the concatenation of everything streamed equals the decode of the generated tokens (with the
  last few prompt tokens as left context, which matters for SentencePiece-style leading
  spaces), cut before the first stop string when one matched.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer

PROMPT_CONTEXT_TOKENS = 6  # prompt tokens decoded as left context of the first output tokens


class IncrementalDecoder:
    """Decodes a growing token list; each push returns only newly completed text.

    ``ids[prefix:read]`` is already emitted and kept as context; ``ids[read:]`` is pending.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], skip_special_tokens: bool) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        self._prefix = 0
        self._read = len(self._ids)

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        done = self._decode(self._ids[self._prefix:self._read])
        full = self._decode(self._ids[self._prefix:])
        if len(full) <= len(done) or full.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return full[len(done):]

    def flush(self) -> str:
        """Whatever is pending, U+FFFD included (the generation ended mid-character)."""
        if self._read == len(self._ids):
            return ""
        done = self._decode(self._ids[self._prefix:self._read])
        full = self._decode(self._ids[self._prefix:])
        self._prefix, self._read = self._read, len(self._ids)
        return full[len(done):]


class StopMatcher:
    """Holds back text that is, or might still become, one of the stop strings."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._pending = ""
        self.matched: str | None = None

    def push(self, text: str) -> str:
        """Add ``text``; return what can be emitted. After a match, ``matched`` is set, the text
        before the stop string is returned and everything after it is dropped."""
        if self.matched is not None:
            return ""
        buf = self._pending + text
        if not self._stops:
            return buf
        hits = [(buf.find(s), s) for s in self._stops]
        hits = [(i, s) for i, s in hits if i >= 0]
        if hits:
            index, stop = min(hits)
            self.matched, self._pending = stop, ""
            return buf[:index]
        hold = self._held_suffix(buf)
        self._pending = buf[len(buf) - hold:]
        return buf[:len(buf) - hold]

    def _held_suffix(self, buf: str) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of a stop string."""
        longest = min(len(buf), max(len(s) for s in self._stops) - 1)
        for n in range(longest, 0, -1):
            tail = buf[-n:]
            if any(s.startswith(tail) for s in self._stops):
                return n
        return 0

    def flush(self) -> str:
        pending, self._pending = self._pending, ""
        return pending if self.matched is None else ""


class Detokenizer:
    """Per-request text state: the decoder feeding the stop matcher."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], *, skip_special_tokens: bool,
                 stop: Sequence[str]) -> None:
        self._decoder = IncrementalDecoder(tokenizer, prompt_ids, skip_special_tokens)
        self._stop = StopMatcher(stop)
        self.text = ""  # everything emitted so far

    @property
    def stopped_on(self) -> str | None:
        return self._stop.matched

    def push(self, token_id: int) -> str:
        """Add a generated token; return the new text that is safe to emit (maybe "")."""
        new = self._stop.push(self._decoder.push(token_id))
        self.text += new
        return new

    def finish(self) -> str:
        """The request ended for a reason other than a stop string: release what was held."""
        new = self._stop.push(self._decoder.flush()) if self._stop.matched is None else ""
        new += self._stop.flush()
        self.text += new
        return new


class TokenTexts:
    """Memoised text of single tokens (for logprobs), special tokens included."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._tok.decode([token_id], skip_special_tokens=False)
            self._cache[token_id] = text
        return text

"""Engine logprobs (``TokenLogprob``) in OpenAI's two shapes.

Completions (legacy): parallel lists ``tokens``, ``token_logprobs``, ``top_logprobs`` (a dict
token -> logprob per position; like vLLM it always holds the chosen token, so up to N + 1
entries) and ``text_offset`` (character offset of each token in the returned text, echo
included). Chat: ``content`` is a list of ``{token, logprob, bytes, top_logprobs: [...]}``.
A prompt's first token has no logprob: ``None`` in the completions lists.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from server.api.responses import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob
from server.engine.request import TokenLogprob


def _finite(value: float) -> float:
    # JSON has no -inf; a token the model gives zero probability reports the float minimum.
    return value if math.isfinite(value) else -9999.0


def extend_completion_logprobs(
    target: CompletionLogprobs,
    entries: Sequence[TokenLogprob | None],
    offset: int,
    *,
    first_token: str = "",
) -> int:
    """Append ``entries`` to ``target`` starting at character ``offset``; returns the offset
    after them. A None entry (a prompt's first token) is written as ``first_token``."""
    for entry in entries:
        if entry is None:
            token, logprob, top = first_token, None, None
        else:
            token, logprob = entry.token, _finite(entry.logprob)
            top = {text: _finite(lp) for _, text, lp in entry.top}
            top.setdefault(entry.token, logprob)
        target.tokens.append(token)
        target.token_logprobs.append(logprob)
        target.top_logprobs.append(top)
        target.text_offset.append(offset)
        offset += len(token)
    return offset


def chat_logprobs(entries: Sequence[TokenLogprob], top_n: int) -> ChatLogprobs:
    return ChatLogprobs(content=[
        ChatTokenLogprob(
            token=entry.token,
            logprob=_finite(entry.logprob),
            bytes=list(entry.token.encode("utf-8")),
            top_logprobs=[TopLogprob(token=text, logprob=_finite(lp), bytes=list(text.encode("utf-8")))
                          for _, text, lp in entry.top[:top_n]],
        )
        for entry in entries
    ])

"""Benchmark workload: planted-domain prompts of an exact token length, and a thread-safe
recorder of when each request's tokens arrived from the engine."""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field

from server.engine.request import GenerationRequest, RequestOutput, SamplingParams
from server.model.tokenizer import TokenizerBundle
from server.tools.synth import DOMAINS, sample_prompt


def domain_prompt(tokenizer: TokenizerBundle, domain: int, n_tokens: int, seed: int) -> list[int]:
    """Exactly ``n_tokens`` ids of text from planted ``domain`` (words added until long enough)."""
    rng = random.Random(seed)
    ids: list[int] = []
    words = max(4, n_tokens)
    while len(ids) < n_tokens:
        ids = tokenizer.encode(sample_prompt(DOMAINS[domain % len(DOMAINS)], words, rng))
        words *= 2
    return ids[:n_tokens]


def greedy(max_tokens: int) -> SamplingParams:
    """Greedy, never stopping early: every request decodes exactly ``max_tokens`` tokens."""
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


@dataclass
class Track:
    submitted: float
    token_times: list[float] = field(default_factory=list)  # monotonic, one per generated token
    output: RequestOutput | None = None  # the final output
    error: str | None = None


class Recorder:
    """``on_output`` for every benchmark request: stamps tokens as the engine emits them."""

    def __init__(self) -> None:
        self.tracks: dict[str, Track] = {}
        self._cond = threading.Condition()

    def submitted(self, req: GenerationRequest) -> None:
        with self._cond:
            self.tracks[req.request_id] = Track(req.arrival_time)

    def __call__(self, out: RequestOutput) -> None:
        now = time.monotonic()
        with self._cond:
            track = self.tracks[out.request_id]
            track.token_times.extend([now] * len(out.new_token_ids))
            if out.finished:
                track.output = out
                if out.finish_reason == "error":
                    track.error = out.error or "error"
                self._cond.notify_all()

    def wait(self, ids: list[str], timeout_s: float) -> list[Track]:
        with self._cond:
            done = self._cond.wait_for(lambda: all(self.tracks[i].output is not None for i in ids), timeout_s)
            tracks = [self.tracks[i] for i in ids]
        if not done:
            raise TimeoutError(f"benchmark requests did not finish within {timeout_s:.0f} s")
        failed = [f"{i}: {t.error}" for i, t in zip(ids, tracks, strict=True) if t.error]
        if failed:
            raise RuntimeError(f"benchmark requests failed: {failed}")
        return tracks


def decode_rate(track: Track) -> float:
    """Tokens/s of one request after its first token (the decode steps alone)."""
    times = track.token_times
    span = times[-1] - times[0] if len(times) > 1 else 0.0
    return (len(times) - 1) / span if span > 0 else float("nan")


def ttft(track: Track) -> float:
    return track.token_times[0] - track.submitted

"""Batched token sampling with per-request seeded generators.

Order of operations for each row (vLLM's, with HF's repetition penalty):
  1. logprobs (when asked) = log_softmax of the RAW logits, before anything below;
  2. repetition_penalty over prompt + generated tokens (positive logits divided, negative
     multiplied); presence / frequency penalties over generated tokens only (OpenAI);
  3. temperature 0 -> argmax of the penalised logits (no randomness consumed);
  4. otherwise logits / temperature, then top_k, then top_p (on the top_k-renormalised
     distribution), then min_p (drop p < min_p * max p; commutes with 4's other filters);
  5. draw with the row's own generator: argmax(p / q), q ~ Exp(1) [V], the exponential-race
     form of a categorical draw. Each row draws one [V] vector per step from its own generator,
     so a seeded request gives the same tokens whatever else is in the batch.
A row whose logits hold NaN gets token -1 (the engine fails that request alone).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from server.engine.request import SamplingParams

# (chosen token id, its logprob, [(top token id, logprob), ...] best first)
RawLogprob = tuple[int, float, list[tuple[int, float]]]


class SamplingState:
    """Per-request sampling state: the generator and the token statistics penalties need."""

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int], vocab_size: int,
                 device: torch.device) -> None:
        self.params = params
        self.vocab_size = vocab_size
        self.seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.generator: torch.Generator | None = None
        if not params.greedy:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(self.seed)
        # counts of generated tokens [V]; only allocated when a penalty needs them
        self.output_counts: torch.Tensor | None = None
        if params.presence_penalty != 0.0 or params.frequency_penalty != 0.0:
            self.output_counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)
        # prompt + generated tokens seen so far [V] (repetition penalty)
        self.seen: torch.Tensor | None = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            ids = [t for t in prompt_ids if 0 <= t < vocab_size]
            if ids:
                self.seen[torch.tensor(ids, dtype=torch.long, device=device)] = True

    def record(self, token_id: int) -> None:
        """Account for a generated token (call once per sampled token)."""
        if not 0 <= token_id < self.vocab_size:
            return
        if self.output_counts is not None:
            self.output_counts[token_id] += 1.0
        if self.seen is not None:
            self.seen[token_id] = True


@dataclass(frozen=True)
class SampleResult:
    token_ids: list[int]  # -1 where the row's logits held NaN
    logprobs: list[RawLogprob | None]  # per row; None where the row did not ask


def _rows(states: Sequence[SamplingState], pred: Callable[[SamplingState], bool]) -> list[int]:
    return [i for i, s in enumerate(states) if pred(s)]


def apply_penalties(logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
    """Penalised copy of ``logits`` [B, V] (float32)."""
    x = logits.clone()
    device = x.device
    rep = _rows(states, lambda s: s.seen is not None)
    if rep:
        idx = torch.tensor(rep, device=device)
        seen = torch.stack([states[i].seen for i in rep])  # type: ignore[misc]  # [R, V]
        pen = torch.tensor([states[i].params.repetition_penalty for i in rep], device=device)[:, None]
        rows = x[idx]
        penalised = torch.where(rows > 0, rows / pen, rows * pen)
        x[idx] = torch.where(seen, penalised, rows)
    pf = _rows(states, lambda s: s.output_counts is not None)
    if pf:
        idx = torch.tensor(pf, device=device)
        counts = torch.stack([states[i].output_counts for i in pf])  # type: ignore[misc]  # [R, V]
        freq = torch.tensor([states[i].params.frequency_penalty for i in pf], device=device)[:, None]
        pres = torch.tensor([states[i].params.presence_penalty for i in pf], device=device)[:, None]
        x[idx] = x[idx] - freq * counts - pres * (counts > 0).float()
    return x


def filter_logits(x: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature-scaled logits [R, V] with top_k / top_p / min_p filtered tokens at -inf."""
    device = x.device
    temp = torch.tensor([p.temperature for p in params], device=device)[:, None]
    x = x / temp
    if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
        sorted_x, order = x.sort(dim=-1, descending=True)  # [R, V]
        rank = torch.arange(x.shape[-1], device=device)[None, :]
        k = torch.tensor([p.top_k if p.top_k > 0 else x.shape[-1] for p in params], device=device)
        sorted_x = sorted_x.masked_fill(rank >= k[:, None], float("-inf"))
        top_p = torch.tensor([p.top_p for p in params], device=device)[:, None]
        probs = sorted_x.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of strictly better tokens
        drop = (before >= top_p) & (top_p < 1.0)
        sorted_x = sorted_x.masked_fill(drop, float("-inf"))
        x = torch.empty_like(x).scatter_(-1, order, sorted_x)
    if any(p.min_p > 0.0 for p in params):
        probs = x.softmax(dim=-1)
        min_p = torch.tensor([p.min_p for p in params], device=device)[:, None]
        x = x.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))
    return x


def sample(logits: torch.Tensor, states: Sequence[SamplingState]) -> SampleResult:
    """Pick one token per row of ``logits`` [B, V] (float32, raw model output)."""
    if logits.dim() != 2 or logits.shape[0] != len(states):
        raise ValueError(f"logits must be [B={len(states)}, V], got {tuple(logits.shape)}")
    logits = logits.float()
    x = apply_penalties(logits, states)
    tokens = x.argmax(dim=-1)  # [B]; kept for greedy rows
    rand = _rows(states, lambda s: s.generator is not None)
    if rand:
        idx = torch.tensor(rand, device=x.device)
        filtered = filter_logits(x[idx], [states[i].params for i in rand])
        probs = filtered.softmax(dim=-1)  # [R, V]
        q = torch.stack([torch.empty_like(probs[0]).exponential_(generator=states[i].generator)
                         for i in rand])
        # an exact 0 draw would make 0/0 = NaN win the argmax for a filtered token
        q.clamp_(min=torch.finfo(q.dtype).tiny)
        tokens[idx] = (probs / q).argmax(dim=-1)
    tokens = torch.where(torch.isnan(logits).any(dim=-1), torch.full_like(tokens, -1), tokens)
    token_list: list[int] = tokens.tolist()
    return SampleResult(token_list, _logprobs(logits, tokens, states))


def _logprobs(logits: torch.Tensor, tokens: torch.Tensor,
              states: Sequence[SamplingState]) -> list[RawLogprob | None]:
    out: list[RawLogprob | None] = [None] * len(states)
    want = _rows(states, lambda s: s.params.logprobs is not None)
    if not want:
        return out
    idx = torch.tensor(want, device=logits.device)
    lp = torch.log_softmax(logits[idx], dim=-1)  # [R, V]
    chosen = lp.gather(-1, tokens[idx].clamp(min=0)[:, None])[:, 0].tolist()
    n = max(states[i].params.logprobs or 0 for i in want)
    top_lp, top_id = lp.topk(n, dim=-1) if n > 0 else (lp[:, :0], lp[:, :0].long())
    top_lp_l, top_id_l = top_lp.tolist(), top_id.tolist()
    token_l = tokens[idx].tolist()
    for r, i in enumerate(want):
        k = states[i].params.logprobs or 0
        out[i] = (token_l[r], chosen[r], list(zip(top_id_l[r][:k], top_lp_l[r][:k], strict=True)))
    return out


def prompt_logprobs(logits: torch.Tensor, prompt_ids: Sequence[int], n: int,
                    chunk: int = 512) -> list[RawLogprob | None]:
    """Logprobs of each prompt token given the ones before it: ``logits`` [T, V] from a prefill
    with all_logits=True; entry 0 is None (nothing predicts the first token)."""
    if logits.shape[0] != len(prompt_ids):
        raise ValueError(f"prompt logits must be [T={len(prompt_ids)}, V], got {tuple(logits.shape)}")
    out: list[RawLogprob | None] = [None]
    targets = torch.tensor(list(prompt_ids[1:]), dtype=torch.long, device=logits.device)
    for start in range(0, len(prompt_ids) - 1, chunk):  # chunks bound the [chunk, V] temporaries
        lp = torch.log_softmax(logits[start:start + chunk].float(), dim=-1)
        tgt = targets[start:start + lp.shape[0]]
        lp = lp[: tgt.shape[0]]
        chosen = lp.gather(-1, tgt[:, None])[:, 0].tolist()
        top_lp, top_id = lp.topk(n, dim=-1) if n > 0 else (lp[:, :0], lp[:, :0].long())
        for t, c, ids, lps in zip(tgt.tolist(), chosen, top_id.tolist(), top_lp.tolist(), strict=True):
            out.append((t, c, list(zip(ids, lps, strict=True))))
    return out

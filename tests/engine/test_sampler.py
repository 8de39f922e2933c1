"""The sampler against direct computations of each knob."""

from __future__ import annotations

import math

import pytest
import torch

from server.engine.request import SamplingParams
from server.engine.sampler import (
    SamplingState,
    apply_penalties,
    filter_logits,
    prompt_logprobs,
    sample,
)

CPU = torch.device("cpu")
V = 8


def state(prompt: list[int] | None = None, **kw: object) -> SamplingState:
    kw.setdefault("max_tokens", 16)
    return SamplingState(SamplingParams(**kw), prompt or [], V, CPU)  # type: ignore[arg-type]


def logits_row() -> torch.Tensor:
    return torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.5, 1.0, 0.0, -0.5]])


def test_greedy_is_argmax_of_penalised_logits() -> None:
    x = logits_row()
    assert sample(x, [state(temperature=0.0)]).token_ids == [3]
    s = state(temperature=0.0, frequency_penalty=2.0)
    s.record(3)
    assert sample(x, [s]).token_ids == [0]  # 3.0 - 2.0 = 1.0 < 2.0


def test_repetition_penalty_divides_positive_and_multiplies_negative() -> None:
    x = logits_row()
    s = state(prompt=[0, 1], repetition_penalty=2.0)  # prompt tokens count (HF semantics)
    s.record(4)
    expected = x.clone()
    for t in (0, 1, 4):
        expected[0, t] = x[0, t] / 2.0 if x[0, t] > 0 else x[0, t] * 2.0
    assert torch.equal(apply_penalties(x, [s]), expected)


def test_presence_and_frequency_penalties_count_generated_tokens_only() -> None:
    x = logits_row()
    s = state(prompt=[5, 5, 5], presence_penalty=0.5, frequency_penalty=0.25)
    for t in (2, 2, 2, 7):
        s.record(t)
    expected = x.clone()
    expected[0, 2] -= 0.5 + 3 * 0.25
    expected[0, 7] -= 0.5 + 1 * 0.25
    assert torch.allclose(apply_penalties(x, [s]), expected)


def test_penalties_apply_per_row() -> None:
    x = torch.cat([logits_row(), logits_row()])
    a, b = state(frequency_penalty=1.0), state()
    a.record(3)
    out = apply_penalties(x, [a, b])
    assert out[0, 3] == 2.0 and out[1, 3] == 3.0


def _probs_after(x: torch.Tensor, **kw: object) -> torch.Tensor:
    return filter_logits(x, [SamplingParams(max_tokens=1, **kw)]).softmax(-1)[0]  # type: ignore[arg-type]


def test_temperature_top_k_top_p_min_p_match_direct_computation() -> None:
    x = logits_row()
    p = (x[0] / 0.7).softmax(-1)
    assert torch.allclose(_probs_after(x, temperature=0.7), p)
    # top_k: the k largest, renormalised
    keep = torch.zeros(V, dtype=torch.bool)
    keep[x[0].topk(3).indices] = True
    ref = torch.where(keep, p, 0.0)
    assert torch.allclose(_probs_after(x, temperature=0.7, top_k=3), ref / ref.sum())
    # top_p: the smallest set of most probable tokens whose mass reaches top_p
    order = p.argsort(descending=True)
    kept, mass = [], 0.0
    for t in order.tolist():
        kept.append(t)
        mass += p[t].item()
        if mass >= 0.8:
            break
    ref = torch.zeros(V)
    ref[kept] = p[kept]
    assert torch.allclose(_probs_after(x, temperature=0.7, top_p=0.8), ref / ref.sum())
    # min_p: drop tokens below min_p * max probability
    ref = torch.where(p >= 0.2 * p.max(), p, 0.0)
    assert torch.allclose(_probs_after(x, temperature=0.7, min_p=0.2), ref / ref.sum())


def test_top_p_applies_to_the_top_k_distribution() -> None:
    x = logits_row()
    got = _probs_after(x, top_k=2, top_p=0.6)  # top-2: tokens 3 and 0
    p2 = x[0, [3, 0]].softmax(-1)
    assert p2[0] >= 0.6 and got[3] == 1.0  # token 3 alone reaches 0.6 of the top-2 mass


def test_sampling_frequencies_follow_the_distribution() -> None:
    x = torch.tensor([[1.0, 0.0, 0.5, -1.0]])
    s = SamplingState(SamplingParams(max_tokens=1, temperature=1.0, seed=1234), [], 4, CPU)
    n = 2000
    counts = torch.zeros(4)
    for _ in range(n):
        counts[sample(x, [s]).token_ids[0]] += 1
    assert torch.allclose(counts / n, x[0].softmax(-1), atol=0.035)


def test_filtered_tokens_are_never_sampled() -> None:
    x = logits_row()
    s = state(temperature=1.5, top_k=2, seed=7)
    tokens = {sample(x, [s]).token_ids[0] for _ in range(200)}
    assert tokens <= {0, 3} and len(tokens) == 2


def test_seeded_rows_do_not_depend_on_the_batch() -> None:
    x = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))

    def run(batch: list[int], steps: int = 20) -> list[list[int]]:
        states = [SamplingState(SamplingParams(max_tokens=1, temperature=1.0 + 0.1 * i, seed=100 + i,
                                               top_p=0.9 if i == 1 else 1.0), [], 50, CPU)
                  for i in batch]
        out: list[list[int]] = [[] for _ in batch]
        for _ in range(steps):
            toks = sample(x[batch], states).token_ids
            for r, t in enumerate(toks):
                out[r].append(t)
        return out

    alone = run([1])[0]
    assert run([0, 1, 2])[1] == alone
    assert run([2, 1])[1] == alone
    assert run([1])[0] == alone  # same seed, same tokens
    other = SamplingState(SamplingParams(max_tokens=1, temperature=1.1, seed=999, top_p=0.9), [], 50, CPU)
    assert [sample(x[[1]], [other]).token_ids[0] for _ in range(20)] != alone


def test_logprobs_are_raw_log_softmax_with_sorted_top_n() -> None:
    x = logits_row()
    s = state(temperature=0.5, presence_penalty=2.0, logprobs=3, seed=3)
    s.record(3)
    result = sample(torch.cat([x, x]), [s, state(temperature=0.0)])
    raw = torch.log_softmax(x[0], -1)
    token, lp, top = result.logprobs[0]  # type: ignore[misc]
    assert token == result.token_ids[0] and math.isclose(lp, raw[token].item(), rel_tol=1e-6)
    assert [t for t, _ in top] == raw.topk(3).indices.tolist()
    assert all(math.isclose(v, raw[t].item(), rel_tol=1e-6) for t, v in top)
    assert result.logprobs[1] is None


def test_prompt_logprobs() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, V)
    prompt = [1, 4, 0, 7, 2]
    out = prompt_logprobs(logits, prompt, 2, chunk=2)
    assert out[0] is None and len(out) == 5
    for i in range(1, 5):
        lp = torch.log_softmax(logits[i - 1], -1)
        token, value, top = out[i]  # type: ignore[misc]
        assert token == prompt[i] and math.isclose(value, lp[prompt[i]].item(), rel_tol=1e-6)
        assert [t for t, _ in top] == lp.topk(2).indices.tolist()


def test_nan_row_gets_minus_one_alone() -> None:
    x = torch.cat([logits_row(), torch.full((1, V), float("nan"))])
    assert sample(x, [state(temperature=0.0), state(temperature=1.0, seed=1)]).token_ids == [3, -1]


@pytest.mark.parametrize("kw", [dict(temperature=-0.1), dict(top_p=0.0), dict(top_k=-1), dict(min_p=1.5),
                                dict(presence_penalty=3.0), dict(repetition_penalty=0.0),
                                dict(logprobs=21), dict(stop=("",)), dict(max_tokens=-1),
                                dict(temperature=float("nan")), dict(seed=2**64)])
def test_sampling_params_validation_names_the_field(kw: dict[str, object]) -> None:
    kw.setdefault("max_tokens", 4)
    name = next(k for k in kw if k != "max_tokens") if len(kw) > 1 else "max_tokens"
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kw)  # type: ignore[arg-type]

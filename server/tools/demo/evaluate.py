"""Held-out losses of the demo models under full routing, serving-rule pools and random pools.

Every held-out document is cut to `max_len` tokens. Its first `prefix` tokens are the "prompt":
with a pool, the pool of each layer is chosen from the prompt's router probabilities, layer by
layer (the serving rule, docs/emo.md); every configuration is scored on the tokens after the
prompt, so the five numbers of a domain are over exactly the same targets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from server.model.config import fraction_pool_size
from server.tools.demo.corpus import DOMAINS, Document
from server.tools.demo.train.model import EmoForTraining
from server.tools.demo.train.plan import RoutePlan

MODES = ("full", "pool", "random")


@dataclass(frozen=True)
class EvalConfig:
    prefix: int = 64
    max_len: int = 256
    min_scored: int = 32
    pool_fraction: float = 0.25
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.prefix < self.max_len or self.min_scored < 1:
            raise ValueError("EvalConfig needs 0 < prefix < max_len and min_scored >= 1")
        if not 0 < self.pool_fraction <= 1:
            raise ValueError("EvalConfig.pool_fraction must be in (0, 1]")

    def pool_size(self, routable: int, routed: int) -> int:
        """The serving rule (ModelConfig.default_pool_size) with this config's fraction."""
        return fraction_pool_size(self.pool_fraction, routed, routable)


@dataclass(frozen=True)
class HeldOutDoc:
    domain: str
    name: str
    ids: list[int]


@dataclass
class ModeResult:
    """Summed NLL and target counts per domain and per document (in document order); pools
    [D, L, R] in document order (pool modes)."""

    nll: dict[str, float] = field(default_factory=lambda: dict.fromkeys(DOMAINS, 0.0))
    tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DOMAINS, 0))
    doc_nll: list[float] = field(default_factory=list)
    doc_tokens: list[int] = field(default_factory=list)
    pools: torch.Tensor | None = None

    def loss(self, domain: str) -> float:
        return self.nll[domain] / max(self.tokens[domain], 1)

    def mean_loss(self) -> float:
        """Unweighted mean over the domains: every domain counts the same."""
        present = [d for d in DOMAINS if self.tokens[d]]
        return sum(self.loss(d) for d in present) / max(len(present), 1)


def prepare(documents: Sequence[Document], tokenizer: Tokenizer, cfg: EvalConfig) -> list[HeldOutDoc]:
    """Documents long enough for a prompt plus `min_scored` targets, cut to `max_len` tokens."""
    kept = []
    for doc, enc in zip(documents, tokenizer.encode_batch([d.text for d in documents]), strict=True):
        if len(enc.ids) >= cfg.prefix + cfg.min_scored:
            kept.append(HeldOutDoc(doc.domain, doc.name, enc.ids[: cfg.max_len]))
    return kept


def random_pools(
    num_layers: int, num_docs: int, routable: int, size: int, generator: torch.Generator
) -> torch.Tensor:
    """[L, D, R] bool: `size` experts drawn uniformly without replacement per layer and document."""
    ranks = torch.rand(num_layers, num_docs, routable, generator=generator).argsort(dim=-1).argsort(dim=-1)
    return ranks < size


@torch.no_grad()
def evaluate_mode(
    model: EmoForTraining, docs: Sequence[HeldOutDoc], cfg: EvalConfig, mode: str, pad_id: int
) -> ModeResult:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    c = model.config
    size = cfg.pool_size(c.routable_experts, c.num_routed)
    generator = torch.Generator().manual_seed(cfg.seed)
    result = ModeResult()
    pools: list[torch.Tensor] = []
    for start in range(0, len(docs), cfg.batch_size):
        group = docs[start : start + cfg.batch_size]
        T = max(len(d.ids) for d in group)
        ids = torch.full((len(group), T), pad_id, dtype=torch.long)
        valid = torch.zeros((len(group), T), dtype=torch.bool)
        for row, doc in enumerate(group):
            ids[row, : len(doc.ids)] = torch.tensor(doc.ids)
            valid[row, : len(doc.ids)] = True
        segments = (~valid).long()  # the document is segment 0 of its row, padding segment 1
        plan = RoutePlan.from_segments(segments, valid)
        if mode == "pool":
            plan.pool_sizes = torch.full((c.num_layers, plan.num_segments), size, dtype=torch.long)
            plan.score_mask = (plan.positions.reshape(-1) < cfg.prefix) & plan.valid
        elif mode == "random":
            drawn = random_pools(c.num_layers, plan.num_segments, c.routable_experts, size, generator)
            plan.fixed_pools = list(drawn)
        logits, _ = model(ids, plan)
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")  # [B, T-1]
        target_pos = torch.arange(1, T)[None, :]
        scored = valid[:, 1:] & (target_pos >= cfg.prefix)
        for row, doc in enumerate(group):
            doc_nll, doc_tokens = float(nll[row][scored[row]].sum()), int(scored[row].sum())
            result.nll[doc.domain] += doc_nll
            result.tokens[doc.domain] += doc_tokens
            result.doc_nll.append(doc_nll)
            result.doc_tokens.append(doc_tokens)
        if mode == "pool":
            doc_segments = plan.seg.view(len(group), T)[:, 0]  # segment id of each row's document
            pools.append(torch.stack([p[doc_segments] for p in plan.chosen_pools], dim=1))  # [B, L, R]
    if pools:
        result.pools = torch.cat(pools)
    return result


def jaccard_overlap(pools: torch.Tensor, domains: Sequence[str]) -> tuple[float, float]:
    """Mean Jaccard overlap of (layer, expert) pool sets: (same-domain pairs, different-domain pairs)."""
    flat = pools.reshape(pools.shape[0], -1).float()  # [D, L*R]
    inter = flat @ flat.T
    sizes = flat.sum(dim=1)
    jac = inter / (sizes[:, None] + sizes[None, :] - inter)
    labels = torch.tensor([DOMAINS.index(d) for d in domains])
    same = labels[:, None] == labels[None, :]
    off_diag = ~torch.eye(len(domains), dtype=torch.bool)
    return float(jac[same & off_diag].mean()), float(jac[~same].mean())


def pool_frequency(pools: torch.Tensor, domains: Sequence[str]) -> torch.Tensor:
    """[len(DOMAINS), L*R]: how often each (layer, expert) enters a document's pool, per domain."""
    flat = pools.reshape(pools.shape[0], -1).float()
    rows = []
    for domain in DOMAINS:
        chosen = [i for i, d in enumerate(domains) if d == domain]
        rows.append(flat[chosen].mean(dim=0) if chosen else torch.zeros(flat.shape[1]))
    return torch.stack(rows)

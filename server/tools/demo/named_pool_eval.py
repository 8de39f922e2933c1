"""`emo-serve demo named-pools`: does ONE example choose a domain's pool? (EMO's claim)

On the held-out documents (cut and split exactly as `demo evaluate` does: the first `prefix`
tokens are the prompt, the loss is over the tokens after it), every document is scored
through the serving model (server/model, the code the server runs) with:

- full routing;
- its own pool: chosen by the serving rule from its own prompt (`demo evaluate`'s column 2);
- a named pool made from ONE other held-out document of the same domain (the next one in
  corpus order), as POST /v1/pools makes it: the serving rule over that whole example
  (cut to `max_len` tokens);
- the named pools of the other domains, each made from one of their documents the same way
  (for the k-th document of a domain, the k-th document of the other domain, cyclically).

Every pool has the same size (a quarter of the routable experts: 8 of 32 on the demo model).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from server.model.kv_cache import KVCache
from server.model.loader import LoadedModel, load_model
from server.tools.demo.corpus import DOMAINS, load_documents
from server.tools.demo.evaluate import EvalConfig, HeldOutDoc, prepare

Pools = list[torch.Tensor | None]
COLUMNS = ("full", "own", "same", "other")


@dataclass
class DomainLosses:
    """Summed NLL and target counts of one domain, per column; "other" sums every other domain."""

    nll: dict[str, float] = field(default_factory=lambda: dict.fromkeys(COLUMNS, 0.0))
    tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COLUMNS, 0))
    by_source: dict[str, list[float]] = field(default_factory=dict)  # other domain -> [nll, tokens]
    docs: int = 0

    def loss(self, column: str) -> float:
        """NaN when nothing was scored (a domain with one document has no "same" pool)."""
        return self.nll[column] / self.tokens[column] if self.tokens[column] else math.nan

    def source_loss(self, source: str) -> float:
        nll, tokens = self.by_source[source]
        return nll / max(tokens, 1)


class Scorer:
    """Prefill through the serving model, one document at a time."""

    def __init__(self, loaded: LoadedModel, max_len: int) -> None:
        self.model = loaded.model
        self.kv = KVCache(loaded.config, num_slots=1, max_len=max_len, device=self.model.device,
                          dtype=self.model.dtype)

    def pool(self, ids: Sequence[int], size: int) -> Pools:
        return self.model.pools_from_examples([torch.tensor(list(ids))], size)

    def nll(self, doc: HeldOutDoc, prefix: int, size: int | None, pools: Pools | None) -> tuple[float, int]:
        """Summed NLL of the tokens after ``prefix`` and their count."""
        ids = torch.tensor(doc.ids)
        out = self.model.prefill(ids, self.kv, 0, pool_size=size, all_logits=True, given_pools=pools)
        losses = F.cross_entropy(out.logits[:-1], ids[1:].to(out.logits.device), reduction="none")  # [T-1]
        scored = losses[prefix - 1:]  # targets at positions >= prefix
        return float(scored.sum()), int(scored.numel())


def evaluate_named_pools(loaded: LoadedModel, docs: Sequence[HeldOutDoc], cfg: EvalConfig,
                         progress: Callable[[int, int], None] | None = None) -> dict[str, DomainLosses]:
    routed, routable = loaded.config.pool_bounds()
    size = cfg.pool_size(routable, routed)
    scorer = Scorer(loaded, cfg.max_len)
    by_domain = {d: [doc for doc in docs if doc.domain == d] for d in DOMAINS}
    named = {id(doc): scorer.pool(doc.ids, size) for doc in docs}  # each document as one example
    results = {d: DomainLosses() for d in DOMAINS if by_domain[d]}
    done = 0
    for domain, group in by_domain.items():
        for k, doc in enumerate(group):
            row = results[domain]
            row.docs += 1
            own = scorer.pool(doc.ids[: cfg.prefix], size)
            same = named[id(group[(k + 1) % len(group)])] if len(group) > 1 else None
            cases: list[tuple[str, int | None, Pools | None]] = [("full", None, None), ("own", size, own)]
            if same is not None:
                cases.append(("same", size, same))
            for column, pool_size, pools in cases:
                nll, count = scorer.nll(doc, cfg.prefix, pool_size, pools)
                row.nll[column] += nll
                row.tokens[column] += count
            for source, others in by_domain.items():
                if source == domain or not others:
                    continue
                nll, count = scorer.nll(doc, cfg.prefix, size, named[id(others[k % len(others)])])
                row.nll["other"] += nll
                row.tokens["other"] += count
                acc = row.by_source.setdefault(source, [0.0, 0])
                acc[0] += nll
                acc[1] += count
            done += 1
            if progress is not None:
                progress(done, len(docs))
    return results


def markdown(results: dict[str, DomainLosses], size: int, routable: int, prefix: int) -> str:
    head = ("| domain | docs | full | own pool | pool of ONE other doc, same domain | vs own | "
            "pools of the other domains (mean) | vs own | worst other domain | vs own |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for domain, row in results.items():
        own = row.loss("own")
        worst = max(row.by_source, key=row.source_loss, default=None)
        worst_loss = math.nan if worst is None else row.source_loss(worst)
        lines.append(
            f"| {domain} | {row.docs} | {row.loss('full'):.3f} | {own:.3f} | {_num(row.loss('same'))} | "
            f"{_pct(row.loss('same'), own)} | {_num(row.loss('other'))} | {_pct(row.loss('other'), own)} | "
            f"{worst or '-'} {_num(worst_loss)} | {_pct(worst_loss, own)} |")
    lines += ["", f"Pools: {size} of {routable} routable experts per layer. Losses: nats per token on the "
              f"tokens after the first {prefix} of each held-out document (its own pool is chosen from "
              "those); a named pool comes from one whole other document (up to the cut)."]
    return "\n".join(lines)


def _num(value: float) -> str:
    return f"{value:.3f}" if math.isfinite(value) else "-"


def _pct(value: float, base: float) -> str:
    return f"{100 * (value / base - 1):+.1f}%" if base > 0 and math.isfinite(value) else "-"


def as_json(results: dict[str, DomainLosses], size: int, routable: int, prefix: int) -> dict[str, Any]:
    return {"pool_size": size, "routable": routable, "prefix": prefix,
            "domains": {d: {"docs": r.docs, **{c: _json_number(r.loss(c)) for c in COLUMNS},
                            "by_other_domain": {s: r.source_loss(s) for s in r.by_source}}
                        for d, r in results.items()}}


def _json_number(value: float) -> float | None:
    return value if math.isfinite(value) else None


def run_named_pool_evaluation(model_dir: Path, corpus: Path, out: Path | None, cfg: EvalConfig,
                              progress: Callable[[int, int], None] | None = None) -> str:
    """Runs the evaluation; writes OUT/named_pools.md and OUT/named_pools.json when ``out``."""
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    docs = prepare(load_documents(corpus, "heldout"), tokenizer, cfg)
    if not docs:
        raise ValueError(f"{corpus}: no held-out document has {cfg.prefix + cfg.min_scored} tokens")
    loaded = load_model(model_dir, device="cpu", dtype=torch.float32)
    results = evaluate_named_pools(loaded, docs, cfg, progress)
    mc = loaded.config
    routed, routable = mc.pool_bounds()
    size = cfg.pool_size(routable, routed)
    table = markdown(results, size, routable, cfg.prefix)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "named_pools.md").write_text(table + "\n")
        (out / "named_pools.json").write_text(json.dumps(as_json(results, size, routable, cfg.prefix),
                                                         indent=1) + "\n")
    return table

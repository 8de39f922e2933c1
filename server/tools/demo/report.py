"""`emo-serve demo evaluate`: the five-configuration table, pool overlap, heatmap, samples."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from server.tools.demo.corpus import DOMAINS, load_documents
from server.tools.demo.evaluate import (
    EvalConfig,
    HeldOutDoc,
    ModeResult,
    evaluate_mode,
    jaccard_overlap,
    pool_frequency,
    prepare,
)
from server.tools.demo.heatmap import heatmap
from server.tools.demo.train.export import load_checkpoint

COLUMNS = (
    ("emo", "full", "1. EMO full"),
    ("emo", "pool", "2. EMO pool (serving rule)"),
    ("emo", "random", "3. EMO random pool"),
    ("baseline", "pool", "4. baseline pool (serving rule)"),
    ("baseline", "full", "5. baseline full"),
)


@dataclass(frozen=True)
class Evaluation:
    results: dict[tuple[str, str], ModeResult]
    pool_size: int
    routable: int
    documents: dict[str, int]
    jaccard: dict[str, tuple[float, float]]  # model -> (same domain, different domain)
    prefix: int

    def markdown(self) -> str:
        head = "| domain | docs | " + " | ".join(c[2] for c in COLUMNS) + " | (2)/(1) |"
        lines = [head, "|" + "---|" * (len(COLUMNS) + 3)]
        for domain in [*DOMAINS, "mean"]:
            losses = [self._loss(model, mode, domain) for model, mode, _ in COLUMNS]
            docs = sum(self.documents.values()) if domain == "mean" else self.documents[domain]
            cells = " | ".join(f"{x:.3f}" for x in losses)
            lines.append(f"| {domain} | {docs} | {cells} | {losses[1] / losses[0]:.3f} |")
        lines.append("")
        lines.append(
            f"Pool: {self.pool_size} of {self.routable} routable experts per layer, chosen from the "
            f"first {self.prefix} tokens of each document; losses are nats per token on the tokens "
            "after them."
        )
        for model, (same, diff) in self.jaccard.items():
            lines.append(
                f"- {model}: mean Jaccard overlap of pools, same-domain pairs {same:.3f}, "
                f"different-domain pairs {diff:.3f}"
            )
        return "\n".join(lines)

    def _loss(self, model: str, mode: str, domain: str) -> float:
        result = self.results[(model, mode)]
        return result.mean_loss() if domain == "mean" else result.loss(domain)

    def as_json(self) -> dict[str, Any]:
        return {
            "pool_size": self.pool_size,
            "routable": self.routable,
            "documents": self.documents,
            "losses": {
                f"{m}/{mode}": {d: self._loss(m, mode, d) for d in [*DOMAINS, "mean"]}
                for m, mode, _ in COLUMNS
            },
            "jaccard": {m: {"same_domain": s, "different_domain": d} for m, (s, d) in self.jaccard.items()},
        }


DOCUMENTS_NAME = "evaluation_documents.tsv"


def documents_tsv(docs: list[HeldOutDoc], results: dict[tuple[str, str], ModeResult]) -> str:
    """One row per held-out document: its id, tokens kept, tokens scored, and the summed NLL of
    every column, so that each cell of the table can be re-derived (a domain's loss is its
    summed NLL over its scored tokens; the mean row is the unweighted mean of the domains)."""
    names = [f"{m}/{mode}" for m, mode, _ in COLUMNS]
    lines = ["\t".join(["id", "domain", "tokens", "scored", *(f"nll {n}" for n in names)])]
    for i, doc in enumerate(docs):
        scored = {results[(m, mode)].doc_tokens[i] for m, mode, _ in COLUMNS}
        if len(scored) != 1:
            raise RuntimeError(f"{doc.domain}/{doc.name}: the columns scored different targets {scored}")
        nll = [f"{results[(m, mode)].doc_nll[i]:.6f}" for m, mode, _ in COLUMNS]
        lines.append("\t".join([f"{doc.domain}/{doc.name}", doc.domain, str(len(doc.ids)), str(scored.pop()),
                                *nll]))
    return "\n".join(lines) + "\n"


def run_evaluation(emo: Path, baseline: Path, corpus: Path, out: Path, cfg: EvalConfig) -> Evaluation:
    """Writes OUT/evaluation.md, OUT/evaluation.json, OUT/evaluation_documents.tsv and
    OUT/pool_heatmap.png; returns the numbers."""
    tokenizer = Tokenizer.from_file(str(emo / "tokenizer.json"))
    pad_id = json.loads((emo / "generation_config.json").read_text())["pad_token_id"]
    docs = prepare(load_documents(corpus, "heldout"), tokenizer, cfg)
    if not docs:
        raise ValueError(f"{corpus}: no held-out document has {cfg.prefix + cfg.min_scored} tokens")
    models = {"emo": load_checkpoint(emo), "baseline": load_checkpoint(baseline)}
    results = {(m, mode): evaluate_mode(models[m], docs, cfg, mode, pad_id) for m, mode, _ in COLUMNS}
    domains = [d.domain for d in docs]
    jaccard = {}
    for name in models:
        pools = results[(name, "pool")].pools
        assert pools is not None
        jaccard[name] = jaccard_overlap(pools, domains)
    config = models["emo"].config
    emo_pools = results[("emo", "pool")].pools
    assert emo_pools is not None
    out.mkdir(parents=True, exist_ok=True)
    heatmap(
        out / "pool_heatmap.png",
        pool_frequency(emo_pools, domains).tolist(),
        groups=config.num_layers,
        labels=DOMAINS,
    )
    evaluation = Evaluation(
        results,
        cfg.pool_size(config.routable_experts, config.num_routed),
        config.routable_experts,
        {d: domains.count(d) for d in DOMAINS},
        jaccard,
        cfg.prefix,
    )
    (out / "evaluation.md").write_text(evaluation.markdown() + "\n")
    (out / "evaluation.json").write_text(json.dumps(evaluation.as_json(), indent=1) + "\n")
    (out / DOCUMENTS_NAME).write_text(documents_tsv(docs, results))
    return evaluation

"""One greedy completion per domain, with its expert pool, through the serving path (README material)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from server.tools.demo.corpus import DOMAINS, load_documents
from server.tools.demo.generate import Continuation, greedy, load_for_generation

# Fixed prompts of three domains: the shipped model's recorded continuations (tests/tools/demo) use them.
FIXED_PROMPTS: dict[str, str] = {
    "code": "import os\nimport sys\n\n\ndef main(argv):\n    ",
    "licence": "Permission is hereby granted, free of charge, to any person obtaining a copy\nof this",
    "manpage": "NAME\n       ls - list directory contents\n\nSYNOPSIS\n       ls [OPTION]... [FILE]...\n\n"
    "DESCRIPTION\n       ",
}


@dataclass(frozen=True)
class Sample:
    domain: str
    source: str
    prompt: str
    completion: Continuation


def prompt_of(text: str, chars: int) -> str:
    """The document's opening, cut at a line end near `chars` characters."""
    cut = text.rfind("\n", 0, chars)
    return text[: cut + 1 if cut > chars // 3 else chars]


def domain_samples(
    checkpoint: Path, corpus: Path, chars: int = 200, max_new_tokens: int = 40
) -> list[Sample]:
    loaded = load_for_generation(checkpoint)
    pool = loaded.config.default_pool_size()
    held = load_documents(corpus, "heldout")
    samples = []
    for domain in DOMAINS:
        doc = next((d for d in held if d.domain == domain and len(d.text) > 2 * chars), None)
        if doc is None:
            continue
        prompt = prompt_of(doc.text, chars)
        samples.append(Sample(domain, doc.doc_id, prompt, greedy(loaded, prompt, max_new_tokens, pool)))
    return samples


def samples_markdown(samples: list[Sample]) -> str:
    parts = []
    for s in samples:
        pools = s.completion.pools or []
        pool_lines = "; ".join(f"layer {i}: {ids}" for i, ids in enumerate(pools))
        parts.append(
            f"**{s.domain}** (held-out `{s.source}`), pool {pool_lines}\n\n"
            f"```text\n{s.prompt}\u2192{s.completion.text}\n```\n"
        )
    return "\n".join(parts)


def fixed_continuations(checkpoint: Path, max_new_tokens: int = 16) -> dict[str, dict[str, object]]:
    """Greedy continuations of FIXED_PROMPTS under the default pool (recorded for the tests)."""
    loaded = load_for_generation(checkpoint)
    pool = loaded.config.default_pool_size()
    out: dict[str, dict[str, object]] = {}
    for name, prompt in FIXED_PROMPTS.items():
        c = greedy(loaded, prompt, max_new_tokens, pool)
        out[name] = {
            "pool_size": pool,
            "prompt_ids": c.prompt_ids,
            "token_ids": c.token_ids,
            "text": c.text,
            "pools": c.pools,
        }
    return out

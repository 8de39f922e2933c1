"""`emo-serve demo ...`: build the corpus, train the tokenizer and models, evaluate the demo EMO."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from server.demo_model import demo_model_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="demo_command", required=True, metavar="STEP")

    corpus = sub.add_parser("build-corpus", help="gather documents of seven domains from Debian + Python")
    corpus.add_argument("out", type=Path, help="output directory (train/heldout jsonl, manifest.tsv)")
    corpus.add_argument("--root", type=Path, default=Path("/"), help="filesystem root to read (default /)")
    corpus.add_argument("--max-domain-chars", type=int, default=2_500_000)

    tok = sub.add_parser("train-tokenizer", help="byte-level BPE on the corpus' training split")
    tok.add_argument("--corpus", type=Path, required=True)
    tok.add_argument("--out", type=Path, required=True)
    tok.add_argument("--vocab-size", type=int, default=8192)

    train = sub.add_parser("train", help="train the demo EMO (or, with --baseline, the standard-MoE control)")
    train.add_argument("--corpus", type=Path, required=True)
    train.add_argument("--tokenizer", type=Path, required=True, help="directory of tokenizer.json")
    train.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    train.add_argument("--baseline", action="store_true", help="no document pools (the control)")
    train.add_argument("--preset", choices=("demo", "smoke"), default="demo")
    train.add_argument("--steps", type=int, default=2000)
    train.add_argument("--batch-size", type=int, default=8)
    train.add_argument("--seq-len", type=int, default=256)
    train.add_argument("--lr", type=float, default=3e-3)
    train.add_argument("--warmup-steps", type=int, default=100)
    train.add_argument("--lb-weight", type=float, default=0.1)
    train.add_argument("--pool-min", type=int, default=4)
    train.add_argument("--pool-max", type=int, default=32)
    train.add_argument("--time-budget-min", type=float, default=None, help="stop (and decay) by wall time")
    train.add_argument("--device", default="cpu")
    train.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    train.add_argument("--seed", type=int, default=0)

    ev = sub.add_parser("evaluate", help="held-out losses: full / pool / random pool, EMO vs baseline")
    ev.add_argument("--emo", type=Path, default=None, help="EMO checkpoint (default: the shipped one)")
    ev.add_argument("--baseline", type=Path, required=True, help="standard-MoE control checkpoint")
    ev.add_argument("--corpus", type=Path, required=True)
    ev.add_argument("--out", type=Path, required=True, help="directory for the table, json and heatmap")
    ev.add_argument("--max-len", type=int, default=256)

    named = sub.add_parser("named-pools", help="held-out losses with each document's own pool, a named "
                           "pool from ONE other document of its domain, and other domains' pools")
    named.add_argument("--model", type=Path, default=None, help="EMO checkpoint (default: the shipped one)")
    named.add_argument("--corpus", type=Path, required=True)
    named.add_argument("--out", type=Path, default=None, help="directory for named_pools.md and .json")
    named.add_argument("--max-len", type=int, default=256)
    named.add_argument("--threads", type=int, default=1, help="torch CPU threads")

    sample = sub.add_parser("sample", help="one greedy completion per domain with its expert pool")
    sample.add_argument("--model", type=Path, default=None, help="checkpoint (default: the shipped one)")
    sample.add_argument("--corpus", type=Path, required=True)
    sample.add_argument("--max-new-tokens", type=int, default=40)


def run(args: argparse.Namespace) -> int:
    if args.demo_command == "build-corpus":
        return _build_corpus(args)
    if args.demo_command == "train-tokenizer":
        return _train_tokenizer(args)
    if args.demo_command == "train":
        return _train(args)
    if args.demo_command == "sample":
        return _sample(args)
    if args.demo_command == "named-pools":
        return _named_pools(args)
    return _evaluate(args)


def _checkpoint(given: Path | None, flag: str) -> Path | None:
    """``given``, else the shipped demo checkpoint; None, having said why on stderr, when neither."""
    found = given or demo_model_dir()
    if found is None:
        print(f"error: no {flag} given and no demo checkpoint is shipped in this install", file=sys.stderr)
    return found


def _build_corpus(args: argparse.Namespace) -> int:
    from server.tools.demo.corpus import Roots, build_corpus
    from server.tools.demo.corpus.document import Limits

    stats = build_corpus(args.out, Roots(root=args.root), Limits(max_domain_chars=args.max_domain_chars))
    print(stats.as_markdown())
    return 0


def _train_tokenizer(args: argparse.Namespace) -> int:
    from server.tools.demo.corpus import load_documents
    from server.tools.demo.tokenizer_train import save_tokenizer, train_tokenizer

    documents = load_documents(args.corpus, "train")
    tokenizer = train_tokenizer((d.text for d in documents), args.vocab_size)
    save_tokenizer(tokenizer, args.out, model_max_length=1024)
    print(f"tokenizer: {tokenizer.get_vocab_size()} tokens -> {args.out}")
    return 0


def _train(args: argparse.Namespace) -> int:
    import torch

    from server.tools.demo.train.loop import TrainConfig
    from server.tools.demo.train.run import run_training

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        warmup_steps=min(args.warmup_steps, args.steps - 1),
        lb_weight=args.lb_weight,
        use_pools=not args.baseline,
        pool_min=args.pool_min,
        pool_max=args.pool_max,
        seed=args.seed,
        time_budget_s=None if args.time_budget_min is None else args.time_budget_min * 60,
        device=args.device,
    )

    def log(entry: dict[str, float]) -> None:
        print(json.dumps({k: round(v, 4) for k, v in entry.items()}), flush=True)

    result = run_training(args.corpus, args.tokenizer, args.out, args.preset, cfg, log)
    print(
        f"trained {result.steps} steps, {result.tokens_seen} tokens in {result.seconds:.0f} s -> {args.out}"
    )
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from server.tools.demo.evaluate import EvalConfig
    from server.tools.demo.report import run_evaluation

    emo = _checkpoint(args.emo, "--emo")
    if emo is None:
        return 2
    evaluation = run_evaluation(emo, args.baseline, args.corpus, args.out, EvalConfig(max_len=args.max_len))
    print(evaluation.markdown())
    print(f"\nheatmap: {args.out / 'pool_heatmap.png'}")
    return 0


def _sample(args: argparse.Namespace) -> int:
    from server.tools.demo.samples import domain_samples, samples_markdown

    model = _checkpoint(args.model, "--model")
    if model is None:
        return 2
    print(samples_markdown(domain_samples(model, args.corpus, max_new_tokens=args.max_new_tokens)))
    return 0


def _named_pools(args: argparse.Namespace) -> int:
    import torch

    from server.tools.demo.evaluate import EvalConfig
    from server.tools.demo.named_pool_eval import run_named_pool_evaluation

    model = _checkpoint(args.model, "--model")
    if model is None:
        return 2
    torch.set_num_threads(args.threads)

    def progress(done: int, total: int) -> None:
        if done % 20 == 0 or done == total:
            print(f"{done}/{total} documents", file=sys.stderr, flush=True)

    print(run_named_pool_evaluation(model, args.corpus, args.out, EvalConfig(max_len=args.max_len), progress))
    return 0

"""The `emo-serve bench` suites, one per subcommand (server/cli/bench.py wires them in).

    emo-serve bench cache --model DIR [--experts 512] [--device cuda|cpu]
    emo-serve bench prefetch --model DIR [--pool-size N] [--device auto] [--dtype auto]
    emo-serve bench arrivals [--model DIR] [--streams 4] [--arrivals 3] [--disk-gbps G]

To add a suite, write ``_add_<name>(parser)`` and ``_run_<name>(args) -> int`` (import heavy
modules inside ``_run_``) and register them in ``SUITES``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Suite:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _add_cache(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        type=Path,
        required=True,
        metavar="DIR",
        help="checkpoint directory (e.g. from `emo-serve synth --preset emo-1b14b`)",
    )
    parser.add_argument("--experts", type=int, default=512, help="experts to page (default 512)")
    parser.add_argument(
        "--device",
        default=None,
        help="cuda, cuda:N or cpu (a CPU slab: smoke run); default cuda when available",
    )
    parser.add_argument(
        "--device-slots",
        type=int,
        default=64,
        help="device slots to page through (default 64; capped at experts/2)",
    )
    parser.add_argument(
        "--no-drop-cache", action="store_true", help="do not drop the files' page cache before disk passes"
    )
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write results as JSON")


def _run_cache(args: argparse.Namespace) -> int:
    from expert_cache.errors import CheckpointError
    from server.tools.bench.paging import CacheBenchConfig, run_cache_bench

    try:
        cfg = CacheBenchConfig(
            model_dir=args.model,
            experts=args.experts,
            device=args.device or _default_device(),
            device_slots=args.device_slots,
            drop_page_cache=not args.no_drop_cache,
        )
        result = run_cache_bench(cfg, log=lambda msg: print(f"  {msg}", file=sys.stderr, flush=True))
    except (ValueError, CheckpointError, OSError) as e:
        print(f"emo-serve bench cache: error: {e}", file=sys.stderr)
        return 2
    print(result.table())
    if args.json is not None:
        rows = [asdict(r) | {"gb_per_s": r.gb_per_s} for r in result.rows]
        args.json.write_text(
            json.dumps({"header": result.header, "rows": rows, "notes": result.notes}, indent=2)
        )
    return 0


def _add_decode(parser: argparse.ArgumentParser) -> None:
    from server.tools.bench.decode_cli import add_arguments as add_decode_arguments

    add_decode_arguments(parser)


def _run_decode(args: argparse.Namespace) -> int:
    from server.tools.bench.decode_cli import run as run_decode

    return run_decode(args)


def _add_prefetch(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, metavar="DIR",
                        help="a checkpoint with planted domains (from `emo-serve synth`)")
    parser.add_argument("--pool-size", type=int, default=None, help="default: the model's default pool")
    parser.add_argument("--prompts-per-domain", type=int, default=4)
    from server.tools.bench.placement import add_placement_arguments

    add_placement_arguments(parser)


def _run_prefetch(args: argparse.Namespace) -> int:
    from expert_cache.errors import CheckpointError
    from server.tools.bench.placement import placement
    from server.tools.bench.prefetch_recall import measure_prefetch_recall

    try:
        device, dtype = placement(args)
        result = measure_prefetch_recall(args.model, pool_size=args.pool_size, device=device, dtype=dtype,
                                         prompts_per_domain=args.prompts_per_domain)
    except (ValueError, CheckpointError, OSError) as e:  # ConfigError is a ValueError
        print(f"emo-serve bench prefetch: error: {e}", file=sys.stderr)
        return 2
    print(result.table())
    return 0


def _add_gpu_check(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("gpu-check"), metavar="DIR",
                        help="where the synthetic checkpoint and gpu_check.json go (default ./gpu-check)")
    parser.add_argument("--model", type=Path, default=None, metavar="DIR",
                        help="an Emo_1b14b-shaped checkpoint to use instead of writing a 4-layer one")
    parser.add_argument("--device", default="cuda", help="cuda or cuda:N (default cuda)")


def _run_gpu_check(args: argparse.Namespace) -> int:
    from server.tools.bench.gpu_check import GpuUnavailable, run_gpu_check

    try:
        result, path = run_gpu_check(args.out, args.model, args.device,
                                     log=lambda m: print(f"  {m}", file=sys.stderr, flush=True))
    except GpuUnavailable as e:
        print(f"emo-serve bench gpu-check: {e}", file=sys.stderr)
        return 2
    print(result.markdown())
    print(f"wrote {path}")
    return 0


def _add_arrivals(parser: argparse.ArgumentParser) -> None:
    from server.tools.bench.cold_arrivals import add_arguments as add_arrivals_arguments

    add_arrivals_arguments(parser)


def _run_arrivals(args: argparse.Namespace) -> int:
    from server.tools.bench.cold_arrivals import run as run_arrivals

    return run_arrivals(args)


SUITES: dict[str, Suite] = {
    "cache": Suite(
        "Page experts from the host tier and from disk; compare with the machine's "
        "own host->device and file-read bandwidth",
        _add_cache,
        _run_cache,
    ),
    "decode": Suite(
        "Decode tokens/s, TTFT, paging and memory of expert pools and per-token offloading "
        "against full residency, through the Engine (JSON, Markdown and PNG reports)",
        _add_decode,
        _run_decode,
    ),
    "gpu-check": Suite(
        "The first run on a GPU (<= 8 min, no network): a 4-layer Emo_1b14b-shaped checkpoint, bf16 "
        "CUDA vs fp32 CPU logits, CUDA-graph capture, batch-1/16 tokens/s, kernels and syncs per "
        "token, paging vs pinned bandwidth, peak memory vs budget",
        _add_gpu_check,
        _run_gpu_check,
    ),
    "arrivals": Suite(
        "Cold arrivals: inter-token gaps of running streams while requests of new domains page "
        "their pools in, against no arrivals, async paging against blocking",
        _add_arrivals,
        _run_arrivals,
    ),
    "prefetch": Suite(
        "Recall of the prefill prefetch: layer l+1's predicted pool against the pool it selects",
        _add_prefetch,
        _run_prefetch,
    ),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="suite", required=True, metavar="SUITE")
    for name, suite in SUITES.items():
        suite.add_arguments(sub.add_parser(name, help=suite.help, description=suite.help))


def run(args: argparse.Namespace) -> int:
    return SUITES[args.suite].run(args)

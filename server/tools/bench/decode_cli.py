"""Flags of `emo-serve bench decode` (registered in server/cli/bench.py's SUITES).

    emo-serve bench decode [--model DIR | --preset emo-1b14b] [--device cuda] [--out DIR]
        [--tiers 0.25,0.5,1] [--pools 32,16] [--no-full] [--prompt-tokens 512]
        [--decode-tokens 64] [--concurrency 16] [--reference-modeling modeling_emo.py]

Defaults follow the device: on CUDA a synthetic emo-1b14b checkpoint, bf16, 512-token prompts,
64 decoded tokens; on CPU the tiny preset, fp32, 64-token prompts, 32 decoded tokens.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from server.model.dtypes import short_name
from server.tools.bench.config import CPU_PRESET, GPU_PRESET
from server.tools.bench.placement import add_placement_arguments, placement


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions, got {text!r}") from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None, metavar="DIR",
                        help="checkpoint directory (default: a synthetic one written under --out)")
    parser.add_argument("--preset", default=None,
                        help=f"synthetic preset when no --model (default {GPU_PRESET} on CUDA, "
                             f"{CPU_PRESET} on CPU)")
    parser.add_argument("--synth-layers", type=int, default=None, metavar="N",
                        help="synthetic checkpoint with N layers of the preset's shape (emo-1b14b: 16 "
                             "layers, 28 GB, several minutes to write)")
    parser.add_argument("--out", type=Path, default=Path("bench-decode"), metavar="DIR",
                        help="where the JSON, Markdown and PNG files go (default ./bench-decode)")
    parser.add_argument("--tiers", type=_floats, default=(0.25, 0.5, 1.0),
                        help="device-tier sizes as shares of the routable experts; 1 = full-resident "
                             "(default 0.25,0.5,1)")
    parser.add_argument("--pools", type=_ints, default=None,
                        help="pool sizes (default: the model's default pool and half of it)")
    parser.add_argument("--no-full", action="store_true", help="skip per-token ('full') routing")
    parser.add_argument("--prompt-tokens", type=int, default=None, help="TTFT / request prompt length")
    parser.add_argument("--decode-tokens", type=int, default=None, help="tokens decoded per request")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent requests (default 16)")
    parser.add_argument("--domains", type=int, default=4, help="planted domains they cycle over (default 4)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="batch-1 decode and warm TTFT: best of this many runs (default 3)")
    parser.add_argument("--reference-modeling", type=Path, default=None, metavar="PATH",
                        help="the Hugging Face modeling file of the model (e.g. modeling_emo.py) to time "
                             "as the reference (needs transformers)")
    parser.add_argument("--pinned-gbps", type=float, default=53.9,
                        help="pinned host->device GB/s the cold-TTFT target is judged by "
                             "(default 53.9, the H100 figure of docs/emo.md)")
    parser.add_argument("--no-parity", action="store_true", help="skip the bf16 vs fp32 logits check")
    parser.add_argument("--no-fullgraph", action="store_true",
                        help="skip compiling the decode step with fullgraph=True "
                             "(decode_step.fullgraph null)")
    add_placement_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from expert_cache.errors import CheckpointError
    from server.tools.bench.config import DecodeBenchConfig
    from server.tools.bench.run import run_decode_bench

    try:
        device, dtype = placement(args)
        gpu = device.type == "cuda"
        cfg = DecodeBenchConfig(
            out_dir=args.out, device=str(device), dtype=short_name(dtype),
            model_dir=args.model, preset=args.preset or (GPU_PRESET if gpu else CPU_PRESET),
            synth_layers=args.synth_layers,
            tiers=args.tiers, pools=args.pools, full_routing=not args.no_full,
            prompt_tokens=args.prompt_tokens or (512 if gpu else 64),
            decode_tokens=args.decode_tokens or (64 if gpu else 32),
            concurrency=args.concurrency, domains=args.domains, repeats=args.repeats,
            reference_modeling=args.reference_modeling, parity=not args.no_parity,
            pinned_gb_s=args.pinned_gbps, fullgraph=not args.no_fullgraph,
        )
        _, text, files = run_decode_bench(cfg, log=lambda m: print(f"  {m}", file=sys.stderr, flush=True))
    except (ValueError, CheckpointError, OSError) as e:
        print(f"emo-serve bench decode: error: {e}", file=sys.stderr)
        return 2
    print(text)
    print("wrote " + ", ".join(str(f) for f in files))
    return 0

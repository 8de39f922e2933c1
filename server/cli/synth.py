"""`emo-serve synth OUT`: write a synthetic EMO-format checkpoint with planted domains."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from expert_cache.memory import parse_bytes
from server.model.dtypes import COMPUTE_DTYPES
from server.tools.synth.spec import DEFAULT_DOMAINS, PRESETS, make_spec
from server.tools.synth.vocab import DOMAINS
from server.tools.synth.writer import write_spec


def parse_size(text: str) -> int:
    """A positive byte size in any unit ``parse_bytes`` reads: '2GiB', '500MB', '1048576'."""
    try:
        value = parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be > 0, got {text!r}")
    return value


def _override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (VALUE in JSON), got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"--set {key}: value is not JSON ({e})") from e


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path, metavar="OUT", help="new or empty directory to write into")
    parser.add_argument("--preset", choices=list(PRESETS), default="tiny",
                        help="model shape (emo-1b14b: the released EMO shape, ~26 GB in bf16)")
    parser.add_argument("--seed", type=int, default=0, help="weights are a function of the seed")
    parser.add_argument("--domains", type=int, default=None, metavar="D",
                        help=f"number of planted domains, 1..{len(DOMAINS)} (taken in order from "
                        f"{', '.join(DOMAINS)}); default per preset {DEFAULT_DOMAINS}")
    parser.add_argument("--dtype", choices=list(COMPUTE_DTYPES), default="bf16")
    parser.add_argument("--shard-size", type=parse_size, default=2 * 1024**3, metavar="SIZE",
                        help="largest safetensors shard, e.g. 2GiB (default), 500MB")
    parser.add_argument("--set", type=_override, action="append", default=[], metavar="KEY=JSON",
                        dest="overrides", help="override a config field, e.g. --set num_hidden_layers=2")


def run(args: argparse.Namespace) -> int:
    try:
        spec = make_spec(args.preset, seed=args.seed, domains=args.domains, dtype=args.dtype,
                         overrides=dict(args.overrides))
    except ValueError as e:
        print(f"emo-serve synth: error: {e}", file=sys.stderr)
        return 2
    start = time.monotonic()
    reported = [0.0]

    def progress(done: int, total: int) -> None:
        if total >= 256 * 2**20 and (done == total or time.monotonic() - reported[0] >= 5):
            reported[0] = time.monotonic()
            print(f"  {done / 2**30:.2f} / {total / 2**30:.2f} GiB", file=sys.stderr, flush=True)

    try:
        out = write_spec(args.out, spec, shard_bytes=args.shard_size, progress=progress)
    except (OSError, ValueError) as e:
        print(f"emo-serve synth: error: {e}", file=sys.stderr)
        return 1
    shards = sorted(out.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in shards)
    params = sum(math.prod(t.shape) for t in spec.tensors())
    print(f"wrote {out}: preset {args.preset}, {params / 1e6:.1f}M parameters, {args.dtype}, "
          f"{size / 2**20:.1f} MiB in {len(shards)} shard(s), {time.monotonic() - start:.1f}s")
    print(f"domains: {', '.join(spec.domains)} ({len(spec.planted(spec.moe_layers[0])[0])} planted "
          f"experts each)" if spec.moe_layers else f"domains: {', '.join(spec.domains)}")
    return 0

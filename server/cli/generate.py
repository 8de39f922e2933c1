"""`emo-serve generate`: load a model, generate for one prompt, stream the text to stdout.

Opens the engine exactly as `serve` does (server/runtime: the same flags and EMO_SERVE_*
variables, memory plan and expert store), with one sequence. Outputs travel back through a
queue so the printing happens on the main thread. Statistics and the pool (--show-pool) go to
stderr. Sampling parameters left out take the checkpoint's defaults, as the API's do.
"""

from __future__ import annotations

import argparse
import os
import queue
import sys
import time
from typing import TYPE_CHECKING

from server.logs import configure as configure_logging
from server.runtime.settings import add_arguments as add_settings_arguments

if TYPE_CHECKING:
    from server.engine.request import RequestOutput


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", required=True, help="prompt text")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens to generate (default 64)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="0 = greedy (default: the checkpoint's generation_config, else 1.0)")
    parser.add_argument("--top-p", type=float, default=None,
                        help="nucleus sampling mass (default: the checkpoint's, else 1.0)")
    parser.add_argument("--top-k", type=int, default=None, help="top-k sampling, 0 = off (default: the "
                        "checkpoint's, else off)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed")
    parser.add_argument("--show-pool", action="store_true", help="print the request's expert pool to stderr")
    add_settings_arguments(parser, "generate")


def run(args: argparse.Namespace) -> int:
    import torch

    from expert_cache.errors import CheckpointError
    from server.cli.default_model import with_default_model
    from server.engine.request import GenerationRequest, QueueFull, RequestError, SamplingParams
    from server.runtime import ConfigError, PlanError, load_settings, open_engine

    try:
        # one prompt: one sequence, nothing queued behind it
        settings = with_default_model(load_settings(args, os.environ, "generate", max_num_seqs=1,
                                                    max_queue=1))
    except ConfigError as e:
        print(f"emo-serve generate: {e}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    try:
        runtime = open_engine(settings)
    except PlanError as e:
        print(f"emo-serve generate: refusing to start: {e}", file=sys.stderr)
        return 1
    except (ValueError, CheckpointError, OSError) as e:
        print(f"emo-serve generate: {e}", file=sys.stderr)  # str(e) keeps the file and tensor named
        return 2
    engine = runtime.engine
    with runtime:
        try:
            prompt_ids = engine.tokenizer.encode(args.prompt)
            defaults = engine.sampling_defaults
            sampling = SamplingParams(
                max_tokens=args.max_tokens,
                temperature=defaults.temperature if args.temperature is None else args.temperature,
                top_p=defaults.top_p if args.top_p is None else args.top_p,
                top_k=defaults.top_k if args.top_k is None else args.top_k,
                min_p=defaults.min_p, repetition_penalty=defaults.repetition_penalty, seed=args.seed)
            request = GenerationRequest("generate-0", prompt_ids, sampling, return_expert_pool=True)
            outputs: queue.Queue[RequestOutput] = queue.Queue()
            start = time.monotonic()
            engine.submit(request, outputs.put)
        except (ValueError, RequestError, QueueFull) as e:
            print(f"emo-serve generate: {e}", file=sys.stderr)
            return 2
        try:
            last = _stream(outputs)
        except KeyboardInterrupt:
            engine.cancel(request.request_id)
            runtime.close(grace_s=1.0)
            print("\n[interrupted]", file=sys.stderr)
            return 130
        runtime.close(grace_s=1.0)
    _report(last, time.monotonic() - start, args.show_pool, runtime.device, torch.cuda.is_available())
    return 0 if last.finish_reason in ("stop", "length") else 1


def _stream(outputs: queue.Queue[RequestOutput]) -> RequestOutput:
    while True:
        out = outputs.get()
        if out.new_text:
            sys.stdout.write(out.new_text)
            sys.stdout.flush()
        if out.finished:
            sys.stdout.write("\n")
            sys.stdout.flush()
            return out


def _report(last: RequestOutput, elapsed: float, show_pool: bool, device: object, cuda: bool) -> None:
    if last.finish_reason == "error":
        print(f"emo-serve generate: error: {last.error}", file=sys.stderr)
    usage = last.usage
    if usage is not None:
        decode_s = (last.finished_time or 0.0) - (last.first_token_time or 0.0)
        steps = usage.completion_tokens - 1
        rate = steps / decode_s if decode_s > 0 and steps > 0 else 0.0
        ttft = (last.first_token_time or last.arrival_time) - last.arrival_time
        print(f"[{usage.prompt_tokens} prompt + {usage.completion_tokens} generated tokens, "
              f"finish={last.finish_reason}, {elapsed:.2f} s, time to first token {ttft * 1000:.0f} ms, "
              f"{rate:.1f} tokens/s decoding on {device}; experts: {usage.expert_hits} hits, "
              f"{usage.expert_misses} misses, {usage.expert_bytes_loaded} bytes loaded]", file=sys.stderr)
    if show_pool and last.expert_pool is not None:
        pool = last.expert_pool
        print(f"[expert pool: {pool['size']} per layer]", file=sys.stderr)
        for layer, ids in enumerate(pool["experts"]):
            print(f"  layer {layer}: {ids}", file=sys.stderr)

"""`emo-serve generate`: load a model, generate for one prompt, stream the text to stdout.

Runs the real engine (its thread owns the device); outputs travel back through a queue so the
printing happens on the main thread. Statistics and the pool (--show-pool) go to stderr.
"""

from __future__ import annotations

import argparse
import queue
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.engine.request import RequestOutput


def _pool_arg(value: str) -> int | str:
    if value == "full":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--pool-size: expected an integer or 'full', got {value!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="DIR", default=None,
                        help="checkpoint directory (default: the built-in demo model)")
    parser.add_argument("--prompt", required=True, help="prompt text")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens to generate (default 64)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="0 = greedy (default: the checkpoint's generation_config, else 1.0)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default 1.0)")
    parser.add_argument("--top-k", type=int, default=0, help="top-k sampling, 0 = off")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed")
    parser.add_argument("--pool-size", type=_pool_arg, default=None, metavar="N|full",
                        help="experts per MoE layer for this request, or 'full' per-token routing "
                             "(default: the model's; EMO: a quarter of the routable experts)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    parser.add_argument("--dtype", default="auto",
                        help="auto | bf16 | fp16 | fp32 (auto: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--expert-cache", default=None, metavar="BYTES",
                        help="device budget for experts (e.g. 6GiB): page experts through the tiered "
                             "cache; without it every expert is resident")
    parser.add_argument("--host-cache", default=None, metavar="BYTES",
                        help="host RAM budget of the tiered cache (default: available RAM minus a margin)")
    parser.add_argument("--show-pool", action="store_true", help="print the request's expert pool to stderr")


def run(args: argparse.Namespace) -> int:
    import torch

    from expert_cache import TieredExpertCache, default_host_budget_bytes, parse_bytes
    from expert_cache.errors import CheckpointError
    from server.engine.config import EngineConfig, resolve_device, resolve_dtype
    from server.engine.engine import Engine
    from server.engine.request import GenerationRequest, QueueFull, RequestError, SamplingParams
    from server.model.loader import load_model

    try:
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
        factory = None
        if args.expert_cache is not None:
            device_budget = parse_bytes(args.expert_cache, what="--expert-cache")
            host_budget = (default_host_budget_bytes() if args.host_cache is None
                           else parse_bytes(args.host_cache, what="--host-cache"))

            def factory(catalog):  # type: ignore[no-untyped-def]
                return TieredExpertCache(catalog, device=device, device_budget_bytes=device_budget,
                                         host_budget_bytes=host_budget)
        elif args.host_cache is not None:
            raise ValueError("--host-cache needs --expert-cache (without it every expert is resident)")
        if args.model is None:
            from server.cli.default_model import default_model_dir

            model_dir = default_model_dir()
        else:
            model_dir = args.model
        loaded = load_model(model_dir, device=device, dtype=dtype, expert_store_factory=factory)
        prompt_ids = loaded.tokenizer.encode(args.prompt)
        defaults = loaded.generation_defaults
        temperature = args.temperature if args.temperature is not None else float(
            defaults.get("temperature", 1.0) if defaults.get("do_sample", True) else 0.0)
        top_p = args.top_p if args.top_p is not None else float(defaults.get("top_p", 1.0))
        sampling = SamplingParams(max_tokens=args.max_tokens, temperature=temperature, top_p=top_p,
                                  top_k=args.top_k, seed=args.seed)
        max_len = min(loaded.config.max_position_embeddings, max(2, len(prompt_ids) + args.max_tokens))
        engine = Engine(loaded, EngineConfig(max_num_seqs=1, max_model_len=max_len, max_queue=1,
                                             default_pool=args.pool_size))
        request = GenerationRequest("generate-0", prompt_ids, sampling, expert_pool=args.pool_size,
                                    return_expert_pool=True)
        outputs: queue.Queue[RequestOutput] = queue.Queue()
        engine.start()
        start = time.monotonic()
        engine.submit(request, outputs.put)
    except (ValueError, CheckpointError, RequestError, QueueFull, OSError) as e:
        print(f"emo-serve generate: {e}", file=sys.stderr)  # str(e) keeps the file and tensor named
        return 2
    try:
        last = _stream(outputs)
    except KeyboardInterrupt:
        engine.cancel(request.request_id)
        engine.shutdown(grace_s=1.0)
        print("\n[interrupted]", file=sys.stderr)
        return 130
    engine.shutdown(grace_s=1.0)
    _report(last, time.monotonic() - start, args.show_pool, device, torch.cuda.is_available())
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

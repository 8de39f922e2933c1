"""`emo-serve bench arrivals`: do cold requests stall the streams that are running?

Streams (pool requests of the first domains) decode; in a second phase, requests of domains no
request has used yet arrive one after another while the streams decode. Their pools are cold:
with no host tier (the default) every expert is read from the checkpoint files. Reported: the
gaps between consecutive tokens of the running streams (p50 / p99 / max) without arrivals and
while the arrivals are being served, and the cold requests' TTFT with the bytes they paged.

Each mode runs on a fresh engine and expert cache (everything cold): ``async`` is the engine's
paging (pieces of prefill between decode steps, pools read by loader threads), ``blocking`` the
engine with ``async_paging=False`` (a whole prefill per step, its pool read on the engine
thread), the behaviour the async paging replaced.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from expert_cache.base import ExpertKey, ExpertStore
from server.engine.config import EngineConfig
from server.engine.request import GenerationRequest
from server.model.dtypes import DTYPE_NAMES, short_name
from server.runtime import Settings, open_engine
from server.tools.bench.placement import add_placement_arguments, placement
from server.tools.bench.tiers import experts_per_layer, header_catalog, tier_budget, whole_host_budget
from server.tools.bench.workload import Recorder, Track, domain_prompt, greedy
from server.tools.synth import DOMAINS
from server.tools.synth.spec import SYNTH_KEY

WAIT_S = 1800.0


@dataclass(frozen=True)
class ArrivalsConfig:
    model_dir: Path
    device: str
    dtype: str
    streams: int = 4
    stream_tokens: int = 160
    arrivals: int = 3
    arrival_every: int = 12  # stream tokens between two arrivals
    prompt_tokens: int = 64
    tier: float = 1.0  # share of the routable experts the device tier holds
    host_tier: bool = False
    disk_gb_s: float | None = None  # emulate a disk of this bandwidth (sleep per expert read)
    prefill_chunk_tokens: int = 2048
    modes: tuple[str, ...] = ("async", "blocking")

    def __post_init__(self) -> None:
        for name, low in (("streams", 1), ("stream_tokens", 16), ("arrivals", 1), ("arrival_every", 1),
                          ("prompt_tokens", 2), ("prefill_chunk_tokens", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not 0.0 < self.tier <= 1.0:
            raise ValueError(f"tier must be in (0, 1], got {self.tier!r}")
        if self.disk_gb_s is not None and not self.disk_gb_s > 0:
            raise ValueError(f"disk_gb_s must be > 0, got {self.disk_gb_s!r}")
        if not self.modes or any(m not in ("async", "blocking") for m in self.modes):
            raise ValueError(f"modes must be async and/or blocking, got {self.modes!r}")


@dataclass
class Gaps:
    count: int = 0
    p50_ms: float = math.nan
    p99_ms: float = math.nan
    max_ms: float = math.nan


@dataclass
class ModeResult:
    mode: str
    quiet: Gaps = field(default_factory=Gaps)  # running streams, no arrivals
    arrivals: Gaps = field(default_factory=Gaps)  # running streams while cold requests are served
    cold_ttft_s: list[float] = field(default_factory=list)
    paged_bytes: int = 0  # paged by anyone (loads and prefetches) while the arrivals were served

    @property
    def p99_ratio(self) -> float:
        return self.arrivals.p99_ms / self.quiet.p99_ms if self.quiet.p99_ms > 0 else math.nan


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _gaps(tracks: list[Track], start: float, end: float) -> Gaps:
    """Gaps between consecutive tokens of ``tracks`` whose later token lies in [start, end]."""
    gaps = [b - a for t in tracks for a, b in zip(t.token_times, t.token_times[1:], strict=False)
            if start <= b <= end]
    if not gaps:
        return Gaps()
    return Gaps(len(gaps), 1e3 * _percentile(gaps, 0.5), 1e3 * _percentile(gaps, 0.99), 1e3 * max(gaps))


def _paged(store: ExpertStore) -> int:
    stats = store.stats()
    return stats.bytes_loaded_from_host + stats.bytes_loaded_from_disk


def _domains(model_dir: Path) -> int:
    """Planted domains of a synthetic checkpoint (the prompt vocabulary's, for other models)."""
    config = json.loads((model_dir / "config.json").read_text())
    planted = config.get(SYNTH_KEY, {}).get("domains")
    return len(planted) if planted else len(DOMAINS)


def run_mode(cfg: ArrivalsConfig, mode: str, log: Callable[[str], None]) -> ModeResult:
    dtype = DTYPE_NAMES[cfg.dtype]
    catalog = header_catalog(cfg.model_dir, dtype)
    pinned = torch.device(cfg.device).type == "cuda"
    hook = None
    if cfg.disk_gb_s is not None:
        seconds = catalog.expert_bytes(min(experts_per_layer(catalog))) / (cfg.disk_gb_s * 1e9)

        def hook(key: ExpertKey) -> None:
            time.sleep(seconds)

    n = cfg.streams + cfg.arrivals
    engine_config = EngineConfig(max_num_seqs=n, max_model_len=cfg.prompt_tokens + cfg.stream_tokens + 8,
                                 prefill_chunk_tokens=cfg.prefill_chunk_tokens, async_paging=mode == "async")
    settings = Settings(model=cfg.model_dir, device=cfg.device, dtype=cfg.dtype, engine=engine_config,
                        expert_cache=tier_budget(catalog, cfg.tier)[1],
                        host_cache=whole_host_budget(catalog, pinned) if cfg.host_tier else 0)
    runtime = open_engine(settings, before_disk_read=hook)
    engine, store = runtime.engine, runtime.store
    tok, rec, result = engine.tokenizer, Recorder(), ModeResult(mode)
    domains = _domains(cfg.model_dir)
    stream_domains = max(1, domains - cfg.arrivals)

    def submit(rid: str, domain: int, seed: int, tokens: int) -> str:
        req = GenerationRequest(rid, domain_prompt(tok, domain, cfg.prompt_tokens, seed), greedy(tokens))
        rec.submitted(req)
        engine.submit(req, rec)
        return rid

    def wait_tokens(rid: str, count: int) -> float:
        deadline = time.monotonic() + WAIT_S
        while len(rec.tracks[rid].token_times) < count:
            if rec.tracks[rid].output is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{rid} ended before {count} tokens")
            time.sleep(0.005)
        return rec.tracks[rid].token_times[count - 1]

    try:
        for phase in ("quiet", "arrivals"):
            extra = f", {cfg.arrivals} cold arrivals" if phase == "arrivals" else ""
            log(f"{mode}: {cfg.streams} streams{extra}")
            ids = [submit(f"{phase}-s{i}", i % stream_domains, 100 * i + len(phase), cfg.stream_tokens)
                   for i in range(cfg.streams)]
            start = max(wait_tokens(rid, 2) for rid in ids)  # every stream decoding
            cold: list[str] = []
            if phase == "arrivals":
                paged_before = _paged(store)
                for j in range(cfg.arrivals):
                    wait_tokens(ids[0], 2 + (j + 1) * cfg.arrival_every)
                    cold.append(submit(f"cold{j}", stream_domains + j % max(1, domains - stream_domains),
                                       7000 + j, 4))
                cold_tracks = rec.wait(cold, WAIT_S)
                end = max(t.token_times[0] for t in cold_tracks)
                result.cold_ttft_s = [t.token_times[0] - t.submitted for t in cold_tracks]
                result.paged_bytes = _paged(store) - paged_before
                start = min(t.submitted for t in cold_tracks)
            tracks = rec.wait(ids, WAIT_S)
            if phase == "quiet":
                end = min(t.token_times[-1] for t in tracks)
                result.quiet = _gaps(tracks, start, end)
            else:
                result.arrivals = _gaps(tracks, start, end)
    finally:
        runtime.close()
    return result


def table(cfg: ArrivalsConfig, results: list[ModeResult]) -> str:
    lines = [
        f"cold arrivals: {cfg.streams} streams x {cfg.stream_tokens} tokens, {cfg.arrivals} cold requests "
        f"(new domains, one per {cfg.arrival_every} stream tokens), {cfg.prompt_tokens}-token prompts, "
        f"device {cfg.device} {cfg.dtype} ({torch.get_num_threads()} CPU threads), prefill pieces of "
        f"{cfg.prefill_chunk_tokens} rows, tier {cfg.tier:.0%}, host tier {'on' if cfg.host_tier else 'off'}"
        + ("" if cfg.disk_gb_s is None else f", disk emulated at {cfg.disk_gb_s} GB/s"),
        "",
        "| mode | gaps quiet p50 / p99 / max ms | gaps with arrivals p50 / p99 / max ms | p99 ratio | "
        "cold TTFT s (each) | MB paged meanwhile |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        q, a = r.quiet, r.arrivals
        lines.append(
            f"| {r.mode} | {q.p50_ms:.1f} / {q.p99_ms:.1f} / {q.max_ms:.1f} (n={q.count}) | "
            f"{a.p50_ms:.1f} / {a.p99_ms:.1f} / {a.max_ms:.1f} (n={a.count}) | {r.p99_ratio:.2f} | "
            f"{', '.join(f'{t:.3f}' for t in r.cold_ttft_s)} | {r.paged_bytes / 1e6:.1f} |")
    lines.append("")
    lines.append("target: p99 gap with arrivals <= 1.5x without (async mode)")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None, metavar="DIR",
                        help="checkpoint directory (default: a synthetic one written under --out)")
    parser.add_argument("--preset", default=None,
                        help="synthetic preset (default small on CPU, emo-1b14b on CUDA)")
    parser.add_argument("--synth-layers", type=int, default=None, metavar="N",
                        help="synthetic checkpoint with N layers of the preset's shape")
    parser.add_argument("--out", type=Path, default=Path("bench-arrivals"), metavar="DIR",
                        help="where the synthetic checkpoint and arrivals.json go (default ./bench-arrivals)")
    parser.add_argument("--streams", type=int, default=4, help="running streams (default 4)")
    parser.add_argument("--stream-tokens", type=int, default=160,
                        help="tokens each stream decodes (default 160)")
    parser.add_argument("--arrivals", type=int, default=3, help="cold requests of new domains (default 3)")
    parser.add_argument("--arrival-every", type=int, default=12,
                        help="stream tokens between two arrivals (default 12)")
    parser.add_argument("--prompt-tokens", type=int, default=None,
                        help="prompt length (default 64 CPU, 512 CUDA)")
    parser.add_argument("--tier", type=float, default=1.0,
                        help="device tier as a share of the routable experts (default 1: all fit, "
                             "paged in lazily)")
    parser.add_argument("--host-tier", action="store_true",
                        help="page through a host RAM tier (default: none, every miss read from disk)")
    parser.add_argument("--disk-gbps", type=float, default=None,
                        help="emulate a disk of this many GB/s (a sleep per expert read; default: the "
                             "real reads)")
    parser.add_argument("--prefill-chunk-tokens", type=int, default=2048)
    parser.add_argument("--modes", default="async,blocking", help="async and/or blocking (default both)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default torch's; 1 on a machine shared with other work)")
    add_placement_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import sys

    from expert_cache.errors import CheckpointError
    from server.tools.synth import write_checkpoint

    def log(message: str) -> None:
        print(f"  {message}", file=sys.stderr, flush=True)

    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    try:
        device, dtype = placement(args)
        gpu = device.type == "cuda"
        model_dir = args.model
        if model_dir is None:
            preset = args.preset or ("emo-1b14b" if gpu else "small")
            layers = "" if args.synth_layers is None else f"-{args.synth_layers}layers"
            model_dir = Path(args.out) / f"synth-{preset}{layers}"
            if not (model_dir / "config.json").is_file():
                log(f"writing a synthetic {preset} checkpoint to {model_dir}")
                overrides = None if args.synth_layers is None else {"num_hidden_layers": args.synth_layers}
                write_checkpoint(model_dir, preset, seed=0, dtype="bf16" if gpu else "fp32",
                                 overrides=overrides)
        cfg = ArrivalsConfig(
            model_dir=Path(model_dir), device=str(device), dtype=short_name(dtype),
            streams=args.streams, stream_tokens=args.stream_tokens, arrivals=args.arrivals,
            arrival_every=args.arrival_every, prompt_tokens=args.prompt_tokens or (512 if gpu else 64),
            tier=args.tier, host_tier=args.host_tier, disk_gb_s=args.disk_gbps,
            prefill_chunk_tokens=args.prefill_chunk_tokens,
            modes=tuple(m.strip() for m in args.modes.split(",") if m.strip()))
        results = [run_mode(cfg, mode, log) for mode in cfg.modes]
    except (ValueError, CheckpointError, OSError, RuntimeError) as e:
        print(f"emo-serve bench arrivals: error: {e}", file=sys.stderr)
        return 2
    text = table(cfg, results)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "arrivals.json"
    header = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}
    rows = [asdict(r) | {"p99_ratio": r.p99_ratio} for r in results]
    path.write_text(json.dumps({"config": header, "results": rows}, indent=2))
    print(f"wrote {path}")
    return 0
